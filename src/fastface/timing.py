"""Host clocks that measure the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU), so that host clocks measure the device.

    Called only at stage boundaries, never inside the denoising loop.
    """
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
