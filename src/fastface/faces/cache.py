"""On-disk cache of face analyses, so that re-using a reference photo skips detection and embedding.

An entry is keyed by the sha256 of the image (its file bytes, or its decoded pixels for in-memory
images), the backend name, its model and configuration, and the face selection. It holds the
embedding (and its raw norm, where the backend has one), the face's index among the photo's faces, bbox, score, keypoints and landmarks as an ``.npz`` written atomically (temporary file
in the same folder, then ``os.replace``), so concurrent runs never read half-written entries.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .types import Face

CACHE_VERSION = "3"  # 2: entries keep the raw embedding's norm; 3: and how many faces the photo had


def default_root() -> Path:
    """``$FASTFACE_CACHE/embeddings``, else ``~/.cache/fastface/embeddings``."""
    base = os.environ.get("FASTFACE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "fastface") / "embeddings"


def image_digest(data: bytes | np.ndarray) -> str:
    """sha256 of file bytes, or of an RGB array's shape and pixels."""
    h = hashlib.sha256()
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data, dtype=np.uint8)
        h.update(f"pixels{arr.shape}".encode())
        h.update(arr.tobytes())
    else:
        h.update(bytes(data))
    return h.hexdigest()


class EmbeddingCache:
    """A folder of cached :class:`Face` analyses; ``hits`` / ``misses`` count this object's look-ups."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    @staticmethod
    def key(digest: str, backend: str, model_id: str, select: str | int, config: str = "") -> str:
        parts = (CACHE_VERSION, digest, backend, model_id, config, str(select))
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get(self, key: str) -> Face | None:
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as data:
                landmarks = data["landmarks"] if data["landmarks"].size else None
                face = Face(bbox=data["bbox"].astype(np.float32), score=float(data["score"]),
                            keypoints=data["keypoints"].astype(np.float32), landmarks=landmarks,
                            embedding=data["embedding"].astype(np.float32))
                norm = float(data["embedding_norm"])
                face.embedding_norm = None if np.isnan(norm) else norm
                index, count = (int(v) for v in data["selection"])
                face.selection = (index, count) if count > 0 else None
        except (OSError, KeyError, ValueError):
            # Missing, or unreadable (another version, a disk error): recompute rather than fail.
            self.misses += 1
            return None
        self.hits += 1
        return face

    def put(self, key: str, face: Face) -> Path:
        if face.embedding is None:
            raise ValueError("only faces with an embedding are cached")
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        landmarks = face.landmarks if face.landmarks is not None else np.zeros((0, 2), np.float32)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, embedding=face.embedding, bbox=face.bbox, score=np.float32(face.score),
                         keypoints=face.keypoints, landmarks=landmarks,
                         embedding_norm=np.float64(np.nan if face.embedding_norm is None else face.embedding_norm),
                         selection=np.asarray(face.selection or (0, 0), dtype=np.int64))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
