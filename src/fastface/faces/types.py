"""Plain data passed between the face module and the generation engine.

Importing this module is cheap: no face backend (dlib, onnxruntime, OpenCV) is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Order of the five keypoints everywhere in FastFace (InsightFace's order; "left" is image-left).
KEYPOINT_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass
class Face:
    """One detected face in an image, in the pixel coordinates of the original image."""

    bbox: np.ndarray  # (4,) float32: x0, y0, x1, y1
    score: float  # detector confidence in [0, 1] (1.0 where a detector gives none)
    keypoints: np.ndarray  # (5, 2) float32, KEYPOINT_NAMES order
    landmarks: np.ndarray | None = None  # (68, 2) where the backend has them
    embedding: np.ndarray | None = None  # (D,) float32, L2-normalised
    # L2 norm of the recogniser's raw output, where the backend exposes it (InsightFace's
    # ``face.embedding`` = ``embedding * embedding_norm``; InstantID's Resampler reads that raw vector).
    embedding_norm: float | None = None
    # (this face's index, number of faces) in the photo it was chosen from, faces numbered left to
    # right; kept by the embedding cache so that a cached analysis still warns about the others.
    selection: tuple[int, int] | None = None

    @property
    def raw_embedding(self) -> np.ndarray | None:
        """The un-normalised embedding (D,) float32, or None where the backend gives only the normalised one."""
        if self.embedding is None or self.embedding_norm is None:
            return None
        return (self.embedding * np.float32(self.embedding_norm)).astype(np.float32)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.bbox)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass(frozen=True)
class Pose:
    """Five face keypoints and the size of the photo they come from (InstantID's pose control)."""

    keypoints: np.ndarray  # (5, 2) float32, KEYPOINT_NAMES order, pixel coordinates of the photo
    size: tuple[int, int]  # (width, height) of the photo
    source: str = ""


@dataclass
class Identity:
    """What the engine needs to know about one person.

    ``embedding`` is the L2-normalised mean of the per-photo ``embeddings``; ``crops`` are the
    aligned 224x224 RGB face crops (one per photo) that FaceID-Plus feeds to its CLIP encoder;
    ``keypoints`` the five keypoints per photo and ``image_sizes`` each photo's (width, height)
    (InstantID draws the keypoints on a canvas of that size); ``raw_embeddings`` the un-normalised
    recogniser outputs (n, D) where the backend exposes them (InstantID, FaceID-Portrait ``_unnorm``).
    """

    embedding: np.ndarray  # (D,) float32, L2-normalised
    embeddings: np.ndarray  # (n, D) float32, one row per photo, each L2-normalised
    backend: str = "external"
    model: str = "external"
    crops: list[np.ndarray] = field(default_factory=list)  # each (224, 224, 3) uint8 RGB
    keypoints: list[np.ndarray] = field(default_factory=list)  # each (5, 2) float32
    sources: list[str] = field(default_factory=list)
    outliers: list[str] = field(default_factory=list)  # sources flagged as a different person
    similarities: list[float] = field(default_factory=list)  # each photo vs the others' mean
    raw_embeddings: np.ndarray | None = None  # (n, D) float32, un-normalised, where available
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per photo

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[-1])

    @property
    def num_photos(self) -> int:
        return int(self.embeddings.shape[0])

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, backend: str = "external", model: str = "external",
                        sources: list[str] | None = None) -> Identity:
        """Build an identity from raw embedding(s) of shape (D,) or (n, D)."""
        arr = check_embeddings(embeddings, "the embedding")
        if arr.ndim == 1:
            arr = arr[None]
        rows = arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)
        mean = rows.mean(axis=0)
        mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        # The vectors as given are also kept as the raw embeddings (what InstantID's Resampler reads:
        # pass InsightFace's un-normalised ``face.embedding`` there).
        return cls(embedding=mean.astype(np.float32), embeddings=rows.astype(np.float32), backend=backend,
                   model=model, sources=list(sources or []), raw_embeddings=arr.astype(np.float32))


def check_embeddings(embeddings: Any, what: str) -> np.ndarray:
    """Float32 copy of a (D,) or (n, D) real embedding array; InputError for anything else.

    Refused: other shapes, non-numeric data, and zero, NaN or infinite vectors (they have no
    direction, so no identity). ``what`` names the source in the message ("'id.npy'", "the embedding").
    """
    from ..errors import InputError

    try:
        raw = np.asarray(embeddings)
    except Exception:  # ragged lists and other objects numpy cannot make an array of
        raise InputError(f"{what} is not an array of numbers") from None
    if raw.dtype.kind not in "fiu" or raw.ndim not in (1, 2) or 0 in raw.shape:
        raise InputError(f"{what} holds a {raw.dtype} array of shape {tuple(raw.shape)}; expected float (D,) or (n, D)")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = raw.astype(np.float32)
        norms = np.linalg.norm(arr.reshape(-1, arr.shape[-1]), axis=1)
    if not np.isfinite(raw.astype(np.float64)).all() or (norms == 0).any():
        raise InputError(f"{what} holds a zero, NaN or infinite embedding")
    if not (np.isfinite(norms).all() and np.isfinite(arr).all()):
        # Values near float32's limit (3.4e38) overflow the norm: normalising would leave an
        # all-zero identity, silently, instead of an error.
        largest = float(np.abs(raw.astype(np.float64)).max())
        raise InputError(f"{what} has values too large for float32 (largest |value| {largest:.3g}; its norm overflows)")
    return arr
