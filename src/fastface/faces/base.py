"""The interface every face backend implements.

A backend only detects and embeds; choosing among several faces, retrying, alignment crops,
combining photos and caching are done once, above it, in :mod:`fastface.faces`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .types import Face


@runtime_checkable
class FaceBackend(Protocol):
    """Optional attributes, read with ``getattr`` (so they are not part of the protocol check):
    ``det_sizes`` (tuple of det_size values to retry when nothing is found, default (640, 480, 320);
    ``()`` for detectors without a fixed input size), ``config_id`` (str: constructor options that
    change the results, added to the embedding-cache key) and ``embed_raw(image, face) -> (D,)``
    (the recogniser's un-normalised output, for backends that have one; :func:`fastface.faces.analyze`
    then normalises it itself and keeps its norm in ``Face.embedding_norm``).
    """

    name: str  # registry name, e.g. "dlib"
    model_id: str  # identifies the weights (cache key), e.g. "dlib_face_recognition_resnet_model_v1"
    embedding_dim: int
    licence: str

    def detect(self, image: np.ndarray, *, det_size: int | None = None) -> list[Face]:
        """Faces in an RGB uint8 image (H, W, 3), with bbox, score and 5 keypoints.

        ``det_size`` is a hint for detectors that run at a fixed input size (SCRFD); others ignore it.
        """
        ...

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The L2-normalised embedding (embedding_dim,) float32 of ``face`` in ``image``."""
        ...
