"""From photos to a :class:`Face` or an :class:`Identity`: detection with retries, face choice,
embedding, several-photo combination with outlier checks, caching, and loading saved embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError, NoFaceError
from .align import align_crop
from .base import FaceBackend
from .cache import EmbeddingCache, image_digest
from .io import ImageSource, describe, detection_scale, load_image, pad, resize
from .types import Face, Identity, Pose, check_embeddings

DEFAULT_DET_SIZES = (640, 480, 320)  # retried in turn by backends with a fixed-size detector (SCRFD)
PAD_RATIO = 0.35  # border added on each side for the last retry (face filling the frame)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# (flag, reject) cosine thresholds of one photo against the mean of the others. Measured on the
# astronaut and Grace Hopper photos, their flipped, recoloured, JPEG-25 and half-size variants and the
# cameraman: dlib same-person >= 0.98, different 0.85-0.90 (its raw 128-d vectors share a large
# common component); dlib's own rule (Euclidean 0.6 between vectors of norm ~1.45) is cosine ~0.91,
# hence flag 0.92 / reject 0.87 (Hopper among three astronauts: 0.89, flagged; cameraman: 0.85,
# rejected). FaceNet same >= 0.91, different <= 0.31; FaceNet's usual verification distance 1.1 is
# cosine 0.40, hence flag 0.50 / reject 0.30 (Hopper among astronauts: 0.17). ArcFace-family values
# are the usual verification operating points, not measured: no ONNX weights are reachable offline.
OUTLIER_THRESHOLDS: dict[str, tuple[float, float]] = {
    "dlib": (0.92, 0.87),
    "facenet": (0.50, 0.30),
    "arcface": (0.35, 0.20),
    "buffalo_l": (0.35, 0.20),
    "antelopev2": (0.35, 0.20),
    "auraface": (0.35, 0.20),
}


def resolve_backend(backend: str | FaceBackend) -> FaceBackend:
    if isinstance(backend, str):
        from . import get_backend

        return get_backend(backend)
    return backend


def _map_back(face: Face, scale: float, dx: float, dy: float, width: int, height: int) -> Face:
    """A face found on a scaled (by ``scale``) then padded (by ``dx, dy``) copy, in original pixels."""
    offset = np.array([dx, dy], dtype=np.float32)
    bbox = (face.bbox.reshape(2, 2) - offset) / scale
    bbox = np.clip(bbox, 0.0, [width, height]).reshape(4).astype(np.float32)
    kps = ((face.keypoints - offset) / scale).astype(np.float32)
    lm = None if face.landmarks is None else ((face.landmarks - offset) / scale).astype(np.float32)
    return Face(bbox=bbox, score=face.score, keypoints=kps, landmarks=lm, embedding=face.embedding)


def detect_faces(image: np.ndarray, backend: str | FaceBackend) -> list[Face]:
    """All faces in an RGB uint8 image, in its pixel coordinates, ordered left to right.

    Detection runs on a copy whose longest side is within [160, 1600] px. If nothing is found, it is
    retried at smaller ``det_size`` (backends with a ``det_sizes`` attribute list theirs; an empty
    tuple means the detector has no fixed input size) and finally on a copy with a grey border of
    35 % per side (close-ups whose face fills the frame). An empty list means no face at all.
    """
    be = resolve_backend(backend)
    height, width = image.shape[:2]
    scale = detection_scale(width, height)
    small = resize(image, scale)
    sizes = tuple(getattr(be, "det_sizes", DEFAULT_DET_SIZES))
    attempts: list[tuple[np.ndarray, int | None, int, int]] = [(small, None, 0, 0)]
    attempts += [(small, s, 0, 0) for s in sizes[1:]]
    padded, px, py = pad(small, PAD_RATIO)
    attempts.append((padded, None, px, py))
    for arr, det_size, dx, dy in attempts:
        found = be.detect(arr, det_size=det_size)
        if found:
            faces = [_map_back(f, scale, dx, dy, width, height) for f in found]
            return sorted(faces, key=lambda f: (float(f.bbox[0]), float(f.bbox[1])))
    return []


def choose_face(faces: Sequence[Face], select: str | int, name: str) -> tuple[int, Face]:
    """The selected face and its index; warns when several faces compete."""
    if isinstance(select, bool) or not isinstance(select, (int, str)):
        raise ConfigError(f"select must be 'largest', 'confidence' or a face index, got {select!r}")
    if isinstance(select, int):
        if not -len(faces) <= select < len(faces):
            raise InputError(f"face index {select} is out of range: {len(faces)} face(s) found in {name}")
        return select % len(faces), faces[select]
    if select == "largest":
        index = max(range(len(faces)), key=lambda i: (faces[i].area, faces[i].score))
    elif select == "confidence":
        index = max(range(len(faces)), key=lambda i: (faces[i].score, faces[i].area))
    else:
        raise ConfigError(f"select must be 'largest', 'confidence' or a face index, got {select!r}")
    if len(faces) > 1:
        warn_several_faces(len(faces), index, select, name)
    return index, faces[index]


def warn_several_faces(count: int, index: int, select: str, name: str) -> None:
    warnings.warn(f"{count} faces found in {name}; using face #{index} (the {select} one, "
                  "faces numbered left to right); pass select=<index> to choose another",
                  UserWarning, stacklevel=4)


def analyze(image: ImageSource, backend: str | FaceBackend = "dlib", select: str | int = "largest") -> Face:
    """The chosen face of a photo, with its embedding, in the photo's pixel coordinates.

    ``select``: ``"largest"`` (default), ``"confidence"`` or an index into the faces ordered left to
    right. Raises :class:`NoFaceError` when no face is found, even after the retries.
    """
    be = resolve_backend(backend)
    name = describe(image)
    img = load_image(image)
    return _analyze_array(img, be, select, name)


def pose_from_photo(image: ImageSource, backend: str | FaceBackend = "dlib", select: str | int = "largest") -> Pose:
    """The five keypoints of the chosen face of a photo, with the photo's size (InstantID's ``--pose``)."""
    be = resolve_backend(backend)
    name = describe(image)
    img = load_image(image)
    faces = detect_faces(img, be)
    if not faces:
        raise NoFaceError(f"no face found in the pose photo {name}")
    _, face = choose_face(faces, select, name)
    return Pose(keypoints=face.keypoints.astype(np.float32), size=(int(img.shape[1]), int(img.shape[0])),
                source=str(image) if isinstance(image, (str, Path)) else name)


def _analyze_array(img: np.ndarray, be: FaceBackend, select: str | int, name: str) -> Face:
    faces = detect_faces(img, be)
    if not faces:
        raise NoFaceError(f"no face found in {name}")
    index, face = choose_face(faces, select, name)
    face.selection = (index, len(faces))
    embed_raw = getattr(be, "embed_raw", None)
    if embed_raw is None:
        face.embedding = np.asarray(be.embed(img, face), dtype=np.float32)
        return face
    # The same normalisation as the backends' embed(), keeping the norm for adapters that read the raw
    # vector (InstantID, FaceID-Portrait _unnorm).
    raw = np.asarray(embed_raw(img, face), dtype=np.float32)
    norm = float(np.linalg.norm(raw))
    face.embedding = (raw / max(norm, 1e-12)).astype(np.float32)
    face.embedding_norm = norm
    return face


def _expand_sources(sources: ImageSource | Iterable[ImageSource]) -> list[ImageSource]:
    if isinstance(sources, (str, Path, bytes, bytearray, np.ndarray, Image.Image)):
        sources = [sources]
    out: list[ImageSource] = []
    for src in sources:
        if isinstance(src, (str, Path)) and Path(src).expanduser().is_dir():
            folder = Path(src).expanduser()
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"'{src}' contains no image files ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(files)
        else:
            out.append(src)
    if not out:
        raise InputError("no photos given to build an identity from")
    return out


def _raw_digest(src: ImageSource, img: np.ndarray) -> str:
    if isinstance(src, (str, Path)):
        return image_digest(Path(src).expanduser().read_bytes())
    if isinstance(src, (bytes, bytearray)):
        return image_digest(bytes(src))
    return image_digest(img)


def leave_one_out_similarities(embeddings: np.ndarray) -> np.ndarray:
    """Cosine of each row to the normalised mean of the other rows: ``cos(e_i, sum_{j!=i} e_j)``."""
    rows = np.asarray(embeddings, dtype=np.float64)
    total = rows.sum(axis=0)
    others = total[None, :] - rows
    others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
    return (rows * others).sum(axis=1)


def build_identity(sources: ImageSource | Iterable[ImageSource], backend: str | FaceBackend = "dlib",
                   select: str | int = "largest", cache: bool | EmbeddingCache | None = True,
                   outlier_threshold: float | None = None, reject_threshold: float | None = None,
                   progress: bool = True) -> Identity:
    """An :class:`Identity` from one or more photos (paths, folders of photos, arrays, PIL images).

    Each photo gives one embedding (its ``select``-ed face) and a 224x224 aligned crop. With several
    photos, each is compared with the mean of the others: below ``outlier_threshold`` it is listed in
    ``outliers`` (with a warning) and left out of the mean; below ``reject_threshold`` an
    :class:`InputError` names it. Defaults per backend: :data:`OUTLIER_THRESHOLDS`.
    """
    be = resolve_backend(backend)
    srcs = _expand_sources(sources)
    store = EmbeddingCache() if cache is True else (cache or None)
    flag_default, reject_default = OUTLIER_THRESHOLDS.get(be.name, (-1.0, -1.0))
    flag = flag_default if outlier_threshold is None else float(outlier_threshold)
    reject = reject_default if reject_threshold is None else float(reject_threshold)
    reject = min(reject, flag)

    names, embeddings, crops, keypoints, norms, sizes = [], [], [], [], [], []
    iterator: Iterable[ImageSource] = srcs
    if progress and len(srcs) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(srcs, desc=f"faces ({be.name})", unit="photo")
    for src in iterator:
        name = describe(src)
        img = load_image(src)
        face = None
        if store is not None:
            key = store.key(_raw_digest(src, img), be.name, be.model_id, select, getattr(be, "config_id", ""))
            face = store.get(key)
            if face is not None and face.selection is not None and face.selection[1] > 1 and isinstance(select, str):
                warn_several_faces(face.selection[1], face.selection[0], select, name)
        if face is None:
            face = _analyze_array(img, be, select, name)
            if store is not None:
                store.put(key, face)
        names.append(str(src) if isinstance(src, (str, Path)) else name)
        embeddings.append(face.embedding)
        crops.append(align_crop(img, face.keypoints, 224))
        keypoints.append(face.keypoints.astype(np.float32))
        norms.append(face.embedding_norm)
        sizes.append((int(img.shape[1]), int(img.shape[0])))

    rows = np.stack(embeddings).astype(np.float32)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    raw = None
    if all(n is not None for n in norms):
        raw = (rows * np.asarray(norms, dtype=np.float32)[:, None]).astype(np.float32)
    sims = leave_one_out_similarities(rows) if len(rows) > 1 else np.ones(1)
    if len(rows) > 1:
        worst = int(np.argmin(sims))
        if sims[worst] < reject:
            raise InputError(f"{describe_name(names[worst])} does not look like the same person as the other "
                             f"photos (similarity {sims[worst]:.4f} < {reject:.4f} under {be.name}); leave it "
                             f"out, or pass reject_threshold={_below(sims[worst])} to use it anyway")
    outliers = [names[i] for i in range(len(rows)) if len(rows) > 1 and sims[i] < flag]
    for i in range(len(rows)):
        if names[i] in outliers:
            warnings.warn(f"{describe_name(names[i])} may be a different person (similarity {sims[i]:.4f} "
                          f"< {flag:.4f} to the other photos under {be.name}); left out of the mean "
                          f"(pass outlier_threshold={_below(sims[i])} to keep it)",
                          UserWarning, stacklevel=2)
    keep = [i for i in range(len(rows)) if names[i] not in outliers] or list(range(len(rows)))
    mean = rows[keep].mean(axis=0)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    return Identity(embedding=mean.astype(np.float32), embeddings=rows, backend=be.name, model=be.model_id,
                    crops=crops, keypoints=keypoints, sources=names, outliers=outliers,
                    similarities=[float(s) for s in sims], raw_embeddings=raw, image_sizes=sizes)


def _below(value: float) -> str:
    """A threshold just under ``value`` at the printed precision (so that passing it keeps the photo)."""
    return f"{np.floor(float(value) * 1e4) / 1e4 - 1e-4:.4f}"


def describe_name(name: str) -> str:
    return name if name.startswith(("'", "<")) else f"'{name}'"


def load_embedding(path: str | Path) -> Identity:
    """An :class:`Identity` from a saved embedding: ``.npy`` (D,) / (n, D), or ``.safetensors`` with a
    tensor named ``embedding`` (or a single tensor). ``backend`` / ``model`` come from the
    safetensors metadata when present.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"'{path}' does not exist" if not p.exists() else f"'{path}' is not a file")
    suffix = p.suffix.lower()
    meta: dict[str, str] = {}
    try:
        if suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="numpy") as fh:
                keys = list(fh.keys())
                meta = dict(fh.metadata() or {})
                if "embedding" in keys:
                    arr = fh.get_tensor("embedding")
                elif len(keys) == 1:
                    arr = fh.get_tensor(keys[0])
                else:
                    raise InputError(f"'{path}' holds tensors {keys}; expected one named 'embedding'")
        else:
            raise InputError(f"'{path}' is not an embedding file (expected .npy or .safetensors)")
    except InputError:
        raise
    except Exception as exc:  # numpy / safetensors raise many kinds for a corrupt file
        raise InputError(f"'{path}' is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"'{path}' holds a {arr.dtype} array of shape {tuple(arr.shape)}; "
                         "expected float (D,) or (n, D)")
    check_embeddings(arr, f"'{path}'")
    return Identity.from_embeddings(arr, backend=meta.get("backend", "external"),
                                    model=meta.get("model", "external"), sources=[str(p)])
