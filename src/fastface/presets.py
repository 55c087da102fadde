"""Method presets: named combinations of decoupled guidance (DCG) and attention manipulation (AM).

``guidance=None`` means "the backbone's own CFG": the engine turns it into :func:`plain_cfg` with
the backbone's CFG scale (α = β = scale, no rescale), which is stock classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import AttentionManipulation
from .errors import ConfigError
from .guidance import GuidanceConfig

DEFAULT_METHOD = "fastface"
# The adapter scale λ of the identity cross-attention (IP-Adapter's published default) and the
# weight of an adapter's own LoRA.
DEFAULT_IP_SCALE = 0.8
DEFAULT_LORA_SCALE = 1.0
# InstantID's IdentityNet residual scale (controlnet_conditioning_scale of its published example).
DEFAULT_CONTROLNET_SCALE = 0.8


@dataclass(frozen=True)
class MethodConfig:
    """A named method: its guidance (None = backbone CFG) and attention manipulation (None = off)."""

    name: str
    guidance: GuidanceConfig | None
    attention: AttentionManipulation | None
    description: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "guidance": None if self.guidance is None else self.guidance.to_dict(),
            "attention": None if self.attention is None else self.attention.to_dict(),
            "description": self.description,
        }


def plain_cfg(scale: float) -> GuidanceConfig:
    """Stock CFG with scale w as a DCG configuration: α = β = w, no rescale (ε∅ + w(εTI − ε∅))."""
    return GuidanceConfig(alpha=scale, beta=scale, rescale=0.0)


METHODS: dict[str, MethodConfig] = {
    "fastface": MethodConfig(
        "fastface",
        GuidanceConfig(),
        AttentionManipulation.scale_power(),
        "FastFace: decoupled guidance + scale-power attention manipulation (published default)",
    ),
    "fastface-softmask": MethodConfig(
        "fastface-softmask",
        GuidanceConfig(),
        AttentionManipulation.softmask(),
        "FastFace with the scheduled soft-mask attention manipulation + AdaIN",
    ),
    "dcg": MethodConfig(
        "dcg",
        GuidanceConfig(),
        None,
        "decoupled guidance only, no attention manipulation",
    ),
    "am": MethodConfig(
        "am",
        None,
        AttentionManipulation.scale_power(),
        "scale-power attention manipulation only, the backbone's own CFG",
    ),
    "none": MethodConfig(
        "none",
        None,
        None,
        "adapter plugged in naively: no attention manipulation, the backbone's own CFG",
    ),
}


def get_method(name: str) -> MethodConfig:
    """The preset called ``name``; an unknown name raises ConfigError listing the valid ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]
