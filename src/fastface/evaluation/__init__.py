"""The FastFace evaluation protocol (docs/PROTOCOL.md): dataset, generation grid, scoring, reports.

Importing this package is cheap; the parts that need torch, diffusers or a face backend import them
when they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "Dataset": "fastface.evaluation.dataset",
    "load_dataset": "fastface.evaluation.dataset",
    "check_dataset": "fastface.evaluation.dataset",
    "write_smoke_dataset": "fastface.evaluation.dataset",
    "RunConfig": "fastface.evaluation.run",
    "run_grid": "fastface.evaluation.run",
    "ScoreOptions": "fastface.evaluation.score",
    "score_run": "fastface.evaluation.score",
    "build_report": "fastface.evaluation.report",
}

__all__ = ["Dataset", "RunConfig", "ScoreOptions", "build_report", "check_dataset", "load_dataset",
           "run_grid", "score_run", "write_smoke_dataset"]

if TYPE_CHECKING:  # pragma: no cover
    from .dataset import Dataset, check_dataset, load_dataset, write_smoke_dataset
    from .report import build_report
    from .run import RunConfig, run_grid
    from .score import ScoreOptions, score_run


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastface.evaluation' has no attribute {name!r}")
