"""LoRA bookkeeping of one pipeline: the backbone's LoRAs, the adapter's own, fused or not.

METHOD §4: the distillation LoRA, style LoRAs and the identity adapter's own LoRA must all be
active together at their weights; a call never silently drops one. This object remembers which
weights are set on the UNet, so that a call re-sets them only when they change, and which were
merged into the weights by :meth:`LoraState.fuse`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import check_number
from .errors import ConfigError
from .presets import DEFAULT_LORA_SCALE


class LoraState:
    """The LoRA weights of one SDXL pipeline (by PEFT adapter name) and whether they are fused."""

    def __init__(self, sdxl: Any, backbone_weights: Mapping[str, float]) -> None:
        self._sdxl = sdxl
        self._weights = dict(backbone_weights)
        self._applied: dict[str, float] | None = None
        # Weights the LoRAs were merged into the UNet with (None: unfused, set per call).
        self._fused: dict[str, float] | None = None

    @property
    def backbone_weights(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def fused(self) -> dict[str, float] | None:
        return None if self._fused is None else dict(self._fused)

    def set_backbone_weights(self, weights: Mapping[str, float]) -> None:
        unknown = set(weights) - set(self._weights)
        if unknown:
            raise ConfigError(
                f"no backbone LoRA named {', '.join(sorted(unknown))}; loaded: {', '.join(self._weights) or 'none'}"
            )
        if self._fused is not None:
            raise ConfigError("the LoRAs are fused into the UNet at fixed weights; load an unfused pipeline to change them")
        self._weights.update({k: float(v) for k, v in weights.items()})

    def active(self, adapter_lora: str | None, lora_scale: float) -> dict[str, float]:
        """Every LoRA a call activates: the backbone's, and the adapter's own at ``lora_scale``."""
        weights = dict(self._weights)
        if adapter_lora is not None and adapter_lora in (getattr(self._sdxl.unet, "peft_config", None) or {}):
            weights[adapter_lora] = lora_scale
        return weights

    def apply(self, adapter_lora: str | None, lora_scale: float) -> None:
        """Activate every LoRA at its weight (distillation, styles, the adapter's own)."""
        if self._fused is not None:
            fused_scale = self._fused.get(adapter_lora) if adapter_lora is not None else None
            if fused_scale is not None and fused_scale != lora_scale:
                raise ConfigError(
                    f"the adapter LoRA is fused at lora_scale={fused_scale:g}; this call asks for {lora_scale:g}"
                )
            return
        weights = self.active(adapter_lora, lora_scale)
        if weights and weights != self._applied:
            self._sdxl.set_adapters(list(weights), adapter_weights=list(weights.values()))
            self._applied = weights

    def fuse(self, adapter_lora: str | None, lora_scale: float) -> dict[str, float]:
        """Merge every LoRA into the UNet weights at the weights a call would activate; removes them."""
        if self._fused is not None:
            raise ConfigError("the LoRAs are already fused")
        weights = self.active(adapter_lora, lora_scale)
        if weights:
            self.apply(adapter_lora, lora_scale)
            unet = self._sdxl.unet
            # fuse_lora merges each adapter with its current scaling (= the weights set above).
            unet.fuse_lora(lora_scale=1.0, adapter_names=list(weights))
            unet.unload_lora()
        self._fused = weights
        self._applied = dict(weights)
        return dict(weights)

    def check_removable(self, adapter_lora: str | None) -> None:
        """Refuse to remove an adapter whose LoRA is merged into the UNet weights."""
        if self._fused is not None and adapter_lora is not None and adapter_lora in self._fused:
            raise ConfigError("the adapter's LoRA is fused into the UNet and cannot be removed; reload the backbone")

    def drop_adapter_lora(self, adapter_lora: str | None) -> None:
        """Remove the adapter's LoRA (unfused) and re-activate the backbone's."""
        import warnings

        self.check_removable(adapter_lora)
        unet = self._sdxl.unet
        if adapter_lora is not None and adapter_lora in (getattr(unet, "peft_config", None) or {}):
            with warnings.catch_warnings():
                # PEFT says which adapter it activates instead; the backbone's are re-set below.
                warnings.filterwarnings("ignore", message=f"Adapter {adapter_lora} was active")
                unet.delete_adapters(adapter_lora)
        self._applied = None
        if self._fused is not None:
            # Merged weights cannot be separated again: the UNet keeps the adapter LoRA's share.
            return
        if self._weights:
            self._sdxl.set_adapters(list(self._weights), adapter_weights=list(self._weights.values()))
            self._applied = dict(self._weights)


class LoraMixin:
    """The LoRA API of a pipeline with ``_loras`` (a :class:`LoraState`), ``_lock`` and ``adapter``."""

    _loras: LoraState
    _lock: Any
    adapter: Any

    @property
    def lora_weights(self) -> dict[str, float]:
        """Weights of the backbone's LoRAs (distillation, styles) by PEFT adapter name."""
        return self._loras.backbone_weights

    def set_lora_weights(self, weights: Mapping[str, float]) -> None:
        """Change backbone LoRA weights (by adapter name, see :attr:`lora_weights`) for later calls."""
        with self._lock:
            self._loras.set_backbone_weights(weights)

    @property
    def fused_loras(self) -> dict[str, float] | None:
        """The LoRA weights merged into the UNet by :meth:`fuse_loras`, or None when unfused."""
        return self._loras.fused

    def fuse_loras(self, lora_scale: float = DEFAULT_LORA_SCALE) -> dict[str, float]:
        """Merge every LoRA (distillation, styles, the adapter's own) into the UNet weights, once.

        For a pipeline whose LoRA weights stay fixed: each linear layer then costs what the base
        layer costs (no LoRA matmuls, no PEFT wrapper). All LoRAs are merged together, after all
        are loaded, at the weights a call would activate (the backbone's, ``lora_scale`` for the
        adapter's), and the LoRA layers are removed: loading another LoRA afterwards therefore
        cannot silently drop a fused one (METHOD §4), there is none left to switch. Later calls
        must use the same ``lora_scale``; :meth:`set_lora_weights` is refused. Returns the fused
        weights by adapter name.
        """
        lora_scale = check_number(lora_scale, "lora_scale")
        with self._lock:
            return self._loras.fuse(self._adapter_lora, lora_scale)

    def activate_loras(self, lora_scale: float = DEFAULT_LORA_SCALE) -> dict[str, float]:
        """Set every LoRA to the weight a call with ``lora_scale`` uses (for code that calls the UNet itself)."""
        lora_scale = check_number(lora_scale, "lora_scale")
        with self._lock:
            self._loras.apply(self._adapter_lora, lora_scale)
            return self._loras.fused or self._loras.active(self._adapter_lora, lora_scale)

    @property
    def _adapter_lora(self) -> str | None:
        return None if self.adapter is None else self.adapter.lora_name

