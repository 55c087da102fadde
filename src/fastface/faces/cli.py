"""``fastface faces inspect`` and ``fastface faces compare``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..commands import select_option
from ..errors import FastFaceError, NoFaceError

# The names ``compare`` tries by default: aliases of the same model are listed once.
COMPARE_BACKENDS = ("dlib", "facenet", "arcface", "antelopev2", "auraface")


def register(sub: argparse._SubParsersAction) -> None:
    faces = sub.add_parser("faces", help="face analysis: inspect detections, compare two photos")
    faces_sub = faces.add_subparsers(dest="faces_command", required=True, parser_class=type(faces))

    inspect = faces_sub.add_parser("inspect", help="detect faces, print them as JSON, draw them to PNGs")
    inspect.add_argument("images", nargs="+", metavar="IMAGE")
    inspect.add_argument("--backend", default="dlib", help="face backend (default: dlib)")
    inspect.add_argument("--select", type=select_option, default="largest",
                         help="which face is chosen: largest, confidence or an index (default: largest)")
    inspect.add_argument("--out", type=Path, default=Path("fastface_inspect"),
                         help="folder for the annotated PNGs (default: ./fastface_inspect)")
    inspect.set_defaults(func=run_inspect)

    compare = faces_sub.add_parser("compare", help="cosine similarity of the faces in two photos")
    compare.add_argument("a", metavar="A")
    compare.add_argument("b", metavar="B")
    compare.add_argument("--backend", default=None, help="one backend (default: every available one)")
    compare.add_argument("--select", type=select_option, default="largest")
    compare.set_defaults(func=run_compare)

    embed = faces_sub.add_parser("embed", help="write the identity of one person's photo(s) to a file that "
                                 "generate/eval take (--face id.npy)")
    embed.add_argument("photos", nargs="+", metavar="PHOTO", help="photos or folders of photos of one person")
    embed.add_argument("--out", type=Path, required=True, metavar="FILE", help="identity file: .npy or .safetensors")
    embed.add_argument("--backend", default="arcface",
                       help="face encoder; match the adapter's (default: arcface, the FaceID adapters' own)")
    embed.add_argument("--select", type=select_option, default="largest")
    embed.add_argument("--outlier-threshold", type=float, default=None, metavar="SIM")
    embed.add_argument("--reject-threshold", type=float, default=None, metavar="SIM")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    embed.set_defaults(func=run_embed)


def _warn_lines(caught: list[warnings.WarningMessage]) -> None:
    from ..messages import to_cli

    for w in caught:
        sys.stderr.write(f"warning: {to_cli(str(w.message))}\n")


def _floats(arr: np.ndarray) -> list:
    return np.round(np.asarray(arr, dtype=np.float64), 2).tolist()


def run_inspect(args: argparse.Namespace) -> int:
    from . import get_backend
    from .draw import NO_FACE, draw_faces
    from .identity import choose_face, detect_faces
    from .io import describe, load_image

    backend = get_backend(args.backend)
    images = [load_image(path) for path in args.images]  # every file checked before any work
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"backend": backend.name, "model": backend.model_id, "images": []}
    used: set[str] = set()
    for path, img in zip(args.images, images):
        name = describe(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            faces = detect_faces(img, backend)
            chosen = choose_face(faces, args.select, name)[0] if faces else None
        _warn_lines(caught)
        entries = []
        for face in faces:
            emb = np.asarray(backend.embed(img, face), dtype=np.float32)
            entries.append({"bbox": _floats(face.bbox), "score": round(float(face.score), 4),
                            "keypoints": _floats(face.keypoints),
                            "landmarks": None if face.landmarks is None else len(face.landmarks),
                            "embedding_dim": int(emb.shape[0]),
                            "embedding_norm": round(float(np.linalg.norm(emb)), 4)})
        stem = Path(path).stem or "image"
        png_name = f"{stem}_faces.png"
        k = 1
        while png_name in used:
            k += 1
            png_name = f"{stem}_{k}_faces.png"
        used.add(png_name)
        png = args.out / png_name
        draw_faces(img, faces, chosen).save(png)
        report["images"].append({"source": str(path), "width": int(img.shape[1]), "height": int(img.shape[0]),
                                 "result": f"{len(faces)} face(s) found" if faces else NO_FACE,
                                 "faces": entries, "chosen": chosen, "drawing": str(png)})
        if not faces:
            sys.stderr.write(f"{path}: {NO_FACE} under {backend.name}\n")
    print(json.dumps(report, indent=2))
    return 0


def verdict(backend: str, similarity: float) -> str:
    """``same person: yes (0.9712 ≥ 0.92)`` at the backend's threshold (its outlier threshold)."""
    from .identity import OUTLIER_THRESHOLDS

    if backend not in OUTLIER_THRESHOLDS:
        return "same person: no threshold known for this backend"
    threshold = OUTLIER_THRESHOLDS[backend][0]
    same = similarity >= threshold
    return f"same person: {'yes' if same else 'no'} ({similarity:.4f} {'≥' if same else '<'} {threshold:.2f})"


def run_embed(args: argparse.Namespace) -> int:
    from ..atomic import atomic_path
    from .identity import build_identity

    suffix = args.out.suffix.lower()
    if suffix not in (".npy", ".safetensors"):
        raise FastFaceError(f"--out must end in .npy or .safetensors, got '{args.out}'")
    if args.out.is_dir():
        raise FastFaceError(f"--out '{args.out}' is a folder; give a file name ending in {suffix}")
    if args.out.exists() and not args.overwrite:
        raise FastFaceError(f"--out '{args.out}' exists; pass --overwrite to replace it")
    identity = build_identity(args.photos, backend=args.backend, select=args.select,
                              outlier_threshold=args.outlier_threshold, reject_threshold=args.reject_threshold)
    keep = [i for i, name in enumerate(identity.sources) if name not in identity.outliers] or list(
        range(len(identity.sources)))
    rows = np.ascontiguousarray(identity.embeddings[keep], dtype=np.float32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, rows)
        else:
            from safetensors.numpy import save_file

            save_file({"embedding": rows}, str(tmp), metadata={"backend": identity.backend, "model": identity.model})
    print(f"{args.out}: {rows.shape[0]} photo(s) of one person, {rows.shape[1]}-d {identity.backend} embeddings "
          f"(use it with --face {args.out}; generate with an adapter trained on {identity.backend} embeddings)")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from . import get_backend
    from .identity import analyze
    from .io import load_image

    images = (load_image(args.a), load_image(args.b))
    names = args.backend and [args.backend] or list(COMPARE_BACKENDS)
    compared = 0
    for name in names:
        try:
            backend = get_backend(name)
        except (FastFaceError, ImportError, OSError) as exc:
            if args.backend:
                raise
            from ..messages import to_cli

            print(f"{name}: unavailable ({to_cli(str(exc).splitlines()[0])})")
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            embeddings = []
            for path, img in zip((args.a, args.b), images):
                try:
                    embeddings.append(analyze(img, backend, args.select).embedding)
                except NoFaceError:
                    raise NoFaceError(f"no face found in '{path}' under {name}") from None
            ea, eb = embeddings
        _warn_lines(caught)
        similarity = float(np.dot(ea, eb))
        print(f"{name}: {similarity:.4f}  {verdict(backend.name, similarity)}")
        compared += 1
    if compared == 0:
        raise FastFaceError("no face backend is available here; see `fastface doctor`")
    return 0

