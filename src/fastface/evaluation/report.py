"""Reports over one or more scored runs: aggregated tables (JSON, CSV), image grids and an HTML page.

Aggregation is over identities, the unit a dataset samples: per identity the mean of its samples,
then the mean over identities with a 95 % bootstrap confidence interval (identities resampled with
replacement, seeded). A failed value (``None``: no face found) is kept visible three ways: the mean
over the values that exist, the mean with failures counted as 0, and the failure rate.
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, write_text_atomic
from ..errors import InputError
from .run import load_records, read_manifest
from .score import load_scores

SPLITS = ("realistic", "stylistic", "all")
BOOTSTRAP_SAMPLES = 2000
GRID_COLUMNS = 8
THUMB = 128


def bootstrap_ci(values: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and the percentile bootstrap interval of the mean.

    ``values`` holds one number per identity; the interval is over B resamples of identities with
    replacement, from a generator seeded with ``seed`` (same input, same interval).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return mean, float(low), float(high)


def _finite(values: tuple[float, ...]) -> tuple[float | None, ...]:
    """NaN (no value at all, e.g. no face in any image) becomes None: JSON null, shown as '–'."""
    return tuple(v if np.isfinite(v) else None for v in values)


def _stats(per_identity: dict[str, list[float | None]], seed: int) -> dict[str, Any]:
    """Aggregate one metric: values per identity (None = failure) -> means, intervals, failure rate."""
    present, zeroed, fail_rates = [], [], []
    n_samples = n_failed = 0
    for values in per_identity.values():
        ok = [v for v in values if v is not None]
        n_samples += len(values)
        n_failed += len(values) - len(ok)
        if ok:
            present.append(float(np.mean(ok)))
        zeroed.append(float(np.mean([0.0 if v is None else v for v in values])))
        fail_rates.append((len(values) - len(ok)) / len(values))
    mean, lo, hi = _finite(bootstrap_ci(present, seed=seed))
    out: dict[str, Any] = {"mean": mean, "ci95": [lo, hi], "n_samples": n_samples, "n_failed": n_failed,
                           "n_identities": len(per_identity), "failure_rate": n_failed / n_samples if n_samples else None}
    if n_failed:
        zmean, zlo, zhi = _finite(bootstrap_ci(zeroed, seed=seed))
        _, flo, fhi = _finite(bootstrap_ci(fail_rates, seed=seed))
        out.update(mean_failures_as_zero=zmean, ci95_failures_as_zero=[zlo, zhi], failure_rate_ci95=[flo, fhi])
    else:
        out.update(mean_failures_as_zero=mean, ci95_failures_as_zero=[lo, hi], failure_rate_ci95=[0.0, 0.0])
    return out


def aggregate(scores: dict, seed: int = 0) -> dict[str, Any]:
    """Per split and per identity statistics of every metric of one scored run."""
    rows = scores["samples"]
    statuses = scores["metrics"]
    splits: dict[str, dict] = {}
    identities: dict[str, dict] = {}
    for split in SPLITS:
        chosen = [r for r in rows if split == "all" or r.get("split") == split]
        splits[split] = {}
        for metric, status in statuses.items():
            if status["status"] != "ok":
                splits[split][metric] = {"status": "unavailable", "reason": status["reason"]}
                continue
            per_identity: dict[str, list[float | None]] = {}
            for r in chosen:
                if metric in r:  # an absent key does not apply to this sample (style of a realistic prompt)
                    per_identity.setdefault(r["identity"], []).append(r[metric])
            if not per_identity:
                continue
            splits[split][metric] = {"status": "ok", **_stats(per_identity, seed)}
            for ident, values in per_identity.items():
                stats = _stats({ident: values}, seed)
                identities.setdefault(ident, {}).setdefault(split, {})[metric] = {
                    k: stats[k] for k in ("mean", "mean_failures_as_zero", "failure_rate", "n_samples", "n_failed")}
    return {"splits": splits, "identities": identities}


def run_label(run_dir: Path, manifest: dict) -> str:
    cfg = manifest.get("config", {})
    steps = manifest.get("resolved", {}).get("steps", cfg.get("steps"))
    return f"{run_dir.name} ({cfg.get('backbone')}, {cfg.get('adapter') or 'no identity'}, {cfg.get('method')}, {steps} steps)"


# --- images --------------------------------------------------------------------------------------

def _thumb(path: Path, size: int = THUMB):
    from PIL import Image, ImageDraw

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        # A missing, truncated or garbled image is drawn as a marked blank, never a crash.
        canvas = Image.new("RGB", (size, size), (235, 235, 235))
        ImageDraw.Draw(canvas).text((6, size // 2 - 6), "damaged image", fill=(180, 0, 0))
        return canvas
    scale = size / max(img.size)
    # Tiny test images are enlarged with hard edges; photos are shrunk smoothly.
    resample = Image.NEAREST if scale > 1 else Image.BICUBIC
    img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), resample)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
    return canvas


def image_grid(run_dir: Path, records: dict[str, dict], split: str, out: Path, dataset_root: Path | None) -> Path | None:
    """Montage identity (rows) x prompt (columns), seed 0, with the reference photo first in each row."""
    from PIL import Image, ImageDraw

    chosen = [r for r in records.values() if r.get("seed_index") == 0 and (split == "all" or r.get("split") == split)]
    if not chosen:
        return None
    idents = sorted({r["identity"] for r in chosen})
    prompts = sorted({r["prompt_id"] for r in chosen})[:GRID_COLUMNS]
    by_cell = {(r["identity"], r["prompt_id"]): r for r in chosen}
    label_h, pad = 18, 4
    cols = len(prompts) + 1
    sheet = Image.new("RGB", (cols * (THUMB + pad) + pad, len(idents) * (THUMB + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, ident in enumerate(idents):
        y = pad + row * (THUMB + label_h + pad)
        ref = _reference_photo(dataset_root, ident)
        if ref is not None:
            sheet.paste(_thumb(ref), (pad, y))
        draw.text((pad, y + THUMB + 2), f"{ident} (reference)"[:22], fill=(0, 0, 0))
        for col, prompt_id in enumerate(prompts, start=1):
            x = pad + col * (THUMB + pad)
            record = by_cell.get((ident, prompt_id))
            if record is None:
                draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), outline=(200, 0, 0))
                continue
            sheet.paste(_thumb(run_dir / record["image"]), (x, y))
            draw.text((x, y + THUMB + 2), prompt_id, fill=(0, 0, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # a full disk leaves no half-written picture
        sheet.save(tmp, format="PNG")
    return out


def _reference_photo(dataset_root: Path | None, identity: str) -> Path | None:
    if dataset_root is None or not dataset_root.is_dir():
        return None
    try:
        from .dataset import load_dataset

        return load_dataset(dataset_root).identity(identity).photos[0]
    except InputError:
        return None


def _first_metric(splits: dict, prefix: str) -> str | None:
    for key, stats in splits.get("all", {}).items():
        if key.startswith(prefix) and stats.get("status") == "ok" and stats.get("mean") is not None:
            return key
    return None


def cost_plot(runs: list[dict], out: Path) -> Path:
    """Quality (identity similarity, CLIP-T, aesthetic where scored) against wall time per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = [("id.", "identity similarity"), ("clip_t.", "CLIP-T (full prompt)"), ("aesthetic", "aesthetic score")]
    panels = [(p, title) for p, title in quality if any(_first_metric(r["aggregate"]["splits"], p) for r in runs)]
    # With no quality metric scored there is still a cost trade-off to show: evaluations vs time.
    panels = panels or [("unet_evaluations", "cost only (no quality metric was scored)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (prefix, title) in zip(axes[0], panels):
        for r in runs:
            splits = r["aggregate"]["splits"]
            key = _first_metric(splits, prefix)
            cost = splits.get("all", {}).get("wall_ms", {})
            if key is None or cost.get("status") != "ok":
                continue
            y, (ylo, yhi) = splits["all"][key]["mean"], splits["all"][key]["ci95"]
            x, (xlo, xhi) = cost["mean"], cost["ci95"]
            ax.errorbar([x], [y], yerr=[[y - ylo], [yhi - y]], xerr=[[x - xlo], [xhi - x]], fmt="o", capsize=3)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_ylabel(key)
        ax.set_xlabel("wall ms per image (model loading excluded)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


# --- outputs -------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.4g}"
    return str(value)


def _csv_rows(runs: list[dict]) -> list[list[Any]]:
    header = ["run", "split", "identity", "metric", "status", "mean", "ci95_low", "ci95_high",
              "mean_failures_as_zero", "failure_rate", "n_samples", "n_failed", "reason"]
    rows: list[list[Any]] = [header]
    for r in runs:
        for split, metrics in r["aggregate"]["splits"].items():
            for metric, s in metrics.items():
                if s["status"] != "ok":
                    rows.append([r["name"], split, "*", metric, "unavailable", "", "", "", "", "", "", "", s["reason"]])
                    continue
                rows.append([r["name"], split, "*", metric, "ok", s["mean"], s["ci95"][0], s["ci95"][1],
                             s["mean_failures_as_zero"], s["failure_rate"], s["n_samples"], s["n_failed"], ""])
        for ident, by_split in r["aggregate"]["identities"].items():
            for split, metrics in by_split.items():
                for metric, s in metrics.items():
                    rows.append([r["name"], split, ident, metric, "ok", s["mean"], "", "", s["mean_failures_as_zero"],
                                 s["failure_rate"], s["n_samples"], s["n_failed"], ""])
    return rows


def _html_table(r: dict, split: str) -> str:
    metrics = r["aggregate"]["splits"].get(split, {})
    lines = ["<table><tr><th>metric</th><th>mean</th><th>95% CI</th><th>mean, failures as 0</th>"
             "<th>failure rate</th><th>samples</th><th>identities</th></tr>"]
    for metric, s in metrics.items():
        if s["status"] != "ok":
            lines.append(f"<tr class='na'><td>{html.escape(metric)}</td><td colspan='6'>unavailable: "
                         f"{html.escape(str(s['reason']))}</td></tr>")
            continue
        lines.append(
            f"<tr><td>{html.escape(metric)}</td><td>{_fmt(s['mean'])}</td>"
            f"<td>[{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]</td><td>{_fmt(s['mean_failures_as_zero'])}</td>"
            f"<td>{_fmt(s['failure_rate'])}</td><td>{s['n_samples']}</td><td>{s['n_identities']}</td></tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _identity_table(r: dict) -> str:
    idents = r["aggregate"]["identities"]
    metrics = [m for m, s in r["aggregate"]["splits"].get("all", {}).items() if s["status"] == "ok"]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    lines = [f"<table><tr><th>identity</th>{head}</tr>"]
    for ident, by_split in sorted(idents.items()):
        cells = "".join(f"<td>{_fmt(by_split.get('all', {}).get(m, {}).get('mean'))}</td>" for m in metrics)
        lines.append(f"<tr><td>{html.escape(ident)}</td>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}td:first-child,th:first-child{text-align:left}
tr.na td{color:#a33}img{max-width:100%}code{background:#f4f4f4;padding:1px 4px}"""


def build_report(run_dirs: Sequence[str | Path], out: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Aggregate scored runs into ``out``: report.json, report.csv, grid and plot PNGs, index.html."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    names: set[str] = set()
    for raw in run_dirs:
        run_dir = Path(raw).expanduser()
        manifest = read_manifest(run_dir)
        if manifest is None:
            raise InputError(f"{run_dir} is not a run folder (no manifest.json)")
        scores = load_scores(run_dir)
        name = run_dir.name or "run"
        while name in names:
            name += "_"
        names.add(name)
        records = load_records(run_dir)
        dataset_root = Path(manifest.get("dataset", {}).get("root", ""))
        grids = {}
        for split in ("realistic", "stylistic"):
            path = image_grid(run_dir, records, split, out / f"grid_{name}_{split}.png", dataset_root)
            if path is not None:
                grids[split] = path.name
        runs.append({"name": name, "run_dir": str(run_dir), "label": run_label(run_dir, manifest),
                     "config": manifest.get("config"), "dataset": manifest.get("dataset"),
                     "command": manifest.get("command"), "metrics": scores["metrics"],
                     "aggregate": aggregate(scores, seed=seed), "grids": grids})
    plot = cost_plot(runs, out / "quality_vs_cost.png")
    report = {"format": "fastface-eval-report/1", "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": seed,
              "level": 0.95, "unit": "identity"}, "runs": runs, "plot": plot.name}
    paths = {"json": out / "report.json", "csv": out / "report.csv", "html": out / "index.html", "plot": plot}
    _write(paths["json"], json.dumps(report, indent=2, default=str) + "\n")
    with atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(_csv_rows(runs))
    _write(paths["html"], _html(runs, plot.name))
    return paths


def _write(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def _html(runs: list[dict], plot: str) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>FastFace evaluation report</title>",
             f"<style>{_CSS}</style></head><body><h1>FastFace evaluation report</h1>",
             "<p>Means over identities with 95 % bootstrap confidence intervals (identities resampled). "
             "Identity metrics: the mean over images with a detected face, the mean with failures as 0, and the "
             "failure rate. Metrics whose model could not be had are marked unavailable, with the reason.</p>",
             "<h2>Quality versus cost</h2>", f"<img src='{html.escape(plot)}' alt='quality versus cost'>"]
    for r in runs:
        parts.append(f"<h2>{html.escape(r['label'])}</h2>")
        parts.append(f"<p>Run folder <code>{html.escape(r['run_dir'])}</code>; dataset fingerprint "
                     f"<code>{html.escape(str((r['dataset'] or {}).get('fingerprint', ''))[:16])}</code>; command "
                     f"<code>{html.escape(str(r['command']))}</code></p>")
        for split in SPLITS:
            parts.append(f"<h3>{split}</h3>")
            parts.append(_html_table(r, split))
            if split in r["grids"]:
                parts.append(f"<p>Images, seed 0 (rows: identities with their reference photo; columns: prompts)</p>"
                             f"<img src='{html.escape(r['grids'][split])}' alt='{split} grid'>")
        parts.append("<h3>Per identity (all prompts)</h3>")
        parts.append(_identity_table(r))
    parts.append("</body></html>")
    return "\n".join(parts)
