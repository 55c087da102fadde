"""FP8 linear layers for the fused UNet (an option; the default stays bf16).

Each ``nn.Linear`` of the UNet's transformer blocks (attention projections, feed-forward,
``proj_in``/``proj_out``) becomes a :class:`Float8Linear`: the weight stored once in
``float8_e4m3fn`` with one scale per output channel, the activation quantised per row at every
call, the product computed by ``torch._scaled_mm`` (FP8 tensor cores, float32 accumulation) and
returned in the activation's dtype. Convolutions, norms, the timestep MLP and the identity branch's
K/V projections (projected once per call) stay in bf16.

Row-wise scaled FP8 products need a CUDA GPU of compute capability 9.0 or newer (Hopper); anywhere
else :func:`quantize_unet_fp8` raises a :class:`~fastface.errors.ConfigError`. It needs fused LoRAs
(a PEFT LoRA layer wraps its base layer; quantising under it would drop the LoRA). Random weights
say nothing about how visible FP8 is: the benchmark reports the PSNR against bf16 on the same seeds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .pipeline import FastFacePipeline

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_CAPABILITY = (9, 0)
# Only layers of the transformer blocks: large products, dimensions that are multiples of 16.
_SKIPPED = ("to_k_ip", "to_v_ip")


def fp8_support(device: torch.device) -> str | None:
    """None if ``device`` can run the row-wise scaled FP8 products, else why not (one line)."""
    if device.type != "cuda":
        return f"FP8 needs a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (the device is {device})"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"FP8 row-wise products need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+; "
                f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
    if not hasattr(torch, "_scaled_mm"):  # pragma: no cover - every supported torch has it
        return "this torch has no _scaled_mm"
    return None


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-row scales (rows, 1) mapping each row's largest |value| to the FP8 maximum (float32)."""
    return (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)


class Float8Linear(nn.Module):
    """``y = x Wᵀ + b`` with W in FP8 (per-output-channel scales) and x quantised per row at each call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            weight = linear.weight.detach()
            scale = _row_scales(weight)
            self.register_buffer("weight_fp8", (weight.float() / scale).to(FP8))
            # (1, out): the layout _scaled_mm wants for the second operand's row-wise scales.
            self.register_buffer("weight_scale", scale.t().contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        scale = _row_scales(rows)
        quantised = (rows.float() / scale).to(FP8)
        out = torch._scaled_mm(quantised, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 (row-wise)"


def _targets(unet: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for name, module in unet.named_modules():
        parts = name.split(".")
        if "attentions" not in parts or any(skip in parts for skip in _SKIPPED):
            continue
        for child_name, child in module.named_children():
            if type(child) is nn.Linear and child_name not in _SKIPPED \
                    and child.in_features % 16 == 0 and child.out_features % 16 == 0:
                found.append((module, child_name, child))
    return found


def quantize_module_fp8(unet: nn.Module) -> int:
    """Replace the transformer blocks' linear layers of ``unet`` by :class:`Float8Linear`; returns how many."""
    targets = _targets(unet)
    for parent, child_name, linear in targets:
        setattr(parent, child_name, Float8Linear(linear))
    return len(targets)


def quantize_unet_fp8(pipe: FastFacePipeline) -> int:
    """Quantise the pipeline's (fused) UNet to FP8 linear layers, where the GPU supports it."""
    reason = fp8_support(pipe.device)
    if reason is not None:
        raise ConfigError(reason)
    if pipe.fused_loras is None:
        raise ConfigError("FP8 needs fused LoRAs (fuse_loras() first): a LoRA layer cannot wrap an FP8 layer")
    return quantize_module_fp8(pipe.sdxl.unet)


def describe(unet: Any) -> dict[str, int]:
    """How many linear layers of ``unet`` are FP8 and how many stay in their dtype."""
    fp8 = sum(1 for m in unet.modules() if isinstance(m, Float8Linear))
    plain = sum(1 for m in unet.modules() if type(m) is nn.Linear)
    return {"fp8_linear": fp8, "other_linear": plain}


__all__ = ["Float8Linear", "describe", "fp8_support", "quantize_module_fp8", "quantize_unet_fp8"]
