"""Readable report pieces that need no generation run: integer ticks, reasons once, wrapped prompts."""

from __future__ import annotations

import matplotlib.pyplot as plt

from fastface.evaluation.report import _wrap, cost_figure, unavailable_metrics


def _ok(mean: float, lo: float, hi: float) -> dict:
    return {"status": "ok", "mean": mean, "ci95": [lo, hi]}


def test_counts_get_integer_ticks():
    runs = [{"name": name, "aggregate": {"splits": {"all": {"unet_evaluations": _ok(n, n, n),
                                                            "wall_ms": _ok(ms, ms - 5, ms + 5)}}}}
            for name, n, ms in (("a", 8.0, 400.0), ("b", 10.0, 900.0))]
    fig = cost_figure(runs)
    try:
        ax = fig.axes[0]
        ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert ax.get_title() == "cost only (no quality metric was scored)"
    finally:
        plt.close(fig)


def test_a_reason_is_grouped_once_and_prompts_wrap():
    run = {"metrics": {"id.arcface": {"status": "unavailable", "reason": "no pack"},
                       "face_detected.arcface": {"status": "unavailable", "reason": "no pack"},
                       "aesthetic": {"status": "unavailable", "reason": "no head"},
                       "id.dlib": {"status": "ok", "reason": None}}}
    assert unavailable_metrics(run) == {"no pack": ["id.arcface", "face_detected.arcface"], "no head": ["aesthetic"]}
    lines = _wrap("oil painting in the style of Rembrandt, dramatic chiaroscuro, a person reading a letter "
                  "by candlelight, with a very long tail that cannot fit", 22, 4)
    assert len(lines) == 4 and all(len(line) <= 22 for line in lines) and lines[-1].endswith("…")
    assert lines[0] == "oil painting in the"
