"""FLOP counts of the SDXL components and the compute-bound floor of one generated image.

The floor is the time a GPU would need if every FLOP of the real-size models ran at the card's
peak dense bf16/fp16 tensor rate::

    floor_ms = (E · F_unet + F_vae_decode + F_text) / peak_flops · 1000

with ``E`` the UNet sample-evaluations spent per image, ``F_unet`` the FLOPs of one UNet
sample-evaluation at the given resolution (identity-branch extras included), ``F_vae_decode`` one
VAE decode and ``F_text`` one pass of both text encoders. A FLOP is one multiply or one add, so a
multiply-accumulate counts 2 (``torch.utils.flop_counter`` counts the same way). Counting happens
on the ``meta`` device: no memory is allocated and no weight is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class GpuPeak:
    """Vendor datasheet figures: dense (no sparsity) bf16/fp16 tensor rate and memory bandwidth."""

    name: str
    bf16_tflops: float
    memory_tb_s: float
    memory_gb: float


# Dense rates from the vendors' datasheets (the "with sparsity" numbers halved). Cards without
# bf16 tensor cores (T4) list their fp16 rate.
GPUS: Mapping[str, GpuPeak] = {
    "h200": GpuPeak("NVIDIA H200 SXM", 989.4, 4.8, 141),
    "h100-sxm": GpuPeak("NVIDIA H100 SXM", 989.4, 3.35, 80),
    "h100-pcie": GpuPeak("NVIDIA H100 PCIe", 756.5, 2.0, 80),
    "a100": GpuPeak("NVIDIA A100 SXM", 312.0, 2.04, 80),
    "l40s": GpuPeak("NVIDIA L40S", 362.05, 0.864, 48),
    "l4": GpuPeak("NVIDIA L4", 121.0, 0.3, 24),
    "a10": GpuPeak("NVIDIA A10", 125.0, 0.6, 24),
    "rtx-4090": GpuPeak("NVIDIA GeForce RTX 4090", 165.2, 1.008, 24),
    "t4": GpuPeak("NVIDIA T4", 65.0, 0.32, 16),
}


def get_gpu(name: str) -> GpuPeak:
    """The table entry for ``name`` (case-insensitive); an unknown name raises ConfigError."""
    key = name.strip().lower()
    if key not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}; choose one of: {', '.join(GPUS)}")
    return GPUS[key]


def guess_gpu(device_name: str) -> str | None:
    """Table key for a ``torch.cuda.get_device_name()`` string, or None when not in the table."""
    text = device_name.lower()
    if "h200" in text:
        return "h200"
    if "h100" in text:
        return "h100-pcie" if "pcie" in text else "h100-sxm"
    for key, needle in (("a100", "a100"), ("l40s", "l40s"), ("l4", " l4"), ("a10", " a10"),
                        ("rtx-4090", "4090"), ("t4", " t4")):
        if needle in f" {text}":
            return key
    return None


# ---------------------------------------------------------------------------------------------
# Analytic counts of the basic operations (2 FLOPs per multiply-accumulate)


def linear_flops(tokens: int, in_features: int, out_features: int, bias: bool = False) -> int:
    """``2 · N · in · out`` (+ ``N · out`` for the bias add, which FlopCounterMode does not count)."""
    return 2 * tokens * in_features * out_features + (tokens * out_features if bias else 0)


def conv2d_flops(
    batch: int, in_channels: int, out_channels: int, out_h: int, out_w: int, kernel: int | tuple[int, int],
    groups: int = 1,
) -> int:
    """``2 · B · C_out · H_out · W_out · (C_in / groups) · k_h · k_w``."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return 2 * batch * out_channels * out_h * out_w * (in_channels // groups) * kh * kw


def attention_flops(batch: int, heads: int, queries: int, keys: int, head_dim: int) -> int:
    """Scaled dot-product attention without projections: ``QKᵀ`` and ``PV``, ``4 · B · h · L · S · d``."""
    return 4 * batch * heads * queries * keys * head_dim


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix/convolution work that ``fn()`` dispatches (torch.utils.flop_counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# The SDXL components


def _meta_unet(unet_config: Mapping[str, Any]):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(unet_config))


def unet_flops(unet_config: Mapping[str, Any], height: int, width: int, batch: int = 1,
               text_tokens: int = 77) -> int:
    """FLOPs of one UNet call on ``batch`` samples at ``height × width`` pixels (latents /8)."""
    import torch

    unet = _meta_unet(unet_config)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    with torch.device("meta"):
        sample = torch.empty(batch, cfg.in_channels, height // 8, width // 8)
        timestep = torch.full((batch,), 999.0)
        text = torch.empty(batch, text_tokens, cfg.cross_attention_dim)
        added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
    return count_flops(lambda: unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added))


def cross_attention_layers(unet_config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(hidden size, downsampling factor of the latents) of every UNet ``attn2`` layer, in order."""
    blocks = list(unet_config["block_out_channels"])
    layers_per_block = unet_config["layers_per_block"]
    depth = unet_config["transformer_layers_per_block"]
    if isinstance(depth, int):
        depth = [depth] * len(blocks)
    out: list[tuple[int, int]] = []
    for level, kind in enumerate(unet_config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            out += [(blocks[level], 2**level)] * (layers_per_block * depth[level])
    out += [(blocks[-1], 2 ** (len(blocks) - 1))] * depth[-1]  # mid block
    for up, kind in enumerate(unet_config["up_block_types"]):
        level = len(blocks) - 1 - up
        if kind.startswith("CrossAttn"):
            # up blocks have one more layer per level (the skip connection's)
            out += [(blocks[level], 2**level)] * ((layers_per_block + 1) * depth[level])
    return out


def identity_branch_flops(unet_config: Mapping[str, Any], height: int, width: int, batch: int = 1,
                          tokens: int = 4) -> int:
    """The adapter's extra work in one UNet call: ``K_ip``/``V_ip`` projections and the S-token attention.

    Per ``attn2`` layer of width C: ``2 · (2·B·S·C_cross·C)`` + ``4·B·L·S·C`` (heads · head_dim = C).
    """
    cross = unet_config["cross_attention_dim"]
    total = 0
    for hidden, down in cross_attention_layers(unet_config):
        queries = (height // 8 // down) * (width // 8 // down)
        total += 2 * linear_flops(batch * tokens, cross, hidden)
        total += 4 * batch * queries * tokens * hidden
    return total


def vae_decode_flops(vae_config: Mapping[str, Any], height: int, width: int, batch: int = 1) -> int:
    """FLOPs of decoding ``batch`` latents to ``height × width`` images."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    cls = AutoencoderTiny if vae_config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL
    with torch.device("meta"):
        vae = cls.from_config(dict(vae_config))
        latents = torch.empty(batch, vae.config.latent_channels, height // 8, width // 8)
    return count_flops(lambda: vae.decode(latents))


def text_encoder_flops(configs: list[Mapping[str, Any]], batch: int = 1, tokens: int = 77) -> int:
    """FLOPs of one pass of every text encoder over ``batch`` prompts of ``tokens`` tokens."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for raw in configs:
        fields = {k: v for k, v in raw.items() if not k.startswith("_")}
        cls = CLIPTextModelWithProjection if raw.get("_class_name") == "CLIPTextModelWithProjection" else CLIPTextModel
        with torch.device("meta"):
            model = cls(CLIPTextConfig(**fields))
            ids = torch.zeros(batch, tokens, dtype=torch.long)
        total += count_flops(lambda m=model, i=ids: m(i, output_hidden_states=True))
    return total


@dataclass(frozen=True)
class FlopBudget:
    """Per-image FLOPs of one generation configuration at one resolution."""

    height: int
    width: int
    unet_per_evaluation: int
    identity_branch_per_evaluation: int
    vae_decode: int
    text_encoders: int

    def per_image(self, evaluations: int) -> int:
        """Total FLOPs of one image that spends ``evaluations`` UNet sample-evaluations."""
        per_eval = self.unet_per_evaluation + self.identity_branch_per_evaluation
        return evaluations * per_eval + self.vae_decode + self.text_encoders

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def sdxl_budget(height: int, width: int, identity_tokens: int = 4, vae: str = "vae") -> FlopBudget:
    """The FLOP budget of the real SDXL configuration (``fastface/configs``) at ``height × width``.

    ``vae`` is the decoder's config name: ``vae`` (SDXL VAE, also the fp16-fix one) or ``vae_tiny``.
    """
    from .fullsize import load_config

    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise ConfigError(f"height and width must be positive multiples of 8; got {height}x{width}")
    unet_config = load_config("unet")
    return FlopBudget(
        height=height,
        width=width,
        unet_per_evaluation=unet_flops(unet_config, height, width),
        identity_branch_per_evaluation=identity_branch_flops(unet_config, height, width, tokens=identity_tokens),
        vae_decode=vae_decode_flops(load_config(vae), height, width),
        text_encoders=text_encoder_flops([load_config("text_encoder"), load_config("text_encoder_2")]),
    )


def floor_ms(flops: float, gpu: GpuPeak | str, utilisation: float = 1.0) -> float:
    """Compute-bound lower bound: ``flops / (peak · utilisation)`` in milliseconds."""
    peak = get_gpu(gpu) if isinstance(gpu, str) else gpu
    if not (0.0 < utilisation <= 1.0) or not math.isfinite(utilisation):
        raise ConfigError(f"utilisation must be in (0, 1]; got {utilisation}")
    return flops / (peak.bf16_tflops * 1e12 * utilisation) * 1e3


def weight_stream_ms(parameters: int, bytes_per_parameter: int, gpu: GpuPeak | str) -> float:
    """Memory-bound lower bound of one model call: reading every weight once at the card's bandwidth."""
    peak = get_gpu(gpu) if isinstance(gpu, str) else gpu
    return parameters * bytes_per_parameter / (peak.memory_tb_s * 1e12) * 1e3
