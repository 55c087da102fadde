"""CLI sub-commands of the engine: ``generate``, ``demo`` and ``presets``.

Everything a user can get wrong is checked before any model is loaded (names, schedules, face
photos, the output location), so a typo costs a second, not a model load, and no finished image
is ever lost to a late error: images are written one by one, atomically, as soon as they exist.
No output replaces a file that exists (unless ``--overwrite``) nor, ever, an input of the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .atomic import (
    disk_full_as_error,
    ensure_writable_dir,
    flush_to_disk,
    link_new,
    same_file,
    tmp_name,
)
from .downloads import Combination, check_available
from .errors import ConfigError, InputError

EMBEDDING_SUFFIXES = {".npy", ".safetensors"}
DTYPES = ("auto", "float32", "float16", "bfloat16")


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="render a person from face photo(s) and a prompt")
    add_generation_options(gen)
    gen.add_argument("--face", action="append", required=True, metavar="PATH",
                     help="face photo, or a .npy/.safetensors embedding; repeat for several photos")
    gen.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                     help="prompt; repeat for a batch of prompts")
    gen.add_argument("--negative-prompt", default=None, metavar="TEXT")
    gen.add_argument("--select", type=select_option, default="largest",
                     help="which face of a photo with several: largest, confidence or an index (left to right)")
    gen.add_argument("--outlier-threshold", type=float, default=None, metavar="SIM",
                     help="a photo less similar than this to the others is left out (default: per face backend)")
    gen.add_argument("--reject-threshold", type=float, default=None, metavar="SIM",
                     help="a photo less similar than this to the others is refused (default: per face backend)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    gen.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt")
    gen.add_argument("--out", required=True, metavar="PATH",
                     help="output directory (or a .png file name for a single image); images already there "
                          "are kept, the new ones get new names")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace existing files of the same name at --out (an input of the command never is)")
    gen.add_argument("--pose", default=None, metavar="PHOTO",
                     help="instantid: take the face keypoints (the pose) from this photo instead of the first --face")
    gen.add_argument("--no-fuse", action="store_true",
                     help="keep the LoRAs unfused (slower; the default merges them once into the UNet)")
    gen.set_defaults(func=run_generate)

    demo = sub.add_parser("demo", help="offline demo: bundled portrait, tiny models, every method preset")
    demo.add_argument("--out", default="out/demo", metavar="DIR")
    demo.add_argument("--face", default=None, metavar="PATH", help="another portrait instead of the bundled one")
    demo.add_argument("--prompt", default="a portrait photo of a person as an astronaut on the moon")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=run_demo)

    presets = sub.add_parser("presets", help="list backbones, adapters and methods with defaults and licences")
    presets.add_argument("--json", action="store_true", help="machine-readable output")
    presets.set_defaults(func=run_presets)


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Options that define one generation configuration (shared with ``fastface eval run``)."""
    parser.add_argument("--backbone", default="hyper-4", help="backbone name (see `fastface presets`)")
    parser.add_argument("--adapter", default="faceid", help="identity adapter name")
    parser.add_argument("--method", default="fastface", help="method preset (see `fastface presets`)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (backbone default)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--ip-scale", type=float, default=None,
                        help="adapter scale λ (default: presets.DEFAULT_IP_SCALE, IP-Adapter's published value)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="weight of the adapter's own LoRA")
    parser.add_argument("--alpha", default=None, help="identity guidance: a number or per-step list '1,1.5,1.5,1'")
    parser.add_argument("--beta", default=None, help="text guidance: a number or per-step list")
    parser.add_argument("--rescale", type=float, default=None, help="guidance rescale φ (0 = off)")
    parser.add_argument("--rescale-on", choices=("all", "guided"), default=None)
    parser.add_argument("--face-backend", default=None, help="face encoder (default: the adapter's own)")
    parser.add_argument("--base-model", default=None, help="custom SDXL base: hub id, diffusers folder or .safetensors")
    parser.add_argument("--sampler", default=None, metavar="NAME",
                        help="sample --base-model (a checkpoint with the distillation merged in) like backbone NAME: "
                             "its scheduler, steps and CFG-free scale, no distillation weights (e.g. lightning-4)")
    parser.add_argument("--scheduler", default=None,
                        help="sample with another scheduler: dpm++2m-trailing (PuLID v1), dpm++2m-karras-k (PuLID v1.1)")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="the backbone's stock CFG scale (methods without their own guidance, e.g. none)")
    parser.add_argument("--adapter-path", default=None, help="local adapter checkpoint instead of the hub's")
    parser.add_argument("--image-encoder", default=None,
                        help="local image encoder: CLIP folder (faceid-plusv2, plus-face), EVA02-CLIP file (pulid)")
    parser.add_argument("--controlnet-scale", type=float, default=None,
                        help="instantid: scale of the IdentityNet ControlNet's residuals (default 0.8)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="extra style LoRA with optional weight; repeatable")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    # Memory options for small GPUs.
    parser.add_argument("--vae", default="default", metavar="{default,fp16-fix,tiny,PATH}",
                        help="VAE: the backbone's (default), fp16-fix (madebyollin/sdxl-vae-fp16-fix: float16, "
                             "less memory), tiny (madebyollin/taesdxl: fast preview decoder), or a local "
                             "diffusers VAE folder")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode in tiles: VAE memory independent of the image size")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="keep models on the CPU, each moved to the GPU only while it runs (CUDA only; slower)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the fused UNet and the VAE decode once (CUDA graphs on CUDA); "
                             "the first image of each size pays the compilation")
    parser.add_argument("--limits", default=None, metavar="KEY=N[,KEY=N]",
                        help="raise the upper bounds for big machines: steps (default 200), size (height and "
                             "width, 4096), images (per call, 64); e.g. --limits steps=500,size=8192")


# --------------------------------------------------------------------------- resolution


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~fastface.config.GenerationConfig` of parsed ``generate`` (or ``eval run``) options."""
    from .config import GenerationConfig, Limits
    from .presets import DEFAULT_IP_SCALE

    limits = getattr(args, "limits", None)
    prompts = getattr(args, "prompt", None) or ()
    return GenerationConfig(
        prompts=tuple(prompts),
        negative_prompt=getattr(args, "negative_prompt", None),
        backbone=args.backbone,
        adapter=args.adapter,
        method=args.method,
        steps=args.steps,
        height=args.height,
        width=args.width,
        num_images=getattr(args, "num_images", 1),
        seed=getattr(args, "seed", 0),
        ip_scale=DEFAULT_IP_SCALE if args.ip_scale is None else args.ip_scale,
        lora_scale=args.lora_scale,
        alpha=args.alpha,
        beta=args.beta,
        rescale=args.rescale,
        rescale_on=args.rescale_on,
        face_backend=args.face_backend,
        base_model=args.base_model,
        scheduler=getattr(args, "scheduler", None),
        cfg_scale=getattr(args, "cfg_scale", None),
        adapter_path=args.adapter_path,
        image_encoder=args.image_encoder,
        sampler=getattr(args, "sampler", None),
        loras=tuple(parse_lora(item) for item in args.lora),
        device=getattr(args, "device", "auto") or "auto",
        dtype=getattr(args, "dtype", "auto") or "auto",
        vae=getattr(args, "vae", None),
        vae_tiling=bool(getattr(args, "vae_tiling", False)),
        cpu_offload=bool(getattr(args, "cpu_offload", False)),
        fuse_loras=not getattr(args, "no_fuse", False),
        compile=bool(getattr(args, "compile", False)),
        limits=Limits.parse(limits) if isinstance(limits, str) else (limits or Limits()),
        adapter_options=adapter_options_from_args(args),
    )


def adapter_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The adapter's own options given on the command line (InstantID: --controlnet-scale, --pose)."""
    options: dict[str, Any] = {}
    if getattr(args, "controlnet_scale", None) is not None:
        options["controlnet_scale"] = args.controlnet_scale
    pose = getattr(args, "pose", None)
    if pose is not None:
        if not Path(pose).expanduser().is_file():
            raise InputError(f"--pose {pose}: no such file")
        options["pose"] = str(Path(pose).expanduser())
    return options


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Check every name and number of a generation configuration without loading a model."""
    config = config_from_args(args)
    resolved = config.validate().as_dict()
    from .hub import check_weights_file

    # A damaged weights file the user named is one line now, not a traceback after a model load.
    for path, what in [(config.adapter_path, "--adapter-path"), *((p, "--lora") for p, _ in config.loras)]:
        if path is not None and Path(path).is_file():
            check_weights_file(path, what=what)
    return resolved


def parse_lora(item: str) -> tuple[str, float]:
    path, sep, weight = item.rpartition(":")
    if sep and path and not weight.startswith(("/", "\\")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return item, 1.0


def resolve_device(device: str, dtype: str) -> tuple[str, Any]:
    """(device name, torch dtype) for ``--device``/``--dtype`` (one clear error for a bad value)."""
    from .backbones import default_dtype
    from .config import check_device, check_dtype

    resolved = check_device(device)
    return str(resolved), check_dtype(dtype) or default_dtype(resolved)


def default_face_backend(adapter: Any) -> str:
    """The encoder an adapter was trained on: ArcFace for the real ones, dlib for the tiny ones."""
    return getattr(adapter, "face_backend", None) or "arcface"


def select_option(value: str) -> str | int:
    """``--select``: largest, confidence or a face index."""
    if value in ("largest", "confidence"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--select must be 'largest', 'confidence' or an index, got {value!r}") from None


def load_identity(paths: Sequence[str], backend: str | None, adapter: Any, **options: Any) -> Any:
    """An Identity from face photos or an embedding file, checked before any model loads.

    ``options`` (``select``, ``outlier_threshold``, ``reject_threshold``) go to ``build_identity``.
    """
    from .faces import build_identity, load_embedding
    from .faces.io import check_regular_file

    for path in paths:
        if not Path(path).exists():
            raise InputError(f"face file '{path}' does not exist")
        if not Path(path).is_dir():  # a folder of photos is read photo by photo
            check_regular_file(Path(path), f"face file '{path}'")
    embeddings = [p for p in paths if Path(p).suffix.lower() in EMBEDDING_SUFFIXES]
    if embeddings:
        if len(paths) > 1:
            raise InputError("pass either one embedding file or face photos, not both")
        identity = load_embedding(paths[0])
    else:
        identity = build_identity(list(paths), backend=backend or default_face_backend(adapter), **options)
    expected = getattr(adapter, "embedding_dim", None)
    if adapter is not None and expected and identity.dim != expected:
        raise InputError(
            f"the {adapter.name} adapter expects {expected}-d face embeddings, got {identity.dim}-d"
            f" (from {identity.backend})"
        )
    return identity


# --------------------------------------------------------------------------- generate


def run_generate(args: argparse.Namespace) -> int:
    # Names first, then the face files, the numbers and the output, then everything the combination
    # lacks (one error naming one command), all before torch even loads.
    combination = generation_combination(args)
    for path in args.face:
        if not Path(path).exists():
            raise InputError(f"face file '{path}' does not exist")
    if all(Path(p).suffix.lower() in EMBEDDING_SUFFIXES for p in args.face):
        from .adapters import spec_for_backbone

        adapter = None if combination.adapter is None else spec_for_backbone(
            combination.adapter, backbone_name(args))
        load_identity(args.face, args.face_backend, adapter)  # a wrong embedding file is the first thing to fix
    config = config_from_args(args)
    resolved = resolve_config(args)
    out = Path(args.out)
    single_file = out.suffix.lower() in IMAGE_SUFFIXES
    total = len(config.prompts) * config.num_images
    if single_file and total > 1:
        raise ConfigError(f"--out {out} names one file but {total} images are asked for; give a directory")
    inputs = input_paths(args)
    check_output(out, single_file=single_file, overwrite=args.overwrite, inputs=inputs)
    check_available(combination)
    warn_ineffective(args, resolved)
    identity = load_identity(args.face, args.face_backend, resolved["adapter"], select=args.select,
                             outlier_threshold=args.outlier_threshold, reject_threshold=args.reject_threshold)
    pipe = load_pipeline(config)
    result = pipe.generate(config, identity)
    paths = write_images(result, out, single_file=single_file, overwrite=args.overwrite, protected=inputs,
                         images_per_prompt=config.num_images)
    print(licence_line(result.metadata[0].get("licence", {})), file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def warn_ineffective(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """One ``warning:`` line per option that changes nothing in this configuration."""
    from .advice import ineffective_options
    from .presets import DEFAULT_IP_SCALE, DEFAULT_LORA_SCALE

    # Defaults of the options whose explicit use can be ineffective (see fastface.advice).
    defaults: dict[str, Any] = {"ip_scale": DEFAULT_IP_SCALE, "lora_scale": DEFAULT_LORA_SCALE,
                                "select": "largest", "no_fuse": False, "cpu_offload": False}

    given: dict[str, Any] = {}
    for name in ("negative_prompt", "rescale", "rescale_on", "face_backend", "image_encoder", "adapter_path",
                 "outlier_threshold", "reject_threshold"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    for name, default in defaults.items():
        value = getattr(args, name, default)
        if value is not None and value != default:  # None: not given (--ip-scale defaults to None)
            given[name] = value
    faces = getattr(args, "face", None) or []
    for finding in ineffective_options(
        method=config["method"], guidance=config["guidance"], steps=config["steps"], adapter=config["adapter"],
        given=given, face_is_embedding=bool(faces) and all(Path(p).suffix.lower() in EMBEDDING_SUFFIXES for p in faces),
    ):
        print(f"warning: {finding.message(cli=True)}", file=sys.stderr)


def backbone_name(args: argparse.Namespace) -> str:
    """The name of the backbone (or sampler setting) a generation command runs."""
    from .backbones import backbone_spec

    return backbone_spec(args.backbone, getattr(args, "sampler", None), args.base_model).name


def generation_combination(args: argparse.Namespace) -> Combination:
    """What a generate command will read from the hub (for the one-command missing-weights error)."""
    from .adapters import spec_for_backbone
    from .backbones import backbone_spec
    from .faces.model_packs import ALIASES, PACKS

    backbone = backbone_spec(args.backbone, getattr(args, "sampler", None), args.base_model)
    adapter = spec_for_backbone(args.adapter, backbone.name) if args.adapter not in (None, "none") else None

    packs: tuple[str, ...] = ()
    faces = getattr(args, "face", None) or []
    if any(Path(p).suffix.lower() not in EMBEDDING_SUFFIXES for p in faces):
        backend = args.face_backend or default_face_backend(adapter)
        if backend in PACKS or backend in ALIASES:
            packs = (ALIASES.get(backend, backend),)
    dtype, device = getattr(args, "dtype", "auto"), getattr(args, "device", "auto")
    precision = "fp32" if dtype == "float32" or (dtype == "auto" and device == "cpu") else "fp16"
    return Combination(
        backbone=args.backbone, adapter=adapter.name if adapter is not None else None,
        face_packs=packs, vae=getattr(args, "vae", None), sampler=getattr(args, "sampler", None),
        base_model=args.base_model, adapter_path=args.adapter_path, image_encoder=args.image_encoder,
        precision=precision)


def load_pipeline(config: Any) -> Any:
    """The pipeline of a :class:`~fastface.config.GenerationConfig`.

    One command = one LoRA weighting: unless ``fuse_loras`` is off (``--no-fuse``) the LoRAs are
    merged into the UNet once, which removes their per-layer cost (1.76x faster per image on an
    H200, benchmarks/RESULTS.md). Offloaded weights move between devices, so they stay unfused there.
    """
    from .pipeline import FastFacePipeline

    return FastFacePipeline.from_config(config)


def licence_line(licence: dict[str, Any]) -> str:
    """One line naming the licence of every checkpoint in the combination that was run."""
    parts = []
    for role, value in licence.items():
        text = "; ".join(value) if isinstance(value, (list, tuple)) else str(value)
        parts.append(f"{role.replace('_', ' ')}: {text}")
    return "licence: " + " | ".join(parts)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def input_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(option, path) of every file the command reads, for the never-overwrite-an-input check."""
    found: list[tuple[str, Path]] = []
    for option, values in (("--face", getattr(args, "face", None) or []),
                           ("--pose", [getattr(args, "pose", None)]),
                           ("--lora", [parse_lora(item)[0] for item in getattr(args, "lora", None) or []]),
                           ("--base-model", [getattr(args, "base_model", None)]),
                           ("--adapter-path", [getattr(args, "adapter_path", None)]),
                           ("--image-encoder", [getattr(args, "image_encoder", None)]),
                           ("--vae", [getattr(args, "vae", None)])):
        for value in values:
            if value and os.path.lexists(value):
                found.append((option, Path(value)))
    return found


def _input_at(target: Path, inputs: Sequence[tuple[str, Path]]) -> str | None:
    for option, path in inputs:
        if os.path.lexists(target) and same_file(target, path):
            return option
    return None


def check_output(out: Path, *, single_file: bool, overwrite: bool, inputs: Sequence[tuple[str, Path]] = ()) -> None:
    """Refuse, before any model loads, an output that cannot be written or would replace a file."""
    if not single_file:
        ensure_writable_dir(out, "--out", create=False)
        return
    for target in (out, out.with_suffix(".json")):  # the image and its metadata sidecar
        option = _input_at(target, inputs)
        if option is not None:
            raise InputError(f"--out {out} would replace {target}, which is the {option} input of this command; "
                             "choose another output name")
        if target.is_dir():
            raise InputError(f"--out {out} would replace the folder {target}; choose another output name")
        if os.path.lexists(target) and not overwrite:
            raise InputError(f"--out {out} would replace the existing file {target}; choose another name, "
                             "or pass --overwrite to replace it")
    above = next((parent for parent in out.parents if os.path.lexists(parent)), Path("."))
    if not above.is_dir():
        raise InputError(f"--out {out} is under a file, not a folder: {above} is a file")
    ensure_writable_dir(out.parent, "--out folder", create=False)


def write_images(result: Any, out: Path, *, single_file: bool = False, stem: str = "image", overwrite: bool = False,
                 protected: Sequence[tuple[str, Path]] = (), images_per_prompt: int = 1) -> list[Path]:
    """Write each image with a JSON sidecar of its metadata; atomic, never a half-written file.

    In a folder, image i of prompt p with seed s is ``{stem}_p{p:02d}_seed{s}.png``; when that name
    (or its sidecar's) is taken, ``_2``, ``_3``... is added, so earlier images are kept, unless
    ``overwrite``. A file in ``protected`` (the command's inputs) is never replaced. Image and
    sidecar are both written in full before either gets its name, so a full disk leaves neither.
    """
    written: list[Path] = []
    folder = out.parent if single_file else out
    with disk_full_as_error(folder):
        folder.mkdir(parents=True, exist_ok=True)
    for position, (image, meta) in enumerate(zip(result.images, result.metadata)):
        index = int(meta.get("index", position))
        if single_file:
            candidates: Any = [out]
        else:
            base = f"{stem}_p{index // max(1, images_per_prompt):02d}_seed{meta.get('seed', index)}"
            candidates = (out / (base + (f"_{n}" if n > 1 else "") + ".png") for n in range(1, 1_000_000))
        suffix = out.suffix.lower() if single_file else ".png"
        tmp_image = tmp_name(folder / f"{stem}-{index}{suffix}")
        tmp_meta = tmp_name(folder / f"{stem}-{index}.json")
        try:
            with disk_full_as_error(folder / f"{stem}-{index}{suffix}"):
                image.save(tmp_image, format=Image.registered_extensions().get(suffix, "PNG"))
                flush_to_disk(tmp_image)
                tmp_meta.write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
                flush_to_disk(tmp_meta)
            for target in candidates:
                sidecar = target.with_suffix(".json")
                if any(_input_at(path, protected) for path in (target, sidecar)):
                    continue
                if overwrite:
                    os.replace(tmp_image, target)
                    os.replace(tmp_meta, sidecar)
                    break
                if os.path.lexists(target) or os.path.lexists(sidecar) or not link_new(tmp_image, target):
                    continue  # taken (perhaps by another writer a moment ago)
                if not link_new(tmp_meta, sidecar):
                    target.unlink(missing_ok=True)
                    continue
                break
            else:
                raise InputError(f"--out {out}: no free file name for image {index}; nothing was replaced "
                                 "(pass --overwrite to replace, or choose another output)")
        finally:
            tmp_image.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
        written.append(target)
    return written


# --------------------------------------------------------------------------- demo


def bundled_portrait() -> Path:
    """A public-domain NASA portrait (scikit-image's astronaut, cropped) shipped with FastFace."""
    return Path(__file__).parent / "data" / "portrait.jpg"


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    out = demo(
        Path(args.out),
        face=Path(args.face) if args.face else bundled_portrait(),
        prompt=args.prompt,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"demo images and contact sheet written to {out}")
    print(f"open {out / 'index.html'} (or {out / 'contact_sheet.png'})")
    return 0


# --------------------------------------------------------------------------- presets


def presets_table() -> dict[str, list[dict[str, Any]]]:
    from .adapters import ADAPTERS
    from .backbones import BACKBONES
    from .presets import METHODS

    return {
        "backbones": [spec.to_dict() | {"description": spec.description} for spec in BACKBONES.values()],
        "adapters": [spec.to_dict() for spec in ADAPTERS.values()],
        "methods": [method.to_dict() for method in METHODS.values()],
    }


def run_presets(args: argparse.Namespace) -> int:
    table = presets_table()
    if args.json:
        print(json.dumps(table, indent=2, default=str))
        return 0
    print("BACKBONES (name, steps, resolution, CFG when guidance is off, licence)")
    for b in table["backbones"]:
        print(f"  {b['name']:<13} {b['steps']:>2} steps  {b['resolution']:>4}px  cfg {b['cfg_scale']:<4}"
              f"  {b['description']}")
        print(f"  {'':<13} licence: {'; '.join(b['licence'])}")
    print("\nADAPTERS (name, checkpoint, face input, tokens per photo, licence)")
    for a in table["adapters"]:
        dim = a.get("embedding_dim")
        face = f"{dim}-d embedding" if dim else "face crop only (no embedding)"
        extra = f", image encoder {a['image_encoder']}" if a.get("image_encoder") else ""
        print(f"  {a['name']:<22} {a.get('repo', '')}/{a.get('weight_name', '')}"
              f" ({face}{extra}; {a.get('num_tokens', '?')} tokens per photo)")
        more = [f for f in a.get("files", [])[1:] if not a.get("image_encoder") or a["image_encoder"] not in f]
        if more:
            print(f"  {'':<22} also needs: {', '.join(more)}")
        if not a.get("presets_tuned", True):
            print(f"  {'':<22} method presets: the published FaceID values, not tuned for this adapter")
        print(f"  {'':<22} licence: {'; '.join(a.get('licence', ['?']))}")
    print("\nMETHODS")
    for m in table["methods"]:
        print(f"  {m['name']:<18} {m.get('description', '')}")
    return 0
