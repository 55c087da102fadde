"""FastFace: identity adapters on few-step distilled SDXL, training-free.

Heavy modules (torch, diffusers) load lazily so that ``import fastface`` stays cheap and never
imports a face backend (dlib, onnxruntime, OpenCV) until one is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "FastFacePipeline": "fastface.pipeline",
    "GenerationResult": "fastface.pipeline",
    "AttentionManipulation": "fastface.attention",
    "GuidanceConfig": "fastface.guidance",
    "decoupled_guidance": "fastface.guidance",
    "manipulated_ip_attention": "fastface.attention",
    "Identity": "fastface.faces.types",
    "FastFaceError": "fastface.errors",
    "GenerationConfig": "fastface.config",
    "Limits": "fastface.config",
}

__all__ = [
    "__version__",
    "AttentionManipulation",
    "FastFaceError",
    "FastFacePipeline",
    "GenerationConfig",
    "GenerationResult",
    "GuidanceConfig",
    "Identity",
    "Limits",
    "decoupled_guidance",
    "manipulated_ip_attention",
]

if TYPE_CHECKING:  # pragma: no cover
    from .attention import AttentionManipulation, manipulated_ip_attention
    from .config import GenerationConfig, Limits
    from .errors import FastFaceError
    from .faces.types import Identity
    from .guidance import GuidanceConfig, decoupled_guidance
    from .pipeline import FastFacePipeline, GenerationResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastface' has no attribute {name!r}")
