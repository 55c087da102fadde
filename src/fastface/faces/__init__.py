"""Face analysis: load photos, detect, align, embed, and combine photos into an :class:`Identity`.

Backends are named in a constant registry and imported only when built, so importing this package
loads neither dlib, OpenCV nor onnxruntime.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, FastFaceError
from .align import ARCFACE_TEMPLATE, align_crop, similarity_transform, template_for, transform_points
from .base import FaceBackend
from .cache import EmbeddingCache
from .identity import (
    OUTLIER_THRESHOLDS,
    analyze,
    build_identity,
    detect_faces,
    load_embedding,
    pose_from_photo,
)
from .io import load_image
from .types import KEYPOINT_NAMES, Face, Identity, Pose

_ONNX = "fastface.faces.onnx_backend:OnnxFaceBackend"

# name -> ("module:Class", default keyword arguments)
BACKENDS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    "dlib": ("fastface.faces.dlib_backend:DlibBackend", MappingProxyType({})),
    "facenet": ("fastface.faces.facenet_backend:FaceNetBackend", MappingProxyType({})),
    "arcface": (_ONNX, MappingProxyType({"pack": "buffalo_l"})),
    "buffalo_l": (_ONNX, MappingProxyType({"pack": "buffalo_l"})),
    "antelopev2": (_ONNX, MappingProxyType({"pack": "antelopev2"})),
    "auraface": (_ONNX, MappingProxyType({"pack": "auraface"})),
})


def get_backend(name: str = "dlib", **options: Any) -> FaceBackend:
    """A new face backend by registry name; ``options`` go to its constructor (e.g. ``detector="cnn"``)."""
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ConfigError(f"unknown face backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    target, defaults = BACKENDS[key]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"face backend {key!r} is unavailable: module {exc.name!r} is not installed") from None
    cls = getattr(module, class_name)
    try:
        return cls(**{**defaults, **options})
    except TypeError as exc:
        raise ConfigError(f"face backend {key!r} rejected its options {sorted(options)}: {exc}") from None


def available_backends() -> dict[str, str]:
    """Each registered backend name -> ``"ready"`` or one line saying why it cannot be built here.

    Building a backend loads its models, so this takes a few seconds.
    """
    status: dict[str, str] = {}
    for name in BACKENDS:
        try:
            get_backend(name)
        except (FastFaceError, ImportError, OSError, RuntimeError) as exc:
            status[name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            status[name] = "ready"
    return status


__all__ = [
    "ARCFACE_TEMPLATE",
    "BACKENDS",
    "KEYPOINT_NAMES",
    "OUTLIER_THRESHOLDS",
    "EmbeddingCache",
    "Face",
    "FaceBackend",
    "Identity",
    "Pose",
    "align_crop",
    "analyze",
    "available_backends",
    "build_identity",
    "detect_faces",
    "get_backend",
    "load_embedding",
    "load_image",
    "pose_from_photo",
    "similarity_transform",
    "template_for",
    "transform_points",
]
