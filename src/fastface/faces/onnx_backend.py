"""ArcFace-family face backends (buffalo_l, antelopev2, AuraFace) on onnxruntime alone.

No ``insightface`` (which needs a compiler to install) and no OpenCV: SCRFD detection
(:mod:`.scrfd`), five-point alignment (:mod:`.align`) and ArcFace embedding (:mod:`.arcface`) are done
here with numpy, Pillow and onnxruntime. onnxruntime is imported only when a backend is built.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from .arcface import ArcFaceRecognizer
from .model_packs import ModelPack, get_pack, resolve_pack
from .scrfd import ScrfdDetector
from .types import Face

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": CUDA,
    "gpu": CUDA,
    "tensorrt": "TensorrtExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


def _provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def plan_providers(
    providers: str | Sequence[Any] | None, available: Sequence[str]
) -> tuple[list[Any], list[str]]:
    """The providers to ask onnxruntime for, and the requested ones this build does not have.

    ``None`` means CUDA when the build has it, else CPU. Entries are names (``"cuda"`` and other
    short aliases accepted) or ``(name, options)`` pairs as onnxruntime takes them. CPU always ends
    the list so that a session can run whatever happens to the accelerator.
    """
    if providers is None:
        requested: list[Any] = [CUDA, CPU] if CUDA in available else [CPU]
    else:
        items = [providers] if isinstance(providers, str) else list(providers)
        requested = []
        for item in items:
            name = _provider_name(item)
            full = _PROVIDER_ALIASES.get(name.lower(), name)
            requested.append((full, item[1]) if isinstance(item, (tuple, list)) else full)
    usable = [p for p in requested if _provider_name(p) in available]
    dropped = [_provider_name(p) for p in requested if _provider_name(p) not in available]
    if CPU not in [_provider_name(p) for p in usable]:
        usable.append(CPU)
    return usable, dropped


def open_session(model_path: str | os.PathLike, providers: str | Sequence[Any] | None = None) -> Any:
    """An onnxruntime session on the requested providers, falling back to CPU with a warning.

    A provider missing from this onnxruntime build, one that raises while the session is created,
    and one that onnxruntime silently drops (e.g. CUDA libraries not found) all lead to a CPU
    session and a :class:`RuntimeWarning` saying why.
    """
    import onnxruntime as ort

    path = Path(model_path)
    available = ort.get_available_providers()
    wanted, dropped = plan_providers(providers, available)
    if dropped:
        warnings.warn(
            f"onnxruntime {ort.__version__} here has no {', '.join(dropped)} (available: {', '.join(available)}); "
            f"running {path.name} on the remaining providers ({', '.join(_provider_name(p) for p in wanted)})",
            RuntimeWarning,
            stacklevel=2,
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings would duplicate ours
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if [_provider_name(p) for p in wanted] == [CPU]:
            raise InputError(f"cannot load ONNX model {path}: {reason}") from exc
        warnings.warn(
            f"{', '.join(_provider_name(p) for p in wanted if _provider_name(p) != CPU)} failed to start for "
            f"{path.name} ({reason}); falling back to {CPU}",
            RuntimeWarning,
            stacklevel=2,
        )
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
        except Exception as exc2:
            raise InputError(f"cannot load ONNX model {path}: {str(exc2).strip().splitlines()[0]}") from exc2
    else:
        active = session.get_providers()
        lost = [_provider_name(p) for p in wanted if _provider_name(p) not in active]
        if lost:
            warnings.warn(
                f"{', '.join(lost)} could not be initialised for {path.name} (for CUDA: are the CUDA and cuDNN "
                f"libraries that onnxruntime-gpu needs installed?); running on {', '.join(active)}",
                RuntimeWarning,
                stacklevel=2,
            )
    return session


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise InputError(f"a face image must be RGB (H, W, 3), got shape {img.shape}")
    if img.dtype != np.uint8:
        raise InputError(f"a face image must be uint8 RGB, got dtype {img.dtype}")
    return img


class OnnxFaceBackend:
    """SCRFD detection + ArcFace-style embedding from an ONNX model pack (see :mod:`.model_packs`).

    ``model_dir`` is a directory holding the pack's files (directly or in ``<pack>/``); otherwise they
    are looked up in ``$FASTFACE_FACE_MODELS``, ``~/.insightface/models/<pack>`` and finally
    downloaded from ``hub_repo`` (default: the pack's, or ``$FASTFACE_FACE_HUB_REPO``). ``providers``
    are onnxruntime execution providers (default: CUDA when it works, else CPU).
    """

    def __init__(
        self,
        pack: str = "buffalo_l",
        model_dir: str | os.PathLike | None = None,
        providers: str | Sequence[Any] | None = None,
        det_size: int = 640,
        det_thresh: float = 0.5,
        hub_repo: str | None = None,
        max_num: int = 0,
    ) -> None:
        spec: ModelPack = get_pack(pack)
        if not 0.0 <= float(det_thresh) <= 1.0:
            raise ConfigError(f"det_thresh must lie in [0, 1], got {det_thresh}")
        files = resolve_pack(spec, model_dir=model_dir, hub_repo=hub_repo)
        self.pack = spec
        self.name = spec.name
        self.licence = spec.licence
        self.det_thresh = float(det_thresh)
        self.max_num = int(max_num)
        self.detector = ScrfdDetector(session=open_session(files.detector, providers), model_path=str(files.detector),
                                      det_size=det_size)
        if not self.detector.has_keypoints:
            raise ConfigError(
                f"{files.detector} is an SCRFD model without keypoints; ArcFace alignment needs the 5-keypoint "
                f"variant (e.g. det_10g.onnx / scrfd_10g_bnkps.onnx)"
            )
        self.recognizer = ArcFaceRecognizer(session=open_session(files.recognizer, providers),
                                            model_path=str(files.recognizer),
                                            input_mean=spec.input_mean, input_std=spec.input_std)
        self.embedding_dim = self.recognizer.embedding_dim
        # Sizes fastface.faces retries when nothing is found (smaller inputs catch faces that fill
        # the frame); a model exported at a fixed size can only run at that size.
        fixed = self.detector.fixed_size
        self.det_sizes: tuple[int, ...] = (
            (fixed[0],) if fixed else (self.detector.det_size, *[s for s in (480, 320) if s < self.detector.det_size])
        )
        self.model_id = _model_id(spec, files.recognizer)
        self.providers = list(self.recognizer.session.get_providers())
        self.files = files

    def detect(self, image: np.ndarray, *, det_size: int | None = None) -> list[Face]:
        """Faces by decreasing detector score, with bbox, score and the five keypoints."""
        img = _as_rgb(image)
        boxes, scores, kps = self.detector.detect(img, self.det_thresh, det_size=det_size, max_num=self.max_num)
        assert kps is not None  # guaranteed by the keypoint check in __init__
        return [
            Face(bbox=boxes[i].astype(np.float32), score=float(scores[i]), keypoints=kps[i].astype(np.float32))
            for i in range(boxes.shape[0])
        ]

    def aligned_crop(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The 112x112 RGB crop the recogniser sees for ``face``."""
        return self.recognizer.align(_as_rgb(image), _keypoints_of(face))

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The L2-normalised (embedding_dim,) float32 embedding of ``face``."""
        return self.recognizer.embed(_as_rgb(image), _keypoints_of(face))

    def embed_raw(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The recogniser's un-normalised (embedding_dim,) output (antelopev2: what InstantID expects)."""
        return self.recognizer.embed_raw(_as_rgb(image), _keypoints_of(face))

    def __repr__(self) -> str:
        return f"OnnxFaceBackend(pack={self.name!r}, model_id={self.model_id!r}, providers={self.providers})"


def _keypoints_of(face: Face) -> np.ndarray:
    kps = np.asarray(face.keypoints, dtype=np.float32)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise InputError(f"ArcFace embedding needs the face's five keypoints (5, 2), got shape {kps.shape}")
    return kps


def _model_id(pack: ModelPack, recognizer: Path) -> str:
    base = f"{pack.name}/{Path(pack.recognizer.filename).stem}"
    size = recognizer.stat().st_size
    # A local file other than the published one must not share identity caches with it.
    return base if pack.recognizer.size in (None, size) else f"{base}-{size}"
