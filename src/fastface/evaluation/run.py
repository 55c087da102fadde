"""Generation over the grid identity x prompt x seed, resumable and splittable across processes.

A run folder::

    manifest.json        configuration, dataset fingerprint, grid, versions, command, history
    REPRODUCE.md         how to regenerate this folder, in words and one command
    images/<sample>.png  one image per sample
    records/<sample>.json  the sample's metadata, with the sha256 of its image
    .lock                who is writing the folder (``lock.py``): one command at a time

A sample is done iff its record parses, names its sample, and its image exists with the recorded
sha256; a resumed run checks exactly that and regenerates any sample that fails it (a deleted,
truncated or swapped image, a garbled record). Every file is written to a temporary name in the
same folder and renamed into place, image first, record last, so a kill at any moment leaves
either a complete sample or one that is redone (and a temporary file that the next start removes). Samples are generated in fixed chunks of seeds of one
(identity, prompt), so the batch every image was made in does not depend on what was already done
or on how the work was split: a resumed or distributed run gives the same bytes as one straight run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomic import disk_full_as_error, ensure_writable_dir
from ..errors import ConfigError, InputError
from .dataset import Dataset, Prompt, file_sha256, load_dataset
from .lock import lock_run_folder

RUN_FORMAT = "fastface-eval-run/1"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides the pixels of a run; resuming with any field changed is refused.

    The fields mirror the options of ``fastface generate`` (``commands.add_generation_options``);
    the device, ``--cpu-offload``, ``--compile`` and ``--limits`` are not part of it (they move
    weights or raise bounds, not pixels: a run may change GPU or start offloading), but each record
    names the device. ``vae``/``vae_tiling`` are: they
    change the decoded pixels.
    """

    backbone: str = "hyper-4"
    adapter: str | None = "faceid"
    method: str = "fastface"
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    ip_scale: float | None = None  # None: presets.DEFAULT_IP_SCALE (filled in on creation)
    lora_scale: float = 1.0
    alpha: str | None = None
    beta: str | None = None
    rescale: float | None = None
    rescale_on: str | None = None
    face_backend: str | None = None
    base_model: str | None = None
    adapter_path: str | None = None
    image_encoder: str | None = None
    controlnet_scale: float | None = None  # instantid (None: the adapter's default)
    sampler: str | None = None  # sample --base-model like this backbone (generate --sampler)
    scheduler: str | None = None  # another scheduler (PuLID's recipes)
    cfg_scale: float | None = None  # the backbone's stock CFG scale
    lora: tuple[str, ...] = ()
    dtype: str = "auto"
    vae: str | None = None
    vae_tiling: bool = False
    negative_prompt: str | None = None
    reference_photos: int = 1
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.ip_scale is None:
            from ..presets import DEFAULT_IP_SCALE

            object.__setattr__(self, "ip_scale", DEFAULT_IP_SCALE)
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

    def generation_config(self, device: str = "auto", cpu_offload: bool = False, compile: bool = False,
                          limits: str | None = None) -> Any:
        """The :class:`~fastface.config.GenerationConfig` of this run (prompts and seeds come per batch)."""
        from ..commands import parse_lora
        from ..config import GenerationConfig, Limits

        return GenerationConfig(
            negative_prompt=self.negative_prompt, backbone=self.backbone, adapter=self.adapter,
            method=self.method, steps=self.steps, height=self.height, width=self.width,
            ip_scale=float(self.ip_scale), lora_scale=self.lora_scale, alpha=self.alpha, beta=self.beta,
            rescale=self.rescale, rescale_on=self.rescale_on, face_backend=self.face_backend,
            base_model=self.base_model, adapter_path=self.adapter_path, image_encoder=self.image_encoder,
            loras=tuple(parse_lora(item) for item in self.lora), device=device, dtype=self.dtype, vae=self.vae,
            vae_tiling=self.vae_tiling, cpu_offload=cpu_offload, compile=compile,
            adapter_options={} if self.controlnet_scale is None else {"controlnet_scale": self.controlnet_scale},
            sampler=self.sampler, scheduler=self.scheduler, cfg_scale=self.cfg_scale,
            limits=Limits.parse(limits) if limits else Limits(),
        )

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


def _write_via_tmp(path: Path, write) -> None:
    """``write(tmp)``, then rename into place; on any failure (a full disk) no temporary is left."""
    tmp = _tmp_path(path)
    try:
        with disk_full_as_error(path):
            write(tmp)
            _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    _write_via_tmp(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_text_atomic(path: Path, text: str) -> None:
    _write_via_tmp(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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

    from ..provenance import describe

    source = describe()
    # FastFace's own version comes from the package, never from the index (another project owns
    # the name "fastface" there); the commit says exactly which code ran.
    versions = {"python": sys.version.split()[0], "fastface": source["version"], "fastface_commit": source["commit"]}
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
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
                 "face_backend", "base_model", "sampler", "scheduler", "cfg_scale", "adapter_path", "image_encoder",
                 "controlnet_scale", "dtype", "vae",
                 "negative_prompt",
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
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); is this a FastFace run folder?") from None
    if not isinstance(manifest, dict) or manifest.get("format") != RUN_FORMAT or not isinstance(manifest.get("config"), dict) \
            or not isinstance(manifest.get("dataset"), dict):
        raise InputError(f"{path} is not a FastFace run manifest (format {RUN_FORMAT}); "
                         "is this a FastFace run folder?")
    return manifest


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


def _install_step(versions: dict) -> str:
    from ..provenance import DIST_NAME

    commit = str(versions.get("fastface_commit", ""))
    version = versions.get("fastface", "?")
    if commit and not commit.startswith("unreleased"):
        sha = commit.removesuffix("+dirty")
        dirty = " (the run had uncommitted changes on top of it)" if commit.endswith("+dirty") else ""
        return (f"FastFace {version} at commit `{sha}`{dirty}: `git checkout {sha}` in a FastFace checkout, "
                f"then `pip install -e \".[eval]\"` (distribution `{DIST_NAME}`).")
    return (f"FastFace {version}, unreleased (no source commit was recorded): use the same source tree, "
            f"installed with `pip install -e \".[eval]\"` (distribution `{DIST_NAME}`).")


def reproduce_text(manifest: dict) -> str:
    ds = manifest["dataset"]
    lines = [
        "# How to reproduce this run",
        "",
        "This folder was made by the FastFace evaluation protocol (docs/PROTOCOL.md).",
        "",
        "1. Install the same software (versions below): " + _install_step(manifest["versions"]),
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
    generated: int  # samples made by this call (the repaired ones included)
    skipped: int  # samples of this process already done, verified
    rank: int
    world: int
    seconds: float
    repaired: dict[str, str] = field(default_factory=dict)  # damaged sample -> what was wrong; regenerated


def record_path(run_dir: Path, sample: str) -> Path:
    return run_dir / "records" / f"{sample}.json"


def image_path(run_dir: Path, sample: str) -> Path:
    return run_dir / "images" / f"{sample}.png"


RECORD_KEYS = ("sample", "identity", "prompt_id", "seed_index", "seed", "image", "image_sha256")
REPAIR_HINT = ("rerun `fastface eval run` on this folder with the run's options (see its REPRODUCE.md): "
               "it regenerates damaged samples")


def check_record(path: Path) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a sound record file, ``(None, what is wrong)`` otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    if not text.strip():
        return None, "empty"
    try:
        record = json.loads(text)
    except ValueError as exc:
        return None, f"not valid JSON ({getattr(exc, 'msg', exc)})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        return None, "lacks " + ", ".join(missing)
    if record["sample"] != path.stem or record["image"] != f"images/{path.stem}.png":
        return None, f"belongs to another sample ({record['sample']!r}, {record['image']!r})"
    return record, None


def check_image(run_dir: Path, record: dict) -> str | None:
    """What is wrong with a record's image (missing, not its recorded bytes), or None when it is sound."""
    path = Path(run_dir) / record["image"]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "image missing"
    except OSError as exc:
        return f"image unreadable ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        return "image is not a regular file"
    if file_sha256(path) != record["image_sha256"]:
        return "image differs from its record (truncated, swapped or modified)"
    return None


def scan_records(run_dir: Path, verify_images: bool = False) -> tuple[dict[str, dict], dict[str, str]]:
    """(sound records by sample id, damaged sample id -> ``records/<id>.json: what is wrong``).

    With ``verify_images`` a record whose image is missing or not the recorded bytes is damaged too.
    """
    records: dict[str, dict] = {}
    damaged: dict[str, str] = {}
    folder = Path(run_dir) / "records"
    if not folder.is_dir():
        return records, damaged
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(TMP_PREFIX):
            continue
        record, problem = check_record(path)
        if record is not None and verify_images:
            image_problem = check_image(run_dir, record)
            if image_problem:
                record, problem = None, f"{image_problem} ({record['image']})"
        if record is None:
            damaged[path.stem] = f"records/{path.name}: {problem}"
        else:
            records[path.stem] = record
    return records, damaged


def load_records(run_dir: Path) -> dict[str, dict]:
    """Every finished sample's record, by sample id; a damaged record is one clear error."""
    records, damaged = scan_records(run_dir)
    if damaged:
        raise InputError(f"{damaged_line(Path(run_dir), damaged)}; {REPAIR_HINT}")
    return records


def damaged_line(run_dir: Path, damaged: dict[str, str], limit: int = 5) -> str:
    """One line naming the damaged samples of a run (the first ``limit``, then a count)."""
    items = [damaged[k] for k in sorted(damaged)]
    shown = "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")
    return f"{len(items)} damaged sample{'s' if len(items) != 1 else ''} in {run_dir}: {shown}"


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


def resolve_run_config(config: RunConfig, limits: str | None = None) -> dict[str, Any]:
    """The engine's own check of every name and number (no model loads), plus the face backend."""
    return config.generation_config(limits=limits).validate().as_dict()


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
             manifest_timeout_s: float = 600.0, cpu_offload: bool = False, compile: bool = False,
             limits: str | None = None) -> RunSummary:
    """Generate the missing samples of this process's share of the grid into ``run_dir``.

    ``limits`` raises the configuration's upper bounds (``--limits``, e.g. ``"steps=500"``).

    Samples counted as done are verified first (record, image, sha256); damaged ones are regenerated
    and listed in ``RunSummary.repaired``. The folder is locked against other commands meanwhile.
    """
    grid = grid or Grid()
    started = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    dataset = load_dataset(dataset_dir)
    if dataset.issues:
        raise InputError(f"dataset {dataset.root} is not valid: " + "; ".join(dataset.issues)
                         + " (see `fastface eval dataset check`)")
    resolved = resolve_run_config(config, limits)
    fingerprint = dataset.fingerprint()
    rank, world = distributed_rank()
    units = work_units(dataset, grid, config.batch_size)
    n_total = sum(len(u) for u in units)
    if n_total == 0:
        raise InputError(f"the grid is empty: split '{grid.split}' of {dataset.root} has no prompts")
    command = list(command) if command is not None else ["fastface", *sys.argv[1:]]
    everyone = {s.id for u in units for s in u}

    ensure_writable_dir(run_dir, "--run-dir")
    previous = read_manifest(run_dir)
    if previous is not None:
        check_compatible(previous, config, fingerprint, run_dir)
    lock = lock_run_folder(run_dir, "fastface eval run")
    try:
        previous = read_manifest(run_dir)  # again: it may have changed before the lock was ours
        if previous is not None:
            check_compatible(previous, config, fingerprint, run_dir)
        return _run_locked(config, dataset, resolved, fingerprint, grid, units, n_total, everyone, command, run_dir,
                           previous, rank, world, device, progress, manifest_timeout_s, cpu_offload, started,
                           compile, limits)
    finally:
        lock.release()


def _verified_done(run_dir: Path, samples: list[Sample]) -> tuple[set[str], dict[str, str]]:
    """Which of ``samples`` are done and sound, and which were damaged (their record is removed now,
    so that a kill during the repair leaves a sample that is simply not done)."""
    done: set[str] = set()
    damaged: dict[str, str] = {}
    for sample in samples:
        path = record_path(run_dir, sample.id)
        if not path.exists():
            continue
        record, problem = check_record(path)
        if record is not None and (record["identity"], record["prompt_id"], record["seed_index"], record["seed"]) != (
                sample.identity, sample.prompt.id, sample.seed_index, sample.seed):
            problem = "belongs to another identity, prompt or seed"
        elif record is not None:
            image_problem = check_image(run_dir, record)
            problem = f"{image_problem} ({record['image']})" if image_problem else None
        if problem is None:
            done.add(sample.id)
        else:
            damaged[sample.id] = f"records/{path.name}: {problem}"
            path.unlink(missing_ok=True)
    return done, damaged


def _run_locked(config: RunConfig, dataset: Dataset, resolved: dict, fingerprint: str, grid: Grid,
                units: list[list[Sample]], n_total: int, everyone: set[str], command: list[str], run_dir: Path,
                previous: dict | None, rank: int, world: int, device: str | None, progress: bool,
                manifest_timeout_s: float, cpu_offload: bool, started: float, compile: bool = False,
                limits: str | None = None) -> RunSummary:
    from tqdm.auto import tqdm

    if rank == 0:
        clean_stale(run_dir, set(), everyone, rank)
        described = {"face_backend": resolved["face_backend"], "steps": resolved["steps"],
                     "method": resolved["method"].to_dict(), "guidance": resolved["guidance"]}
        manifest = build_manifest(previous, config, grid, dataset, fingerprint, command, n_total, world, described)
        write_json_atomic(run_dir / MANIFEST, manifest)
        write_text_atomic(run_dir / "REPRODUCE.md", reproduce_text(manifest))
    else:
        _wait_for_manifest(run_dir, config, grid, fingerprint, manifest_timeout_s)
    with disk_full_as_error(run_dir):
        (run_dir / "images").mkdir(exist_ok=True)
        (run_dir / "records").mkdir(exist_ok=True)

    mine = shard(units, rank, world)
    mine_ids = {s.id for u in mine for s in u}
    clean_stale(run_dir, mine_ids, everyone, rank)
    done, damaged = _verified_done(run_dir, [s for u in mine for s in u])
    pending = [u for u in mine if any(s.id not in done for s in u)]
    todo = sum(1 for u in pending for s in u if s.id not in done)
    summary = RunSummary(run_dir, n_total, len(mine_ids), 0, len(mine_ids) - todo, rank, world, 0.0, damaged)
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
    generation = config.generation_config(_device_for_rank(device), cpu_offload, compile, limits)
    pipe = commands.load_pipeline(generation)
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
                    tokens_by_identity[first.identity] = pipe.encode_identity(face, **dict(generation.adapter_options))
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
                if sample.id in done:
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
    _write_via_tmp(final_image, lambda tmp: image.save(tmp, format="PNG"))
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
