"""What a combination needs from the hub, what of it is missing here, and ``fastface download``.

A *combination* is what one command runs: a backbone (or a sampler over a local base model), an
identity adapter, the face model packs, the replacement VAE and, for ``eval score``, the scoring
models. :func:`required_files` lists exactly the files it reads (one precision of each model, never a
whole multi-precision repository); :func:`missing_files` says which are neither local nor cached,
without touching the network; :func:`download_command` is the one command that fetches all of them,
and every "missing weights" error of a command names it (:func:`check_available`).

``fastface download`` fetches the files with their sizes and progress; run on a connected machine it
is the prefetch for one that will run offline (copy the Hugging Face cache, ``$HF_HOME``, across).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingWeightsError

PRECISIONS = ("fp16", "fp32")

# The files of a diffusers SDXL pipeline that FastFace reads (one precision); sizes are left to the
# hub, which reports them before a download.
_SDXL_CONFIGS = (
    "model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
    "text_encoder/config.json", "text_encoder_2/config.json",
)
_SDXL_TOKENIZERS = tuple(
    f"{folder}/{name}" for folder in ("tokenizer", "tokenizer_2")
    for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
)
_SDXL_WEIGHTS = (
    "unet/diffusion_pytorch_model{v}.safetensors", "vae/diffusion_pytorch_model{v}.safetensors",
    "text_encoder/model{v}.safetensors", "text_encoder_2/model{v}.safetensors",
)


@dataclass(frozen=True)
class RequiredFile:
    """One file from a hub repository: ``filename`` may hold a subfolder (``unet/config.json``)."""

    repo: str
    filename: str
    size: int | None  # bytes, where a public record is kept in FastFace; else None (asked at download)
    role: str  # what it is for, in words ("hyper-4 distillation LoRA")
    # A file hosted at a URL (``repo`` is the URL's folder) lies beside this (repo, filename) hub
    # file, where its adapter looks for it (PuLID's face parsing weights beside its checkpoint).
    beside: tuple[str, str] | None = None

    @property
    def is_url(self) -> bool:
        return self.repo.startswith(("https://", "http://"))

    @property
    def is_pattern(self) -> bool:
        """A glob (``ControlNetModel/*``): every matching file of the repository."""
        return any(ch in self.filename for ch in "*?[")

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "file": self.filename, "size": self.size, "role": self.role}


@dataclass(frozen=True)
class Combination:
    """What one command runs; hub defaults replaced by local paths need nothing from the hub."""

    backbone: str | None = "hyper-4"
    adapter: str | None = "faceid"
    face_packs: tuple[str, ...] = ()
    eval: bool = False
    vae: str | None = None
    sampler: str | None = None
    base_model: str | None = None
    adapter_path: str | None = None
    image_encoder: str | None = None
    precision: str = "fp16"
    extra: tuple[RequiredFile, ...] = field(default=())

    def command(self) -> str:
        """The ``fastface download`` command fetching everything this combination needs."""
        args = ["fastface", "download"]
        if self.backbone and self.backbone != "tiny" and self.base_model is None and self.sampler is None:
            args.append(self.backbone)
        if self.adapter and self.adapter_path is None and self.backbone != "tiny":
            args.append(self.adapter)
        if self.base_model is not None and _is_single_file(self.base_model):
            args += ["--base-model", str(self.base_model)]
        for pack in self.face_packs:
            args += ["--face-pack", pack]
        if self.vae and self.vae != "default":
            args += ["--vae", self.vae]
        if self.eval:
            args.append("--eval")
        if self.precision != "fp16":
            args += ["--precision", self.precision]
        return shlex.join(args)


def _is_single_file(path: str) -> bool:
    return Path(str(path)).suffix.lower() in (".safetensors", ".ckpt")


def pipeline_files(repo: str, precision: str, role: str = "base model") -> list[RequiredFile]:
    """The files of a diffusers SDXL pipeline repository FastFace reads, in one precision."""
    variant = ".fp16" if precision == "fp16" else ""
    files = [*_SDXL_CONFIGS, *_SDXL_TOKENIZERS, *(w.format(v=variant) for w in _SDXL_WEIGHTS)]
    return [RequiredFile(repo, name, None, role) for name in files]


def required_files(combination: Combination) -> list[RequiredFile]:
    """Every hub file ``combination`` reads, in load order, duplicates removed."""
    from .backbones import SDXL_BASE, TINY, VAES, get_backbone
    from .faces import model_packs

    if combination.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {combination.precision!r}")
    items: list[RequiredFile] = []
    spec = get_backbone(combination.backbone) if combination.backbone else None
    tiny = spec is not None and spec.name == TINY
    if spec is not None and not tiny:
        if combination.base_model is None:
            items += pipeline_files(spec.base, combination.precision, f"{spec.name} base model")
        elif _is_single_file(combination.base_model):
            # A single-file checkpoint holds the weights; the tokenizers come from SDXL base (the
            # architecture's configs ship with FastFace).
            items += [RequiredFile(SDXL_BASE, name, None, "tokenizers for a single-file base model")
                      for name in _SDXL_TOKENIZERS]
        if combination.sampler is None:
            for piece, label in ((spec.lora, "distillation LoRA"), (spec.unet, "distilled UNet")):
                if piece is not None:
                    items.append(RequiredFile(piece[0], piece[1], None, f"{spec.name} {label}"))
    if combination.adapter and not tiny:
        from .adapters import get_adapter

        items += _adapter_files(get_adapter(combination.adapter), combination)
    for name in combination.face_packs:
        pack = model_packs.get_pack(name)
        repo, subfolder = model_packs.split_hub_repo(model_packs.hub_source(pack), pack)
        for spec_file in pack.files:
            if model_packs.find_local(pack, spec_file) is None:
                filename = f"{subfolder}/{spec_file.filename}" if subfolder else spec_file.filename
                items.append(RequiredFile(repo, filename, spec_file.size, f"face model pack {pack.name}"))
    if combination.vae and combination.vae != "default" and combination.vae in VAES:
        repo = VAES[combination.vae].repo
        items += [RequiredFile(repo, name, None, f"VAE {combination.vae}")
                  for name in ("config.json", "diffusion_pytorch_model.safetensors")]
    if combination.eval:
        items += scoring_files()
    items += combination.extra
    seen: set[tuple[str, str]] = set()
    unique = []
    for item in items:
        if (item.repo, item.filename) not in seen:
            seen.add((item.repo, item.filename))
            unique.append(item)
    return unique


def _adapter_files(adapter: Any, combination: Combination) -> list[RequiredFile]:
    """The adapter's files: from its own ``required_files()`` (the adapter seam) where it has one."""
    hook = getattr(adapter, "required_files", None)
    if callable(hook):
        items = []
        for need in hook():
            role = "adapter" if need.role == "checkpoint" else need.role
            if (role == "adapter" and combination.adapter_path) or (role == "image encoder" and combination.image_encoder):
                continue  # replaced by a local path
            if _beside_local_checkpoint(need, combination.adapter_path):
                continue  # the adapter reads it from beside the local checkpoint
            names = [need.filename] if need.filename else list(getattr(need, "patterns", ()) or ())
            beside = None
            if need.repo.startswith(("https://", "http://")):
                if combination.adapter_path:
                    continue  # looked for beside the local checkpoint: nothing to fetch from the hub
                beside = (adapter.repo, adapter.weight_name)
            items += [RequiredFile(need.repo, name, None, f"{adapter.name} {role}", beside) for name in names]
        return items
    items = []
    if combination.adapter_path is None and getattr(adapter, "repo", None) and getattr(adapter, "weight_name", None):
        items.append(RequiredFile(adapter.repo, adapter.weight_name, None, f"{adapter.name} adapter"))
    encoder = getattr(adapter, "image_encoder", None)
    if encoder and combination.image_encoder is None:
        items += [RequiredFile(encoder, name, None, f"{adapter.name} image encoder")
                  for name in ("config.json", "preprocessor_config.json", "model.safetensors")]
    return items


def _beside_local_checkpoint(need: Any, adapter_path: str | None) -> bool:
    """Whether a file the adapter also finds beside a local checkpoint (``local_name``) lies there."""
    local_name = getattr(need, "local_name", None)
    if not adapter_path or not local_name:
        return False
    path = Path(adapter_path).expanduser()
    folder = path if path.is_dir() else path.parent
    return (folder / local_name).is_file()


def scoring_files() -> list[RequiredFile]:
    """The default scoring models of ``eval score``: CLIP ViT-L/14 (text alignment, the aesthetic
    head's features), the LAION aesthetic head and ImageReward's checkpoint."""
    from .evaluation.metrics import AESTHETIC_HEAD_FILE, DEFAULT_AESTHETIC_HEAD, DEFAULT_CLIP_MODELS

    clip = DEFAULT_CLIP_MODELS[0]
    files = [RequiredFile(clip, name, None, "CLIP (text alignment, aesthetic features)")
             for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json", "vocab.json",
                          "merges.txt", "special_tokens_map.json", "model.safetensors")]
    files.append(RequiredFile(DEFAULT_AESTHETIC_HEAD, AESTHETIC_HEAD_FILE, None, "LAION aesthetic head"))
    files += [RequiredFile(IMAGE_REWARD_REPO, name, None, "ImageReward") for name in ("ImageReward.pt", "med_config.json")]
    return files


IMAGE_REWARD_REPO = "THUDM/ImageReward"


def cached_path(item: RequiredFile) -> str | None:
    """The local copy of ``item`` in the Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    if item.is_url:
        anchor = cached_path(RequiredFile(*item.beside, None, item.role)) if item.beside else None
        found = Path(anchor).parent / item.filename if anchor else None
        return str(found) if found is not None and found.is_file() else None
    if item.is_pattern:
        from fnmatch import fnmatch

        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(item.repo, allow_patterns=[item.filename], local_files_only=True))
        except Exception:  # nothing of that repository is cached
            return None
        hits = [p for p in folder.rglob("*") if p.is_file() and fnmatch(p.relative_to(folder).as_posix(), item.filename)]
        return str(folder) if hits else None
    try:
        found = try_to_load_from_cache(item.repo, item.filename)
    except ValueError:  # not a valid repository id (a local path that does not exist): not cached
        return None
    return found if isinstance(found, str) else None


def missing_files(items: Iterable[RequiredFile]) -> list[RequiredFile]:
    return [item for item in items if cached_path(item) is None]


def check_available(combination: Combination) -> None:
    """Raise one :class:`MissingWeightsError` for everything ``combination`` lacks, when nothing can
    be downloaded (offline, or a hub that does not answer); with a reachable hub, do nothing (the
    loaders download what they need)."""
    from dataclasses import replace

    from .hub import local_only, offline_reason

    missing = missing_files(required_files(combination))
    if missing:
        # Either precision of a base model loads (float16 weights are upcast for a CPU run).
        other = replace(combination, precision="fp32" if combination.precision == "fp16" else "fp16")
        alternative = missing_files(required_files(other))
        if len(alternative) < len(missing):
            missing = alternative
    if not missing or not local_only():
        return
    raise MissingWeightsError(missing_message(missing, combination, offline_reason()))


def missing_message(missing: Sequence[RequiredFile], combination: Combination, why: str) -> str:
    roles = list(dict.fromkeys(f"{item.role} from {item.repo}" for item in missing))
    # The local alternatives of the missing pieces, as Python keywords (the CLI shows them as flags).
    local = {"base model": "base_model=<local diffusers folder or .safetensors file>",
             "adapter": "adapter_path=<file>", "image encoder": "image_encoder=<folder>",
             "VAE": "vae=<local diffusers VAE folder>"}
    instead = [hint for key, hint in local.items() if any(key in item.role for item in missing)]
    alternative = f"; or pass {', '.join(instead)}" if instead else ""
    return (f"{len(missing)} model file(s) are not in the local cache ({', '.join(roles)}) and {why}; "
            f"fetch them all at once on a connected machine with: {combination.command()}{alternative}")


def human_size(size: int | None) -> str:
    if size is None:
        return "size unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def hub_sizes(items: Sequence[RequiredFile]) -> dict[tuple[str, str], int | None]:
    """Sizes the hub reports for ``items`` (one request per repository)."""
    from huggingface_hub import HfApi

    api = HfApi()
    sizes: dict[tuple[str, str], int | None] = {}
    for repo in dict.fromkeys(item.repo for item in items if not item.is_url):
        names = [item.filename for item in items if item.repo == repo and not item.is_pattern]
        try:
            infos = api.get_paths_info(repo, names)
        except Exception:  # a private or renamed repository: sizes stay unknown, the download tells
            infos = []
        for info in infos:
            sizes[(repo, info.path)] = getattr(info, "size", None)
    return sizes


def fetch(items: Sequence[RequiredFile], *, out: Any = sys.stderr) -> list[Path]:
    """Download ``items`` into the Hugging Face cache (each with its own progress bar)."""
    from huggingface_hub import hf_hub_download

    paths = []
    for index, item in enumerate(items, 1):
        out.write(f"[{index}/{len(items)}] {item.repo}/{item.filename} ({human_size(item.size)})\n")
        out.flush()
        try:
            if item.is_url:
                paths.append(_fetch_url(item))
            elif item.is_pattern:
                from huggingface_hub import snapshot_download

                paths.append(Path(snapshot_download(item.repo, allow_patterns=[item.filename])))
            else:
                paths.append(Path(hf_hub_download(item.repo, item.filename)))
        except Exception as exc:  # gated, renamed, network lost: one line naming the file
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise MissingWeightsError(f"could not download {item.filename} from {item.repo} ({first})") from exc
    return paths


def _fetch_url(item: RequiredFile) -> Path:
    """A URL-hosted file, downloaded beside its hub anchor file (fetched before it) in the cache."""
    import urllib.request

    from .atomic import atomic_path

    anchor = cached_path(RequiredFile(*item.beside, None, item.role)) if item.beside else None
    if anchor is None:
        raise MissingWeightsError(f"{item.filename}: {item.beside} must be fetched first (it is stored beside it)")
    target = Path(anchor).parent / item.filename
    with urllib.request.urlopen(f"{item.repo}/{item.filename}", timeout=60) as response, atomic_path(target) as tmp:
        Path(tmp).write_bytes(response.read())
    return target


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "download", help="fetch exactly the model files a combination needs (prefetch for offline machines)",
        description="Fetch the files of a backbone, an adapter, face model packs and the scoring models into "
        "the Hugging Face cache, e.g. `fastface download hyper-4 faceid --face-pack buffalo_l --eval`.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="backbone and/or adapter names (see `fastface presets`)")
    parser.add_argument("--face-pack", action="append", default=[], metavar="NAME",
                        help="face model pack: buffalo_l (arcface), antelopev2, auraface; repeatable")
    parser.add_argument("--eval", action="store_true", help="also the scoring models of `eval score`")
    parser.add_argument("--vae", default=None, help="a replacement VAE: fp16-fix or tiny")
    parser.add_argument("--base-model", default=None, metavar="FILE",
                        help="a single-file base model you have: fetch only the tokenizers it needs")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="weights of base models: fp16 (GPUs, the default) or fp32 (CPU runs)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched, fetch nothing")
    parser.set_defaults(func=run_download)


def combination_from_names(names: Sequence[str], **options: Any) -> Combination:
    """Sort positional names into a backbone and an adapter (ConfigError for anything else)."""
    from .adapters import ADAPTERS
    from .backbones import BACKBONES

    backbone = adapter = None
    for name in names:
        if name in BACKBONES and backbone is None:
            backbone = name
        elif name in ADAPTERS and adapter is None:
            adapter = name
        else:
            kind = "backbone" if name in BACKBONES else "adapter" if name in ADAPTERS else None
            if kind:
                raise ConfigError(f"give one {kind} per command, got a second one: {name!r}")
            raise ConfigError(f"{name!r} is neither a backbone ({', '.join(BACKBONES)}) nor an adapter "
                              f"({', '.join(ADAPTERS)})")
    if backbone is None and options.get("base_model"):
        backbone = "hyper-4"  # only its base (SDXL) matters: the tokenizers of the single file
    return Combination(backbone=backbone, adapter=adapter, **options)


def run_download(args: argparse.Namespace) -> int:
    from .hub import local_only, offline_reason

    if args.vae not in (None, "default"):
        from .backbones import VAES

        if args.vae not in VAES:
            raise ConfigError(f"--vae must be one of {', '.join(VAES)} here (a local folder needs no download)")
    combination = combination_from_names(
        args.names, face_packs=tuple(args.face_pack), eval=args.eval, vae=args.vae, base_model=args.base_model,
        precision=args.precision)
    items = required_files(combination)
    if not items:
        raise ConfigError("nothing to download: name a backbone, an adapter, --face-pack or --eval "
                          "(e.g. fastface download hyper-4 faceid --face-pack buffalo_l --eval)")
    missing = missing_files(items)
    if args.dry_run or not missing:
        for item in items:
            state = "cached" if item not in missing else "to fetch"
            print(f"{state:<8}  {item.repo}/{item.filename}  ({human_size(item.size)}; {item.role})")
        known = sum(item.size or 0 for item in missing)
        print(f"{len(missing)} of {len(items)} file(s) to fetch" + (f", at least {human_size(known)}" if known else ""))
        return 0
    if local_only():
        raise MissingWeightsError(f"cannot fetch {len(missing)} file(s): {offline_reason()}")
    sizes = hub_sizes(missing)
    missing = [RequiredFile(i.repo, i.filename, sizes.get((i.repo, i.filename), i.size), i.role, i.beside)
               for i in missing]
    total = sum(item.size or 0 for item in missing)
    print(f"fetching {len(missing)} file(s), {human_size(total)}", file=sys.stderr)
    fetch(missing)
    print(f"done: {len(items)} file(s) of this combination are in the Hugging Face cache; copy it "
          "($HF_HOME, default ~/.cache/huggingface) to a machine that runs offline")
    return 0
