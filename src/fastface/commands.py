"""CLI sub-commands of the engine: ``generate``, ``demo`` and ``presets``.

Everything a user can get wrong is checked before any model is loaded (names, schedules, face
photos), so a typo costs a second, not a model load, and no finished image is ever lost to a
late error: images are written one by one, atomically, as soon as they exist.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .atomic import atomic_path, write_text_atomic
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
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    gen.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt")
    gen.add_argument("--out", required=True, metavar="PATH",
                     help="output directory (or a .png file name for a single image)")
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
    parser.add_argument("--ip-scale", type=float, default=0.8, help="adapter scale λ")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="weight of the adapter's own LoRA")
    parser.add_argument("--alpha", default=None, help="identity guidance: a number or per-step list '1,1.5,1.5,1'")
    parser.add_argument("--beta", default=None, help="text guidance: a number or per-step list")
    parser.add_argument("--rescale", type=float, default=None, help="guidance rescale φ (0 = off)")
    parser.add_argument("--rescale-on", choices=("all", "guided"), default=None)
    parser.add_argument("--face-backend", default=None, help="face encoder (default: the adapter's own)")
    parser.add_argument("--base-model", default=None, help="custom SDXL base: hub id, diffusers folder or .safetensors")
    parser.add_argument("--adapter-path", default=None, help="local adapter checkpoint instead of the hub's")
    parser.add_argument("--image-encoder", default=None, help="local CLIP image encoder (faceid-plusv2)")
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


# --------------------------------------------------------------------------- resolution


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Check every name and number of a generation configuration without loading a model."""
    from .adapters import spec_for_backbone
    from .backbones import get_backbone
    from .guidance import GuidanceConfig, resolve_schedule
    from .presets import get_method, plain_cfg

    backbone = get_backbone(args.backbone)
    adapter = spec_for_backbone(args.adapter, backbone.name) if args.adapter not in (None, "none") else None
    method = get_method(args.method)
    steps = args.steps if args.steps is not None else backbone.steps
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise ConfigError(f"--{name} must be a positive multiple of 8, got {value}")
    if args.ip_scale < 0:
        raise ConfigError(f"--ip-scale must be >= 0, got {args.ip_scale}")

    guidance = method.guidance if method.guidance is not None else plain_cfg(backbone.cfg_scale)
    overrides = {key: getattr(args, key) for key in ("alpha", "beta", "rescale", "rescale_on")
                 if getattr(args, key) is not None}
    if overrides:
        fields = guidance.to_dict() if hasattr(guidance, "to_dict") else {}
        fields = {k: v for k, v in fields.items() if k in ("alpha", "beta", "rescale", "rescale_on", "decomposition")}
        fields.update(overrides)
        guidance = GuidanceConfig(**fields)
    # Schedules are checked against the step count now, before any model loads.
    resolve_schedule(guidance.alpha, steps, peak=1.5, name="alpha")
    resolve_schedule(guidance.beta, steps, peak=3.0, name="beta")
    return {
        "backbone": backbone,
        "adapter": adapter,
        "method": method,
        "guidance": guidance,
        "steps": steps,
        "loras": [parse_lora(item) for item in args.lora],
    }


def parse_lora(item: str) -> tuple[str, float]:
    path, sep, weight = item.rpartition(":")
    if sep and path and not weight.startswith(("/", "\\")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return item, 1.0


def resolve_device(device: str, dtype: str) -> tuple[str, Any]:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device")
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "float16"
    return device, getattr(torch, dtype)


def default_face_backend(adapter: Any) -> str:
    """The encoder an adapter was trained on: ArcFace for the real ones, dlib for the tiny ones."""
    return getattr(adapter, "face_backend", None) or "arcface"


def load_identity(paths: Sequence[str], backend: str | None, adapter: Any) -> Any:
    """An Identity from face photos or an embedding file, checked before any model loads."""
    from .faces import build_identity, load_embedding

    for path in paths:
        if not Path(path).exists():
            raise InputError(f"face file '{path}' does not exist")
    embeddings = [p for p in paths if Path(p).suffix.lower() in EMBEDDING_SUFFIXES]
    if embeddings:
        if len(paths) > 1:
            raise InputError("pass either one embedding file or face photos, not both")
        identity = load_embedding(paths[0])
    else:
        identity = build_identity(list(paths), backend=backend or default_face_backend(adapter))
    expected = getattr(adapter, "embedding_dim", None)
    if adapter is not None and expected and identity.dim != expected:
        raise InputError(
            f"the {adapter.name} adapter expects {expected}-d face embeddings, got {identity.dim}-d"
            f" (from {identity.backend})"
        )
    return identity


# --------------------------------------------------------------------------- generate


def run_generate(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {args.num_images}")
    out = Path(args.out)
    single_file = out.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}
    total = len(args.prompt) * args.num_images
    if single_file and total > 1:
        raise ConfigError(f"--out {out} names one file but {total} images are asked for; give a directory")
    identity = load_identity(args.face, args.face_backend, config["adapter"])
    pipe = load_pipeline(args, config)
    result = pipe(
        args.prompt,
        face=identity,
        method=config["method"].name,
        guidance=config["guidance"],
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        seed=args.seed,
        steps=config["steps"],
        height=args.height,
        width=args.width,
        ip_scale=args.ip_scale,
        lora_scale=args.lora_scale,
    )
    paths = write_images(result, out, single_file=single_file)
    print(licence_line(result.metadata[0].get("licence", {})), file=sys.stderr)
    for path in paths:
        print(path)
    return 0


def load_pipeline(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from .pipeline import FastFacePipeline

    device, dtype = resolve_device(args.device, args.dtype)
    pipe = FastFacePipeline.from_pretrained(
        backbone=config["backbone"].name,
        adapter=config["adapter"].name if config["adapter"] is not None else None,
        base_model=args.base_model,
        adapter_path=args.adapter_path,
        image_encoder=args.image_encoder,
        loras=config["loras"],
        device=device,
        dtype=dtype,
        # Read with defaults: callers may build the namespace themselves (eval run's RunConfig).
        vae=getattr(args, "vae", None),
        vae_tiling=bool(getattr(args, "vae_tiling", False)),
        cpu_offload=bool(getattr(args, "cpu_offload", False)),
    )
    # One command = one LoRA weighting: merging the LoRAs into the UNet once removes their per-layer
    # cost (1.76x faster per image on an H200, benchmarks/RESULTS.md). Offloaded weights move
    # between devices, so they stay unfused there.
    if not getattr(args, "no_fuse", False) and not getattr(args, "cpu_offload", False):
        pipe.fuse_loras(args.lora_scale)
    if getattr(args, "compile", False):
        # Compiled graphs hold the fused weights: compiling needs the one fixed LoRA weighting.
        if getattr(args, "no_fuse", False):
            raise ConfigError("--compile needs fused LoRAs: drop --no-fuse")
        pipe.compile(lora_scale=args.lora_scale)
    return pipe


def licence_line(licence: dict[str, Any]) -> str:
    """One line naming the licence of every checkpoint in the combination that was run."""
    parts = []
    for role, value in licence.items():
        text = "; ".join(value) if isinstance(value, (list, tuple)) else str(value)
        parts.append(f"{role.replace('_', ' ')}: {text}")
    return "licence: " + " | ".join(parts)


def write_images(result: Any, out: Path, *, single_file: bool = False, stem: str = "image") -> list[Path]:
    """Write each image with a JSON sidecar of its metadata; atomic, never a half-written file."""
    written: list[Path] = []
    if single_file:
        out.parent.mkdir(parents=True, exist_ok=True)
        targets = [out]
    else:
        out.mkdir(parents=True, exist_ok=True)
        targets = []
        for index, meta in enumerate(result.metadata):
            name = f"{stem}_{index:03d}_seed{meta.get('seed', index)}.png"
            targets.append(out / name)
    for image, meta, target in zip(result.images, result.metadata, targets):
        with atomic_path(target) as tmp:
            image.save(tmp, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"))
        write_text_atomic(target.with_suffix(".json"), json.dumps(meta, indent=2, default=str))
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
    print("\nADAPTERS")
    for a in table["adapters"]:
        extra = f", image encoder {a['image_encoder']}" if a.get("image_encoder") else ""
        print(f"  {a['name']:<13} {a.get('repo', '')}/{a.get('weight_name', '')}"
              f" ({a.get('embedding_dim', '?')}-d embedding{extra})")
        print(f"  {'':<13} licence: {a.get('licence', '?')}")
    print("\nMETHODS")
    for m in table["methods"]:
        print(f"  {m['name']:<18} {m.get('description', '')}")
    return 0
