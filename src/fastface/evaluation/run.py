"""Generation over the grid identity x prompt x seed, resumable and splittable across processes.

A run folder::

    manifest.json        configuration, dataset fingerprint, grid, versions, command, history
    REPRODUCE.md         how to regenerate this folder, in words and one command
    images/<sample>.png  one image per sample
    records/<sample>.json  the sample's metadata; a sample is done iff this file exists

Every file is written to a temporary name in the same folder and renamed into place, image first,
record last, so a kill at any moment leaves either a complete sample or one that is redone (and a
temporary file that the next start removes). Samples are generated in fixed chunks of seeds of one
(identity, prompt), so the batch every image was made in does not depend on what was already done
or on how the work was split: a resumed or distributed run gives the same bytes as one straight run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from .dataset import Dataset, Prompt, load_dataset

RUN_FORMAT = "fastface-eval-run/1"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides the pixels of a run; resuming with any field changed is refused.

    The fields mirror the options of ``fastface generate`` (``commands.add_generation_options``);
    the device and ``--cpu-offload`` are not part of it (they move weights, not pixels: a run may
    change GPU or start offloading), but each record names them. ``vae``/``vae_tiling`` are: they
    change the decoded pixels.
    """

    backbone: str = "hyper-4"
    adapter: str | None = "faceid"
    method: str = "fastface"
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    ip_scale: float = 0.8
    lora_scale: float = 1.0
    alpha: str | None = None
    beta: str | None = None
    rescale: float | None = None
    rescale_on: str | None = None
    face_backend: str | None = None
    base_model: str | None = None
    adapter_path: str | None = None
    image_encoder: str | None = None
    lora: tuple[str, ...] = ()
    dtype: str = "auto"
    vae: str | None = None
    vae_tiling: bool = False
    negative_prompt: str | None = None
    reference_photos: int = 1
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.reference_photos < 1:
            raise ConfigError(f"--reference-photos must be at least 1, got {self.reference_photos}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.adapter == "none":
            object.__setattr__(self, "adapter", None)
        if self.vae == "default":
            object.__setattr__(self, "vae", None)
        object.__setattr__(self, "lora", tuple(self.lora))

    @property
    def identity(self) -> bool:
        return self.adapter is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["lora"] = list(self.lora)
        return data

    def namespace(self, device: str = "auto", cpu_offload: bool = False, compile: bool = False) -> argparse.Namespace:
        """The options as ``fastface generate`` parses them, for the engine's own checks and loaders."""
        return argparse.Namespace(**{**asdict(self), "lora": list(self.lora), "device": device,
                                     "cpu_offload": cpu_offload, "compile": compile})

    @staticmethod
    def option(field_name: str) -> str:
        return OPTION_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


OPTION_NAMES = {"adapter": "--adapter/--no-identity"}


@dataclass(frozen=True)
class Grid:
    """Which part of the dataset a run covers; it may grow between resumes (more seeds, prompts)."""

    seeds: int = 1
    split: str = "all"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {self.seeds}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")


@dataclass(frozen=True)
class Sample:
    identity: str
    prompt: Prompt
    seed_index: int
    seed: int

    @property
    def id(self) -> str:
        return sample_id(self.identity, self.prompt.id, self.seed_index)


def sample_id(identity: str, prompt_id: str, seed_index: int) -> str:
    return f"{identity}__{prompt_id}__{seed_index:02d}"


def derive_seed(identity: str, prompt_id: str, seed_index: int) -> int:
    """seed = first 31 bits of sha256("fastface-eval", identity, prompt id, seed index).

    Independent of the order of work, the grid size and the process count, so any sample can be
    regenerated alone; 31 bits fit every generator (torch, numpy, JAX).
    """
    digest = hashlib.sha256(f"fastface-eval\0{identity}\0{prompt_id}\0{seed_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def work_units(dataset: Dataset, grid: Grid, batch_size: int) -> list[list[Sample]]:
    """The grid in canonical order, cut into chunks of seeds of one (identity, prompt).

    Chunk c holds seed indices [c*B, (c+1)*B), whatever the total number of seeds, so a sample's
    batch companions are fixed by the configuration alone.
    """
    prompts = dataset.select_prompts(grid.split, grid.limit)
    units: list[list[Sample]] = []
    for entry in dataset.identities:
        for prompt in prompts:
            for start in range(0, grid.seeds, batch_size):
                stop = min(start + batch_size, grid.seeds)
                units.append([Sample(entry.id, prompt, k, derive_seed(entry.id, prompt.id, k)) for k in range(start, stop)])
    return units


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun, accelerate launch); (0, 1) alone."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE must be integers ({exc})") from exc
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Round-robin share of one process: item i goes to rank i mod world."""
    return [item for i, item in enumerate(items) if i % world == rank]


# --- atomic files ----------------------------------------------------------------------------------

def _tmp_path(final: Path) -> Path:
    # The pid keeps two writers of the same file (two ranks writing a shared file) apart.
    return final.with_name(f"{TMP_PREFIX}{final.stem}.{os.getpid()}{final.suffix}")


def _commit(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
    _commit(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    _commit(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return repr(value)


def _sample_of_tmp(name: str) -> str:
    """The sample id inside a temporary file name ``.tmp-<sample>.<pid>.<ext>``."""
    return name[len(TMP_PREFIX):].rsplit(".", 2)[0]


def clean_stale(run_dir: Path, mine: set[str], everyone: set[str], rank: int) -> int:
    """Remove leftovers of killed writers: temp files of this rank's samples, and (rank 0) of
    samples outside the grid and of the manifest. Another rank's live temp files are never touched."""
    removed = 0
    for folder in (run_dir / "images", run_dir / "records"):
        if not folder.is_dir():
            continue
        for path in folder.glob(f"{TMP_PREFIX}*"):
            sample = _sample_of_tmp(path.name)
            if sample in mine or (rank == 0 and sample not in everyone):
                path.unlink(missing_ok=True)
                removed += 1
    if rank == 0:
        for path in run_dir.glob(f"{TMP_PREFIX}*"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# --- manifest ----------------------------------------------------------------------------------

def software_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for package in ("fastface", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
                    "numpy", "pillow", "dlib-bin", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        versions["cuda"] = str(torch.version.cuda) if torch.version.cuda else "none"
    except ImportError:
        pass
    return versions


def canonical_command(config: RunConfig, grid: Grid, dataset_dir: str, run_dir: str) -> list[str]:
    """`fastface eval run` with every option written out, so the defaults of a later version don't matter."""
    cmd = ["fastface", "eval", "run", "--dataset", dataset_dir, "--run-dir", run_dir,
           "--seeds", str(grid.seeds), "--split", grid.split]
    if grid.limit is not None:
        cmd += ["--limit", str(grid.limit)]
    cmd += ["--backbone", config.backbone, "--method", config.method]
    cmd += ["--no-identity"] if config.adapter is None else ["--adapter", config.adapter]
    for name in ("steps", "height", "width", "ip_scale", "lora_scale", "alpha", "beta", "rescale", "rescale_on",
                 "face_backend", "base_model", "adapter_path", "image_encoder", "dtype", "vae", "negative_prompt",
                 "reference_photos", "batch_size"):
        value = getattr(config, name)
        if value is not None:
            cmd += [RunConfig.option(name), str(value)]
    for item in config.lora:
        cmd += ["--lora", item]
    if config.vae_tiling:
        cmd += ["--vae-tiling"]
    return cmd


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for f in fields(RunConfig):
        # A field missing from an older manifest had its default value then (added later).
        default = f.default if f.default is not MISSING else None
        if old.get(f.name, default) != new.get(f.name):
            out.append(f"{RunConfig.option(f.name)} is {new.get(f.name)!r} here but {old.get(f.name)!r} in the run")
    return out


def read_manifest(run_dir: Path) -> dict | None:
    path = run_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); is this a FastFace run folder?") from exc


def check_compatible(manifest: dict, config: RunConfig, fingerprint: str, run_dir: Path) -> None:
    if manifest.get("format") != RUN_FORMAT:
        raise InputError(f"{run_dir} holds a manifest of another format ({manifest.get('format')!r})")
    diffs = _differences(manifest.get("config", {}), config.to_dict())
    if diffs:
        raise ConfigError(f"refusing to resume {run_dir} with a different configuration: " + "; ".join(diffs)
                          + " (use a new --run-dir, or the run's own options: see its REPRODUCE.md)")
    old_fp = manifest.get("dataset", {}).get("fingerprint")
    if old_fp != fingerprint:
        raise InputError(f"refusing to resume {run_dir}: --dataset differs (fingerprint {fingerprint[:12]} here, "
                         f"{str(old_fp)[:12]} in the run): photos or prompts changed")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_manifest(previous: dict | None, config: RunConfig, grid: Grid, dataset: Dataset, fingerprint: str,
                   command: list[str], n_samples: int, world: int, resolved: dict | None = None) -> dict:
    entry = {"time": _now(), "command": shlex.join(command), "grid": asdict(grid), "processes": world}
    history = list(previous.get("history", [])) if previous else []
    history.append(entry)
    return {
        "format": RUN_FORMAT,
        "config": config.to_dict(),
        "resolved": resolved or {},
        "grid": asdict(grid),
        "samples": n_samples,
        "dataset": {"fingerprint": fingerprint, **dataset.summary()},
        "versions": software_versions(),
        "command": shlex.join(command),
        "canonical_command": shlex.join(canonical_command(config, grid, str(dataset.root), "RUN_DIR")),
        "seeds": "sha256('fastface-eval', identity, prompt id, seed index), first 31 bits",
        "created": previous.get("created", entry["time"]) if previous else entry["time"],
        "history": history,
    }


def reproduce_text(manifest: dict) -> str:
    ds = manifest["dataset"]
    lines = [
        "# How to reproduce this run",
        "",
        "This folder was made by the FastFace evaluation protocol (docs/PROTOCOL.md).",
        "",
        "1. Install the same software (versions below), e.g. `pip install fastface==" + manifest["versions"].get("fastface", "?") + "`.",
        f"2. Get the dataset with fingerprint `{ds['fingerprint']}` ({ds['identities']} identities, {ds['photos']} photos, "
        f"prompts {ds['prompts']}); `fastface eval dataset check DIR` prints a dataset's fingerprint. "
        "The bundled smoke set is written by `fastface eval dataset init DIR`.",
        "3. Run, with RUN_DIR a new folder (every option written out):",
        "",
        "```",
        manifest["canonical_command"],
        "```",
        "",
        "The command as typed: `" + manifest["command"] + "`",
        "",
        "Each sample's seed is " + manifest["seeds"] + ", so any single sample can be regenerated alone; "
        "under `accelerate launch` / `torchrun` the same command splits the grid across processes.",
        "",
        "## Software",
        "",
        *[f"- {k}: {v}" for k, v in sorted(manifest["versions"].items())],
        "",
        "## Configuration",
        "",
        *[f"- {k}: {v}" for k, v in sorted(manifest["config"].items())],
        "",
    ]
    return "\n".join(lines)


def _wait_for_manifest(run_dir: Path, config: RunConfig, grid: Grid, fingerprint: str, timeout_s: float) -> None:
    """Ranks other than 0 wait until rank 0 has written (or updated) the manifest for this grid."""
    deadline = time.monotonic() + timeout_s
    while True:
        manifest = read_manifest(run_dir)
        if manifest is not None:
            check_compatible(manifest, config, fingerprint, run_dir)
            if manifest.get("grid") == asdict(grid):
                return
        if time.monotonic() > deadline:
            raise InputError(f"rank 0 did not write {run_dir / MANIFEST} within {timeout_s:.0f} s")
        time.sleep(0.2)


# --- generation --------------------------------------------------------------------------------

@dataclass
class RunSummary:
    run_dir: Path
    total: int  # samples in the grid
    assigned: int  # samples of this process
    generated: int  # samples made by this call
    skipped: int  # samples of this process already done
    rank: int
    world: int
    seconds: float


def record_path(run_dir: Path, sample: str) -> Path:
    return run_dir / "records" / f"{sample}.json"


def image_path(run_dir: Path, sample: str) -> Path:
    return run_dir / "images" / f"{sample}.png"


def load_records(run_dir: Path) -> dict[str, dict]:
    """Every finished sample's record, by sample id."""
    out = {}
    folder = Path(run_dir) / "records"
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(TMP_PREFIX):
            continue
        out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return out


class _PeakMemory:
    """Peak memory of one generation call: CUDA allocator peak on a GPU, else the process RSS peak."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available()
        self.device = device

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> tuple[float, str]:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        import resource

        # Linux reports kilobytes; the process peak includes the loaded models.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def resolve_run_config(config: RunConfig) -> dict[str, Any]:
    """The engine's own check of every name and number (no model loads), plus the face backend."""
    from .. import commands
    from ..adapters import spec_for_backbone

    resolved = commands.resolve_config(config.namespace())
    resolved["face_backend"] = None
    if config.adapter is not None:
        resolved["face_backend"] = config.face_backend or spec_for_backbone(config.adapter, config.backbone).face_backend
    return resolved


def _device_for_rank(device: str | None) -> str:
    """Under a launcher each local rank takes its own GPU unless a device index was given."""
    device = device or "auto"
    local = os.environ.get("LOCAL_RANK")
    if local is not None and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(local) % torch.cuda.device_count()}"
    return device


def run_grid(config: RunConfig, dataset_dir: str | Path, run_dir: str | Path, grid: Grid | None = None, *,
             device: str | None = None, command: Sequence[str] | None = None, progress: bool = True,
             manifest_timeout_s: float = 600.0, cpu_offload: bool = False, compile: bool = False) -> RunSummary:
    """Generate the missing samples of this process's share of the grid into ``run_dir``."""
    from tqdm.auto import tqdm

    grid = grid or Grid()
    started = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    dataset = load_dataset(dataset_dir)
    if dataset.issues:
        raise InputError(f"dataset {dataset.root} is not valid: " + "; ".join(dataset.issues)
                         + " (see `fastface eval dataset check`)")
    resolved = resolve_run_config(config)
    fingerprint = dataset.fingerprint()
    rank, world = distributed_rank()
    units = work_units(dataset, grid, config.batch_size)
    n_total = sum(len(u) for u in units)
    if n_total == 0:
        raise InputError(f"the grid is empty: split '{grid.split}' of {dataset.root} has no prompts")
    command = list(command) if command is not None else ["fastface", *sys.argv[1:]]
    everyone = {s.id for u in units for s in u}

    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(run_dir)
    if previous is not None:
        check_compatible(previous, config, fingerprint, run_dir)
    if rank == 0:
        clean_stale(run_dir, set(), everyone, rank)
        described = {"face_backend": resolved["face_backend"], "steps": resolved["steps"],
                     "method": resolved["method"].to_dict(), "guidance": resolved["guidance"]}
        manifest = build_manifest(previous, config, grid, dataset, fingerprint, command, n_total, world, described)
        write_json_atomic(run_dir / MANIFEST, manifest)
        write_text_atomic(run_dir / "REPRODUCE.md", reproduce_text(manifest))
    else:
        _wait_for_manifest(run_dir, config, grid, fingerprint, manifest_timeout_s)
    (run_dir / "images").mkdir(exist_ok=True)
    (run_dir / "records").mkdir(exist_ok=True)

    mine = shard(units, rank, world)
    mine_ids = {s.id for u in mine for s in u}
    clean_stale(run_dir, mine_ids, everyone, rank)
    pending = [u for u in mine if any(not record_path(run_dir, s.id).is_file() for s in u)]
    todo = sum(1 for u in pending for s in u if not record_path(run_dir, s.id).is_file())
    summary = RunSummary(run_dir, n_total, len(mine_ids), 0, len(mine_ids) - todo, rank, world, 0.0)
    if not pending:
        summary.seconds = time.perf_counter() - started
        return summary

    from .. import commands

    # Identities first: a photo without a face fails here, before the minutes of a model load.
    identities = {}
    if config.identity:
        for ident in dict.fromkeys(u[0].identity for u in pending):
            conditioning, _ = dataset.identity(ident).split_photos(config.reference_photos)
            identities[ident] = commands.load_identity([str(p) for p in conditioning], resolved["face_backend"],
                                                       _adapter_spec(config))
    pipe = commands.load_pipeline(config.namespace(_device_for_rank(device), cpu_offload, compile), resolved)
    gen_device = getattr(pipe, "device", "cpu")
    memory = _PeakMemory(gen_device)
    tokens_by_identity: dict[str, Any] = {}
    prompt_embeds: dict[str, Any] = {}
    bar = tqdm(total=todo, desc=f"generating{'' if world == 1 else f' [rank {rank}/{world}]'}", unit="img",
               disable=not progress, dynamic_ncols=True)
    try:
        for unit in pending:
            first = unit[0]
            face = tokens = None
            if config.identity:
                face = identities[first.identity]
                if first.identity not in tokens_by_identity:
                    tokens_by_identity[first.identity] = pipe.encode_identity(face)
                tokens = tokens_by_identity[first.identity]
            if first.prompt.id not in prompt_embeds:
                prompt_embeds[first.prompt.id] = pipe.encode_prompt(first.prompt.text, config.negative_prompt)
            memory.start()
            t0 = time.perf_counter()
            result = pipe(first.prompt.text, None, method=resolved["method"].name, guidance=resolved["guidance"],
                          negative_prompt=config.negative_prompt, num_images_per_prompt=len(unit),
                          seed=[s.seed for s in unit], steps=resolved["steps"], height=config.height,
                          width=config.width, ip_scale=config.ip_scale, lora_scale=config.lora_scale,
                          output_type="pil", progress=False, prompt_embeds=prompt_embeds[first.prompt.id],
                          identity_tokens=tokens)
            peak_mb, peak_kind = memory.stop()  # synchronises a GPU before the clock stops
            wall_ms = (time.perf_counter() - t0) * 1000.0
            for sample, image, meta in zip(unit, result.images, result.metadata):
                if record_path(run_dir, sample.id).is_file():
                    continue  # done before a kill; its batch companions were the reason to regenerate
                _write_sample(run_dir, sample, image, meta, {
                    "wall_ms": wall_ms / len(unit), "batch_wall_ms": wall_ms, "batch_size": len(unit),
                    "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind, "device": str(gen_device),
                    "rank": rank, "world_size": world})
                summary.generated += 1
                bar.update(1)
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - started
    return summary


def _adapter_spec(config: RunConfig) -> Any:
    from ..adapters import spec_for_backbone

    return spec_for_backbone(config.adapter, config.backbone)


def _write_sample(run_dir: Path, sample: Sample, image: Any, meta: dict, extra: dict) -> None:
    final_image = image_path(run_dir, sample.id)
    tmp_image = _tmp_path(final_image)
    image.save(tmp_image, format="PNG")
    _commit(tmp_image, final_image)
    digest = hashlib.sha256(final_image.read_bytes()).hexdigest()
    record = {
        "sample": sample.id,
        "identity": sample.identity,
        "prompt_id": sample.prompt.id,
        "split": sample.prompt.split,
        "prompt": sample.prompt.text,
        "style": sample.prompt.style,
        "content": sample.prompt.content,
        "seed_index": sample.seed_index,
        "seed": sample.seed,
        "image": f"images/{final_image.name}",
        "image_sha256": digest,
        "width": image.size[0],
        "height": image.size[1],
        "unet_evaluations": meta.get("unet_evaluations"),
        "timings_ms": meta.get("timings_ms"),
        "created": _now(),
        **extra,
        "metadata": meta,
    }
    write_json_atomic(record_path(run_dir, sample.id), record)
