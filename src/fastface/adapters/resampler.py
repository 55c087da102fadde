"""What the IP-Adapter Resampler adapters share: telling projections apart, loading, running.

The IP-Adapter ``Resampler`` (16 learned queries attending over input tokens, perceiver style) is
the image projection of IP-Adapter Plus-Face, FaceID-Portrait ``_unnorm`` and InstantID; its
original state-dict layout is ``latents`` (1, queries, width), ``proj_in``, ``layers.{i}.0``
(perceiver attention: ``norm1`` on the inputs, ``norm2`` on the latents, ``to_q``, ``to_kv``,
``to_out``, 64-d heads), ``layers.{i}.1`` (feed-forward: LayerNorm ``0``, ``1``, GELU, ``3``),
``proj_out`` and ``norm_out``. diffusers (0.42.1) converts exactly this layout into its
``IPAdapterPlusImageProjection`` in ``load_ip_adapter`` (heads = ``to_q`` rows / 64, width from
``latents``), which reproduces the original module (max relative difference ~1e-7 in float32,
see ``benchmarks/conformance_adapters.py``); so loading goes through diffusers and FastFace only
detaches the projection from the UNet, as for FaceID.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline


def projection_kind(image_proj: Mapping[str, Any], ip_layers: Mapping[str, Any] | None = None) -> str:
    """The image projection family from the checkpoint's keys.

    ``"resampler"`` (IP-Adapter Plus / Portrait ``_unnorm`` / InstantID), ``"faceid-plus"``
    (FaceID-Plus: MLP + FacePerceiverResampler), ``"mlp"`` (FaceID MLP + LayerNorm: FaceID when
    the ``ip_adapter`` part carries a LoRA, FaceID-Portrait when it does not) or ``"other"``.
    """
    if "latents" in image_proj and "proj_in.weight" in image_proj and "layers.0.0.to_q.weight" in image_proj:
        return "resampler"
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "faceid-plus"
    if {"proj.0.weight", "proj.2.weight", "norm.weight"} <= set(image_proj):
        if ip_layers is not None and any("_lora." in k for k in ip_layers):
            return "faceid"
        return "mlp"
    return "other"


def require_resampler(state: Mapping[str, Any], checkpoint: Path, what: str) -> None:
    """InputError unless ``state`` (an IP-Adapter checkpoint) projects through a Resampler."""
    if projection_kind(state["image_proj"], state["ip_adapter"]) != "resampler":
        raise InputError(f"'{checkpoint}' is not {what} (no Resampler 'latents' / 'proj_in' / 'layers' keys)")


def resampler_input_dim(image_proj: Mapping[str, Any]) -> int:
    """Width of the Resampler's input tokens (CLIP hidden size, or the face embedding size)."""
    return int(image_proj["proj_in.weight"].shape[1])


def mlp_shape(image_proj: Mapping[str, Any]) -> tuple[int, int]:
    """(embedding size, tokens) of a FaceID-style MLP projection."""
    width = int(image_proj["norm.weight"].shape[0])
    return int(image_proj["proj.0.weight"].shape[1]), int(image_proj["proj.2.weight"].shape[0]) // width


def load_projection(sdxl: StableDiffusionXLPipeline, state: Mapping[str, Any], checkpoint: Path) -> torch.nn.Module:
    """Install the checkpoint's ``to_k_ip``/``to_v_ip`` through diffusers' ``load_ip_adapter``; return
    the image projection, detached from the UNet (tokens are computed once per call by the adapter).

    ``state`` must hold no LoRA keys (FaceID's are loaded separately, see ``faceid.py``).
    """
    unet = sdxl.unet
    try:
        sdxl.load_ip_adapter(dict(state), subfolder=None, weight_name=checkpoint.name, image_encoder_folder=None)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise InputError(
            f"'{checkpoint}' does not fit this backbone's UNet ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    return projection.eval()


def per_photo_tokens(projection: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Run a projection on (n, L, D) inputs (one row per photo) and concatenate: (1, n·S, C)."""
    tokens = projection(inputs)
    return tokens.reshape(1, -1, tokens.shape[-1])
