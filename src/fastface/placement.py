"""Where the pipeline's models run, read once, and SDXL's prompt encoding without per-call module walks.

diffusers answers ``unet.device`` / ``unet.dtype`` by walking the model: ``dtype`` looks at every
one of the ~1,900 modules of the SDXL UNet for a layer-wise casting hook and ``device`` (like
``get_module_execution_device``, which ``StableDiffusionXLPipeline.encode_prompt`` calls for each
text encoder) looks for a group-offloading hook the same way: ~8–50 ms of host time per question
at full size, asked several times per image. FastFace supports neither hook, so the answers only
change when the pipeline is built, moved (``FastFacePipeline.to``) or offloaded
(``enable_model_cpu_offload``); :class:`Placement` holds them from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """The device inputs must be on and the dtype the UNet computes in.

    ``device`` is the accelerator of CPU offload when offloading (the weights rest on the CPU and
    move there for each forward), else the UNet's own device.
    """

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, sdxl: Any, offload_device: torch.device | None = None) -> Placement:
        """Read (once) from the pipeline's UNet: its first floating-point parameter."""
        unet = sdxl.unet
        parameter = next((p for p in unet.parameters() if p.is_floating_point()), None)
        if parameter is None:  # pragma: no cover - a UNet always has weights
            return cls(offload_device or torch.device("cpu"), torch.float32)
        return cls(offload_device if offload_device is not None else parameter.device, parameter.dtype)


class PlacementMixin:
    """``device``/``dtype`` read from a cached :class:`Placement`, and ``to`` that moves and re-reads it.

    For a pipeline with ``sdxl``, ``adapter``, ``_offload_device``, ``_placement`` and (optionally
    compiled) ``_compile_options`` / ``_make_compiled``.
    """

    sdxl: Any
    adapter: Any
    _offload_device: torch.device | None
    _placement: Placement
    _compiled: Any
    _compile_options: dict[str, Any] | None

    @property
    def device(self) -> torch.device:
        """Where the models run: the UNet's device, or the accelerator of CPU offload (diffusers'
        ``_execution_device``: the offloaded weights themselves rest on the CPU)."""
        return self._placement.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in."""
        return self._placement.dtype

    def _upcast_vae(self) -> None:
        vae = self.sdxl.vae
        # AutoencoderTiny and the fp16-fix VAE say force_upcast=False (or nothing): they stay in float16.
        if module_dtype(vae) == torch.float16 and getattr(vae.config, "force_upcast", False):
            # The SDXL VAE overflows in float16. diffusers casts it up and back down around every
            # decode; keeping it in float32 once costs ~160 MB and leaves no cast inside calls.
            vae.to(torch.float32)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        """Move (and/or cast) every model of the pipeline; returns the pipeline.

        Use this rather than ``pipe.sdxl.to``: the pipeline reads its device and dtype once, here.
        """
        from .errors import ConfigError

        if self._offload_device is not None:
            raise ConfigError("the pipeline uses model CPU offload: its models move by themselves")
        target = torch.device(device) if device is not None else None
        self.sdxl.to(device=target, dtype=dtype)
        if self.adapter is not None:
            self.adapter.to(device=target, dtype=dtype)
        self._upcast_vae()
        self._placement = Placement.of(self.sdxl)
        if self._compile_options is not None:  # compiled code is specialised to a device: start again
            self._compiled = self._make_compiled(**self._compile_options)  # type: ignore[attr-defined]
        return self


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (no walk over its sub-modules)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def encode_sdxl_text(sdxl: Any, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditions for ``prompts``: (P, 77, 2048) token embeddings and (P, 1280) pooled.

    The computation of ``StableDiffusionXLPipeline.encode_prompt(prompt, device=device,
    num_images_per_prompt=1, do_classifier_free_guidance=False)`` (penultimate hidden states of both
    encoders, concatenated; the pooled projection of the second), with ``device`` given instead of
    asked of each encoder, and in the second encoder's dtype as diffusers returns it.
    """
    tokenizers = [sdxl.tokenizer, sdxl.tokenizer_2] if sdxl.tokenizer is not None else [sdxl.tokenizer_2]
    encoders = [sdxl.text_encoder, sdxl.text_encoder_2] if sdxl.text_encoder is not None else [sdxl.text_encoder_2]
    texts = list(prompts)
    hidden = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, encoders):
        if hasattr(sdxl, "maybe_convert_prompt"):  # textual-inversion tokens, as diffusers does
            texts_in = sdxl.maybe_convert_prompt(texts, tokenizer)
        else:  # pragma: no cover
            texts_in = texts
        ids = tokenizer(
            texts_in, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        longest = tokenizer(texts_in, padding="longest", return_tensors="pt").input_ids
        if longest.shape[-1] > ids.shape[-1]:
            logger.warning("prompt truncated to the text encoder's %d tokens", tokenizer.model_max_length)
        out = encoder(ids.to(device), output_hidden_states=True)
        if out[0].ndim == 2:  # the projection head of CLIPTextModelWithProjection
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    embeds = torch.cat(hidden, dim=-1)
    dtype = module_dtype(sdxl.text_encoder_2 if sdxl.text_encoder_2 is not None else sdxl.unet)
    if pooled is None:  # pragma: no cover - SDXL's second encoder always has the projection
        raise ValueError("the SDXL text encoders returned no pooled embedding")
    return embeds.to(dtype=dtype, device=device), pooled.to(device)


__all__ = ["Placement", "PlacementMixin", "encode_sdxl_text", "module_dtype"]
