"""Plain data passed between the face module and the generation engine.

Importing this module is cheap: no face backend (dlib, onnxruntime, OpenCV) is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.bbox)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass
class Identity:
    """What the engine needs to know about one person.

    ``embedding`` is the L2-normalised mean of the per-photo ``embeddings``; ``crops`` are the
    aligned 224x224 RGB face crops (one per photo) that FaceID-Plus feeds to its CLIP encoder;
    ``keypoints`` the five keypoints per photo (InstantID will need them).
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
        with np.errstate(over="ignore", invalid="ignore"):
            source = np.asarray(embeddings)
            arr = source.astype(np.float32)
            if arr.ndim == 1:
                arr, source = arr[None], source[None]
            if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
                from ..errors import InputError

                raise InputError(f"an identity embedding must have shape (D,) or (n, D), got {tuple(arr.shape)}")
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
        for row in range(arr.shape[0]):
            # float32 overflows at 3.4e38: values near it (or a float64 array beyond it) give an
            # infinite norm, and dividing by it would leave an all-zero identity, not an error.
            problem = None
            if not np.isfinite(source[row].astype(np.float64)).all():
                problem = "holds NaN or infinite values"
            elif not np.isfinite(norms[row, 0]) or not np.isfinite(arr[row]).all():
                largest = float(np.abs(source[row].astype(np.float64)).max())
                problem = f"has values too large for float32 (largest |value| {largest:.3g}; its norm overflows)"
            elif norms[row, 0] == 0:
                problem = "is all zero"
            if problem:
                from ..errors import InputError

                raise InputError(f"embedding row {row} {problem}; expected a face embedding (an L2-normalised vector)")
        rows = arr / np.maximum(norms, 1e-12)
        mean = rows.mean(axis=0)
        mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        return cls(embedding=mean.astype(np.float32), embeddings=rows.astype(np.float32), backend=backend,
                   model=model, sources=list(sources or []))
