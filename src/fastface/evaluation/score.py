"""Scoring a run folder: per-image metrics cached on disk, then a per-sample table.

Cache: ``scores/<sample>.<scorer>.json`` holds the values and the key they were computed under
(scorer settings, image sha256, dataset fingerprint, reference image). A cached file with the same
key is reused, so re-scoring after adding samples only scores the new ones, and changing a model
re-scores only that model's metrics. Under ``accelerate launch`` / ``torchrun`` each process
scores its share; rank 0 waits for the others' files and writes the table.

Outputs: ``scores.json`` (metric status - available or unavailable with the reason - and one row of
values per sample) and ``scores.csv`` (the rows).

Only verified samples are scored: a record that does not parse, or whose image is missing or not
the bytes its ``image_sha256`` names (swapped, truncated, edited), is listed under ``damaged`` in
``scores.json`` and left out of the table, and its cached scores are never used.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import disk_full_as_error
from ..errors import ConfigError, FastFaceError, InputError
from . import metrics as M
from .lock import lock_run_folder
from .run import (
    MANIFEST,
    REPAIR_HINT,
    TMP_PREFIX,
    check_image,
    damaged_line,
    distributed_rank,
    load_records,
    read_manifest,
    scan_records,
    shard,
    write_json_atomic,
)

FAMILIES = ("identity", "clip", "aesthetic", "image-reward", "disruption", "cost")
DEFAULT_FACE_BACKENDS = ("arcface", "dlib", "facenet")
SCORES_FORMAT = "fastface-eval-scores/1"


def _env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = os.environ.get(name)
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else default


@dataclass
class ScoreOptions:
    """Which metrics, and where each scoring model comes from (hub id or local path).

    Defaults may be set through the environment: ``FASTFACE_CLIP_MODELS`` (comma-separated),
    ``FASTFACE_AESTHETIC_HEAD``, ``FASTFACE_IMAGE_REWARD``, ``FASTFACE_FACE_BACKENDS``.
    """

    metrics: tuple[str, ...] = FAMILIES
    face_backends: tuple[str, ...] = field(default_factory=lambda: _env_list("FASTFACE_FACE_BACKENDS", DEFAULT_FACE_BACKENDS))
    clip_models: tuple[str, ...] = field(default_factory=lambda: _env_list("FASTFACE_CLIP_MODELS", M.DEFAULT_CLIP_MODELS))
    aesthetic_head: str = field(default_factory=lambda: os.environ.get("FASTFACE_AESTHETIC_HEAD", M.DEFAULT_AESTHETIC_HEAD))
    aesthetic_clip: str | None = None  # default: the first CLIP model (ViT-L/14)
    image_reward: str = field(default_factory=lambda: os.environ.get("FASTFACE_IMAGE_REWARD", M.DEFAULT_IMAGE_REWARD))
    reference_run: Path | None = None
    dataset: Path | None = None  # default: the dataset folder named in the run's manifest
    crop_backend: str = "dlib"
    device: str | None = None
    wait_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(FAMILIES))
        if unknown:
            raise ConfigError(f"unknown metric family {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
        from ..faces import BACKENDS

        bad = [b for b in self.face_backends if b not in BACKENDS]
        if bad:
            raise ConfigError(f"unknown face backend {', '.join(bad)}; choose from {', '.join(BACKENDS)}")
        if not self.clip_models and ({"clip", "aesthetic", "disruption"} & set(self.metrics)):
            raise ConfigError("at least one CLIP model is needed for the clip, aesthetic and disruption metrics")


@dataclass
class ScorerState:
    scorer: M.Scorer
    status: str = "pending"  # "ok" | "unavailable" | "pending" (not loaded: every value was cached)
    reason: str | None = None

    def ensure_loaded(self) -> bool:
        if self.status == "pending":
            try:
                self.scorer.load()
                self.status = "ok"
            except M.Unavailable as exc:
                self.status, self.reason = "unavailable", str(exc)
        return self.status == "ok"


def build_scorers(options: ScoreOptions, reference_run: Path | None) -> list[ScorerState]:
    clips: dict[str, M.ClipModel] = {}

    def clip(name: str) -> M.ClipModel:
        if name not in clips:
            clips[name] = M.ClipModel(name, options.device)
        return clips[name]

    out: list[M.Scorer] = []
    if "identity" in options.metrics:
        out += [M.IdentityScorer(b) for b in options.face_backends]
    if "clip" in options.metrics:
        out += [M.ClipTextScorer(clip(name), options.crop_backend) for name in options.clip_models]
    if "aesthetic" in options.metrics:
        out.append(M.AestheticScorer(clip(options.aesthetic_clip or options.clip_models[0]), options.aesthetic_head))
    if "image-reward" in options.metrics:
        out.append(M.ImageRewardScorer(options.image_reward, options.device))
    if "disruption" in options.metrics:
        out.append(M.DisruptionScorer(clip(options.clip_models[0]), reference_run))
    return [ScorerState(s) for s in out]


def score_path(run_dir: Path, sample: str, scorer: str) -> Path:
    return run_dir / "scores" / f"{sample}.{scorer}.json"


def _read_cached(path: Path, key: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # an unreadable cache entry is recomputed, never trusted
    return data.get("values") if data.get("key") == key else None


_REFERENCE_MUST_MATCH = ("backbone", "steps", "height", "width", "dtype", "base_model", "negative_prompt", "batch_size")


def check_reference_run(run_dir: Path, manifest: dict, reference_run: Path) -> dict[str, dict]:
    """The reference run's records; refuses one made with identity or another generation setup."""
    ref_manifest = read_manifest(reference_run)
    if ref_manifest is None:
        raise InputError(f"--reference-run {reference_run} is not a run folder (no {MANIFEST})")
    ref_cfg, cfg = ref_manifest.get("config", {}), manifest.get("config", {})
    if ref_cfg.get("adapter") is not None:
        raise ConfigError(f"--reference-run {reference_run} was generated with adapter '{ref_cfg.get('adapter')}'; "
                          "it must be a run without identity (`fastface eval run --no-identity`)")
    diffs = [f"{k} {ref_cfg.get(k)!r} vs {cfg.get(k)!r}" for k in _REFERENCE_MUST_MATCH if ref_cfg.get(k) != cfg.get(k)]
    if ref_manifest.get("dataset", {}).get("fingerprint") != manifest.get("dataset", {}).get("fingerprint"):
        diffs.append("dataset fingerprint")
    if diffs:
        raise ConfigError(f"--reference-run {reference_run} differs from {run_dir} in: " + ", ".join(diffs))
    return load_records(reference_run)


def _load_dataset_for(manifest: dict, options: ScoreOptions):
    """The run's dataset (identity photos are needed for identity metrics), checked by fingerprint."""
    from .dataset import load_dataset

    root = options.dataset or Path(manifest.get("dataset", {}).get("root", ""))
    if not root or not Path(root).is_dir():
        return None, f"the run's dataset folder '{root}' is not here; pass it with --dataset"
    dataset = load_dataset(root)
    if dataset.fingerprint() != manifest["dataset"]["fingerprint"]:
        raise InputError(f"dataset {root} is not the one this run was generated from (fingerprint differs)")
    return dataset, None


def score_run(run_dir: str | Path, options: ScoreOptions | None = None, *, progress: bool = True) -> dict:
    """Score every verified sample of a run (this process's share) and, on rank 0, write the table.

    Damaged samples (see the module) are not scored; they are returned under ``damaged``
    (sample id -> what is wrong), and the CLI turns them into an error.
    """
    options = options or ScoreOptions()
    run_dir = Path(run_dir).expanduser()
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise InputError(f"{run_dir} is not a run folder (no {MANIFEST}); make one with `fastface eval run`")
    with lock_run_folder(run_dir, "fastface eval score"):
        return _score_locked(run_dir, manifest, options, progress)


def _score_locked(run_dir: Path, manifest: dict, options: ScoreOptions, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from .. import faces

    records, damaged = scan_records(run_dir, verify_images=True)
    if not records:
        if damaged:
            raise InputError(f"nothing to score: {damaged_line(run_dir, damaged)}; {REPAIR_HINT}")
        raise InputError(f"{run_dir} holds no finished sample yet")
    rank, world = distributed_rank()
    reference = Path(options.reference_run).expanduser() if options.reference_run else None
    ref_records = check_reference_run(run_dir, manifest, reference) if reference else {}
    for sample in sorted(set(ref_records) & set(records)):
        problem = check_image(reference, ref_records[sample])
        if problem:  # no disruption value against a reference image that is not what was generated
            damaged[sample] = f"{reference / ref_records.pop(sample)['image']} (reference run): {problem}"
            del records[sample]
    dataset, dataset_problem = _load_dataset_for(manifest, options)
    states = build_scorers(options, reference)
    for state in states:
        if isinstance(state.scorer, M.IdentityScorer) and dataset is None:
            state.status, state.reason = "unavailable", dataset_problem
    reference_photos = int(manifest["config"].get("reference_photos", 1))
    common = {"dataset": manifest["dataset"]["fingerprint"], "reference_photos": reference_photos}

    def key_for(state: ScorerState, record: dict) -> dict:
        key = {"scorer": state.scorer.name, "spec": state.scorer.spec(), "image_sha256": record["image_sha256"], **common}
        if isinstance(state.scorer, M.DisruptionScorer):
            ref = ref_records.get(record["sample"])
            key["reference_sha256"] = None if ref is None else ref["image_sha256"]
        return key

    with disk_full_as_error(run_dir / "scores"):
        (run_dir / "scores").mkdir(exist_ok=True)
    mine = shard(sorted(records), rank, world)
    # Temporaries of killed scorers: each rank removes those of its own share (another rank of this
    # launch may be writing its own right now), rank 0 also those no rank will write.
    _clean_temporaries(run_dir / "scores", {score_path(run_dir, s, st.scorer.name).name for s in mine for st in states},
                       {score_path(run_dir, s, st.scorer.name).name for s in records for st in states}, rank)
    todo = [(s, [st for st in states if st.status != "unavailable"
                 and _read_cached(score_path(run_dir, s, st.scorer.name), key_for(st, records[s])) is None])
            for s in mine]
    todo = [(s, pending) for s, pending in todo if pending]
    crop_detector = None
    bar = tqdm(todo, desc="scoring" if world == 1 else f"scoring [rank {rank}/{world}]", unit="img",
               disable=not progress, dynamic_ncols=True)
    for sample, pending in bar:
        record = records[sample]
        ctx = M.SampleContext(sample=sample, record=record, image=faces.load_image(run_dir / record["image"]),
                              identity_photos=((), ()))
        if dataset is not None:
            ctx.identity_photos = dataset.identity(record["identity"]).split_photos(reference_photos)
        ref = ref_records.get(sample)
        if ref is not None:
            ctx.reference_image = faces.load_image(reference / ref["image"])
        if crop_detector is None and any(isinstance(st.scorer, M.ClipTextScorer) for st in pending):
            crop_detector = _crop_detector(options.crop_backend)
        ctx.crop_detector = crop_detector or None
        for state in pending:
            if not state.ensure_loaded():
                continue
            values = state.scorer.score(ctx)
            write_json_atomic(score_path(run_dir, sample, state.scorer.name),
                              {"key": key_for(state, record), "values": values})
    bar.close()
    if rank != 0:
        return {"rank": rank, "world_size": world, "scored": len(todo)}
    table = _collect(run_dir, records, states, key_for, options.wait_timeout_s if world > 1 else 0.0,
                     "cost" in options.metrics)
    status = {}
    for state in states:
        st = "ok" if state.status in ("ok", "pending") else "unavailable"
        for key in state.scorer.metric_keys():
            status[key] = {"status": st, "reason": state.reason, "scorer": state.scorer.name,
                           "description": state.scorer.description, "settings": state.scorer.spec()}
    for key in M.COST_KEYS if "cost" in options.metrics else ():
        status[key] = {"status": "ok", "reason": None, "scorer": "records", "description": "cost from the run records",
                       "settings": {}}
    result = {"format": SCORES_FORMAT, "run": str(run_dir), "config": manifest["config"],
              "dataset": manifest["dataset"]["fingerprint"], "reference_run": str(reference) if reference else None,
              "metrics": status, "samples": table, "scored_now": len(todo), "damaged": damaged}
    write_json_atomic(run_dir / "scores.json", result)
    _write_csv(run_dir / "scores.csv", table, list(status))
    return result


def _clean_temporaries(folder: Path, mine: set[str], everyone: set[str], rank: int) -> None:
    for path in folder.glob(f"{TMP_PREFIX}*"):
        stem, _, suffix = path.name[len(TMP_PREFIX):].rpartition(".")  # "<sample>.<scorer>.<pid>", "json"
        final = f"{stem.rpartition('.')[0]}.{suffix}"
        if final in mine or (rank == 0 and final not in everyone):
            path.unlink(missing_ok=True)


def _crop_detector(name: str) -> Any:
    """The face detector for the style crop; False when it is not available (then no crop)."""
    from .. import faces

    try:
        return faces.get_backend(name)
    except FastFaceError:
        return False


def _collect(run_dir: Path, records: dict[str, dict], states: list[ScorerState], key_for, timeout_s: float,
             include_cost: bool) -> list[dict]:
    """One row per sample: its grid position, cost and every cached value (waiting for other ranks)."""
    deadline = time.monotonic() + timeout_s
    rows = []
    for sample in sorted(records):
        record = records[sample]
        row: dict[str, Any] = {k: record.get(k) for k in ("sample", "identity", "prompt_id", "split", "seed_index", "seed")}
        row.update(M.cost_values(record) if include_cost else {})
        for state in states:
            if state.status == "unavailable":
                continue
            path = score_path(run_dir, sample, state.scorer.name)
            values = _read_cached(path, key_for(state, record))
            while values is None and time.monotonic() < deadline:
                time.sleep(0.5)
                values = _read_cached(path, key_for(state, record))
            if values is None:
                row.setdefault("missing", []).append(state.scorer.name)
                continue
            row.update(values)
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict], metric_keys: list[str]) -> None:
    head = ["sample", "identity", "prompt_id", "split", "seed_index", "seed"]
    columns = head + [k for k in metric_keys if k not in head]
    tmp = path.with_name(f"{TMP_PREFIX}{path.stem}.{os.getpid()}{path.suffix}")
    try:
        with disk_full_as_error(path):
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(columns)
                for row in rows:
                    writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_scores(run_dir: str | Path) -> dict:
    """A run's ``scores.json``; a missing, damaged or foreign one is one clear error saying how to remake it."""
    path = Path(run_dir).expanduser() / "scores.json"
    remake = f"run `fastface eval score --run-dir {run_dir}`"
    if not path.is_file():
        raise InputError(f"{run_dir} has not been scored (no scores.json); {remake}")
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is damaged (not valid JSON: {getattr(exc, 'msg', exc)}); {remake} to rewrite it") from None
    if not isinstance(scores, dict) or scores.get("format") != SCORES_FORMAT \
            or not isinstance(scores.get("metrics"), dict) or not isinstance(scores.get("samples"), list) \
            or not all(isinstance(row, dict) for row in scores["samples"]):
        raise InputError(f"{path} is not a FastFace scores table (format {SCORES_FORMAT}); {remake} to rewrite it")
    return scores
