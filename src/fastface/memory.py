"""Memory options of a FastFacePipeline (for small GPUs): CPU offload, VAE tiling, a replacement VAE."""

from __future__ import annotations

from typing import Any

import torch

from .backbones import VAE_DEFAULT, VaeChoice, default_device
from .errors import ConfigError
from .placement import Placement


class MemoryOptionsMixin:
    """Memory options on a pipeline with ``sdxl``, ``adapter``, ``_offload_device`` and ``_vae_choice``."""

    sdxl: Any
    adapter: Any
    _offload_device: torch.device | None
    _vae_choice: VaeChoice | None
    _placement: Placement
    _compiled: Any

    @property
    def vae_choice(self) -> VaeChoice | None:
        """The replacement VAE the pipeline was built with (None: the backbone's own)."""
        return self._vae_choice

    @property
    def cpu_offload(self) -> bool:
        """Whether model CPU offload is on (see :meth:`enable_model_cpu_offload`)."""
        return self._offload_device is not None

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Keep the models on the CPU and move each to ``device`` (CUDA) only while it runs.

        diffusers' model CPU offload: one whole model at a time on the GPU (text encoders, image
        encoder, UNet, VAE in that order), so the GPU holds the largest model, not all of them. The
        adapter's small identity projection stays on the GPU.
        """
        target = torch.device(device) if device is not None else default_device()
        if target.type != "cuda":
            raise ConfigError(f"cpu_offload needs a CUDA device (got {target})")
        if self._compiled is not None:
            raise ConfigError("compile and cpu_offload cannot be combined")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        self.sdxl.enable_model_cpu_offload(device=target)
        if self.adapter is not None:
            self.adapter.to(target)
        self._offload_device = target
        self._placement = Placement(target, self._placement.dtype)

    @property
    def vae_tiling(self) -> bool:
        """Whether the VAE decodes in tiles."""
        return bool(getattr(self.sdxl.vae, "use_tiling", False))

    def set_vae_tiling(self, enabled: bool = True) -> None:
        """Decode in overlapping tiles (constant memory for large images) or in one piece."""
        vae = self.sdxl.vae
        if enabled:
            vae.enable_tiling()
        elif hasattr(vae, "use_tiling"):
            vae.disable_tiling()

    def memory_options(self) -> dict[str, Any]:
        """The memory options in effect: VAE (name, source, class), tiling, CPU offload."""
        choice = self._vae_choice
        return {
            "vae": VAE_DEFAULT if choice is None else choice.name,
            "vae_source": None if choice is None else choice.source,
            "vae_class": type(self.sdxl.vae).__name__,
            "vae_tiling": self.vae_tiling,
            "cpu_offload": self.cpu_offload,
        }

