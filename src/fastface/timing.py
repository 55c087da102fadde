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


class StageClock:
    """Synchronised wall-clock marks at stage boundaries; :meth:`durations_ms` between named marks.

    ``mark(name)`` waits for the device first (stage boundaries only, never inside the loop).
    """

    def __init__(self, device: torch.device) -> None:
        import time

        self._device = device
        self._now = time.perf_counter
        self._marks: dict[str, float] = {"start": self._now()}

    def mark(self, name: str) -> None:
        synchronize(self._device)
        self._marks[name] = self._now()

    def durations_ms(self, stages: dict[str, tuple[str, str]]) -> dict[str, float]:
        """``{stage: (from_mark, to_mark)}`` -> milliseconds per stage."""
        return {stage: (self._marks[end] - self._marks[begin]) * 1000 for stage, (begin, end) in stages.items()}
