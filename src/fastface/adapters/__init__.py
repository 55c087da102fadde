"""Identity adapters: the registry, and loading one into an SDXL pipeline.

Each adapter lives in one file of this package: an :class:`~fastface.adapters.base.IdentityAdapter`
subclass and a ``SPECS`` tuple of :class:`~fastface.adapters.base.AdapterSpec` entries. To add an
adapter, write that file and name its module in ``_ADAPTER_MODULES`` below (see
docs/ARCHITECTURE.md, "The adapter seam"). Importing this package imports no model code: the
adapter modules import torch/diffusers inside their functions.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import (
    ID_LORA_ADAPTER,
    IDENTITY_MODES,
    AdapterSpec,
    IdentityAdapter,
    IdentityConditioning,
    IdentityTokens,
    RequiredFile,
    UNetCall,
)
from .clip import CLIP_H
from .faceid import FACEID_REPO

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionXLPipeline

# One module per adapter family, each with a SPECS tuple; the registry is their union, in this order.
_ADAPTER_MODULES = ("faceid", "plus_face", "portrait", "instantid", "pulid")


def _registry() -> Mapping[str, AdapterSpec]:
    specs: dict[str, AdapterSpec] = {}
    for module_name in _ADAPTER_MODULES:
        for spec in importlib.import_module(f"{__name__}.{module_name}").SPECS:
            if spec.name in specs:
                raise RuntimeError(f"adapter {spec.name!r} is registered twice")
            specs[spec.name] = spec
    return MappingProxyType(specs)


ADAPTERS: Mapping[str, AdapterSpec] = _registry()

# The loaded-adapter type under its first name.
LoadedAdapter = IdentityAdapter


def get_adapter(name: str) -> AdapterSpec:
    """The registered adapter ``name`` (ConfigError listing the names otherwise)."""
    try:
        return ADAPTERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown adapter {name!r}; choose one of: {', '.join(ADAPTERS)}") from None


def spec_for_backbone(name: str, backbone: str) -> AdapterSpec:
    """The adapter spec, resolved to the tiny test checkpoints for the ``tiny`` backbone."""
    spec = get_adapter(name)
    if backbone != "tiny":
        return spec
    return spec.adapter_class().tiny_spec(spec)


def load_adapter(
    pipe: StableDiffusionXLPipeline,
    name: str,
    *,
    backbone: str = "",
    path: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
) -> IdentityAdapter:
    """Load adapter ``name`` into ``pipe`` (see the adapter class's ``load``)."""
    spec = spec_for_backbone(name, backbone)
    return spec.adapter_class().load(pipe, spec, path=path, image_encoder=image_encoder)


__all__ = [
    "ADAPTERS",
    "CLIP_H",
    "FACEID_REPO",
    "ID_LORA_ADAPTER",
    "IDENTITY_MODES",
    "AdapterSpec",
    "IdentityAdapter",
    "IdentityConditioning",
    "IdentityTokens",
    "LoadedAdapter",
    "RequiredFile",
    "UNetCall",
    "get_adapter",
    "load_adapter",
    "spec_for_backbone",
]
