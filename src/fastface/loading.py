"""Constructing a :class:`~fastface.pipeline.FastFacePipeline`: from hub names or local files
(:meth:`LoadingMixin.from_pretrained`) or around a diffusers pipeline the caller already has
(:meth:`LoadingMixin.from_pipe`).

Every check that needs no model (names, device, dtype, the files the combination reads) runs
before the first weight is loaded, so a typo or a missing download costs a second, not a load.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .adapters import load_adapter
from .backbones import (
    VAE_DEFAULT,
    backbone_spec,
    default_dtype,
    get_backbone,
    load_backbone,
    load_vae,
    make_scheduler,
    resolve_vae,
    vae_scale_factor,
    with_scheduler,
)
from .config import check_device, check_dtype
from .downloads import Combination, check_available
from .errors import ConfigError, InputError
from .messages import quiet_loading

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import FastFacePipeline


def replace_vae(sdxl: Any, vae: Any, name: str = "replacement") -> None:
    """Put ``vae`` in place of ``sdxl``'s VAE, after checking that it reads the same latents.

    The SDXL pipeline derives its pixel/latent scale from the VAE it was built with; a replacement
    (AutoencoderTiny has no ``block_out_channels`` to derive it from) must match that scale and
    the UNet's latent channels.
    """
    channels = sdxl.unet.config.in_channels
    if vae.config.latent_channels != channels:
        raise InputError(
            f"VAE '{name}' has {vae.config.latent_channels} latent channels; this backbone's UNet uses {channels}"
        )
    scale = vae_scale_factor(vae)
    if scale != sdxl.vae_scale_factor:
        raise InputError(f"VAE '{name}' maps 1 latent to {scale} px; this backbone needs {sdxl.vae_scale_factor}")
    sdxl.register_modules(vae=vae)


class LoadingMixin:
    """The constructors of FastFacePipeline (``cls`` is the pipeline class)."""

    @classmethod
    @quiet_loading()  # no known-benign third-party loading notices for API users
    def from_pretrained(
        cls,
        backbone: str = "hyper-4",
        adapter: str | None = "faceid",
        *,
        base_model: str | os.PathLike | None = None,
        adapter_path: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
        loras: Sequence[Any] = (),
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        vae: str | os.PathLike | None = None,
        vae_tiling: bool = False,
        cpu_offload: bool = False,
        sampler: str | None = None,
        scheduler: str | None = None,
        cfg_scale: float | None = None,
        compile: bool = False,
    ) -> FastFacePipeline:
        """Load a backbone (METHOD §6 name or ``tiny``) and an adapter (``faceid``, ``faceid-plusv2``, None).

        ``base_model``/``adapter_path``/``image_encoder`` replace the hub defaults with local paths;
        ``loras`` are extra style LoRAs, paths or (path, weight) pairs.

        Memory options (for small GPUs): ``vae`` replaces the backbone's VAE with ``"fp16-fix"``
        (madebyollin/sdxl-vae-fp16-fix: decodes in float16, no float32 copy), ``"tiny"``
        (madebyollin/taesdxl, AutoencoderTiny: a fast preview decoder) or a local diffusers VAE
        folder / hub id (AutoencoderKL or AutoencoderTiny, read from its config); None or
        ``"default"`` keeps the backbone's. ``vae_tiling`` decodes in overlapping tiles (peak
        memory independent of the image size; no effect on images smaller than one tile).
        ``cpu_offload`` keeps every model on the CPU and moves each to ``device`` (a CUDA device)
        only while it runs (diffusers' model CPU offload): slower, far less GPU memory.

        ``sampler`` (e.g. ``"lightning-4"``) samples ``base_model``, a checkpoint with the distillation
        merged in, with that backbone's scheduler, steps and CFG-free scale, loading no distillation
        weights (see :func:`fastface.backbones.sampler_spec`). ``scheduler``/``cfg_scale``: another
        sampler and stock CFG scale (:func:`fastface.backbones.with_scheduler`, e.g. PuLID's recipe).
        ``compile`` fuses the LoRAs and compiles the UNet and the VAE decode (see ``compile()``).
        """
        spec = with_scheduler(backbone_spec(backbone, sampler, base_model), scheduler, cfg_scale)
        if adapter is not None:
            from .adapters import get_adapter

            get_adapter(adapter)  # fail on a bad name before loading gigabytes
        device = check_device(device)
        if compile and cpu_offload:
            raise ConfigError("compile and cpu_offload cannot be combined")
        if cpu_offload and device.type != "cuda":
            raise ConfigError(f"cpu_offload=True needs a CUDA device (the pipeline's device is {device})")
        dtype = check_dtype(dtype) or default_dtype(device)
        # Offline, everything missing is one error naming the one `fastface download` command.
        check_available(Combination(
            backbone=backbone, adapter=adapter, vae=vae if isinstance(vae, str) else None, sampler=sampler,
            base_model=None if base_model is None else os.fspath(base_model),
            adapter_path=adapter_path, image_encoder=image_encoder,
            precision="fp16" if dtype in (torch.float16, torch.bfloat16) else "fp32"))
        # Resolved before the backbone loads: a missing VAE costs a second, not a model load.
        vae_choice = None if vae is None or vae == VAE_DEFAULT else resolve_vae(vae)
        # Offloaded models are loaded on the CPU: the whole pipeline need never fit on the GPU.
        load_device = torch.device("cpu") if cpu_offload else device
        sdxl = load_backbone(spec, base_model=base_model, loras=loras, device=load_device, dtype=dtype)
        if vae_choice is not None:
            replace_vae(sdxl, load_vae(vae_choice, dtype), vae_choice.name)
            sdxl.vae.to(load_device)
        loaded = None
        if adapter is not None:
            loaded = load_adapter(sdxl, adapter, backbone=spec.name, path=adapter_path, image_encoder=image_encoder)
            sdxl.to(load_device)
            loaded.to(device=device, dtype=dtype)
        pipe = cls(sdxl, spec, loaded, loras, vae=vae_choice)
        pipe.set_vae_tiling(vae_tiling)
        if cpu_offload:
            pipe.enable_model_cpu_offload(device)
        if compile:
            pipe.compile()
        return pipe

    @classmethod
    @quiet_loading()
    def from_pipe(
        cls,
        sdxl: Any,
        adapter: str | None = "faceid",
        *,
        sampler: str | None = None,
        backbone: str = "sdxl",
        adapter_path: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
    ) -> FastFacePipeline:
        """Wrap a diffusers ``StableDiffusionXLPipeline`` you already have (loaded, on its device).

        ``sampler`` names the sampling of a distilled backbone (e.g. ``"lightning-4"`` for a
        checkpoint with Lightning merged in; None: ``backbone``'s own, SDXL's 30-step Euler CFG 5 by
        default) and its scheduler replaces ``sdxl.scheduler``; no distillation weights are loaded.
        Fuse LoRAs of your own into the pipeline first (``sdxl.fuse_lora()``): FastFace sets the
        active PEFT adapters of the UNet on every call.
        """
        from dataclasses import replace

        from .backbones import sampler_spec

        # The pipeline is given: whatever distillation it has is in its weights already.
        spec = sampler_spec(sampler, backbone) if sampler else replace(get_backbone(backbone), lora=None, unet=None)
        loaded = None
        if adapter is not None:
            loaded = load_adapter(sdxl, adapter, backbone=spec.name, path=adapter_path, image_encoder=image_encoder)
            sdxl.to(sdxl.unet.device)
            loaded.to(device=sdxl.unet.device, dtype=sdxl.unet.dtype)
        # The sampling is the sampler's (or the backbone's): its scheduler replaces the pipeline's.
        sdxl.scheduler = make_scheduler(spec, sdxl.scheduler.config)
        sdxl.set_progress_bar_config(disable=True)
        return cls(sdxl, spec, loaded)
