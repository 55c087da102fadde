"""ArcFace-style face recognition run directly with onnxruntime (no ``insightface`` package).

Recipe (as InsightFace's ``ArcFaceONNX`` feeds ``w600k_r50``/``glintr100``, and as AuraFace documents
the same use): the face is warped so that its five keypoints land on the ArcFace template in a
112x112 crop (:func:`fastface.faces.align.align_crop`); the crop goes in as RGB (InsightFace swaps its
BGR image to RGB), NCHW float32, ``(x - 127.5) / 127.5``; the output (1, D) is L2-normalised here
(InsightFace leaves that to the caller's ``normed_embedding``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from .align import align_crop

CROP_SIZE = 112


def crop_to_blob(crop: np.ndarray, mean: float = 127.5, std: float = 127.5) -> np.ndarray:
    """(n, S, S, 3) or (S, S, 3) RGB uint8 crops -> (n, 3, S, S) float32 ``(x - mean) / std``."""
    arr = np.asarray(crop, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    return np.ascontiguousarray(((arr - mean) / std).transpose(0, 3, 1, 2))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``x / max(||x||_2, eps)`` along the last axis."""
    arr = np.asarray(x, dtype=np.float32)
    return arr / np.maximum(np.linalg.norm(arr, axis=-1, keepdims=True), eps)


class ArcFaceRecognizer:
    """An ArcFace-style ONNX recogniser: aligned 112x112 crop in, L2-normalised embedding out."""

    def __init__(
        self,
        model_path: str | None = None,
        providers: Sequence[Any] | None = None,
        *,
        session: Any = None,
        input_mean: float = 127.5,
        input_std: float = 127.5,
    ) -> None:
        if session is None:
            if model_path is None:
                raise ConfigError("ArcFaceRecognizer needs a model path or an onnxruntime session")
            from .onnx_backend import open_session

            session = open_session(model_path, providers)
        self.session = session
        self.model_path = model_path
        self.input_mean = float(input_mean)
        self.input_std = float(input_std)
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or any(isinstance(d, int) and d != CROP_SIZE for d in shape[2:]) or (
            isinstance(shape[1], int) and shape[1] != 3
        ):
            raise ConfigError(
                f"not an ArcFace recogniser: input '{inp.name}' has shape {shape}, expected (n, 3, 112, 112)"
            )
        # A batch dimension fixed to 1 means crops must be run one by one.
        self.batch_one = shape[0] == 1
        outputs = session.get_outputs()
        self.output_name = outputs[0].name
        dim = outputs[0].shape[-1] if outputs[0].shape else None
        self.embedding_dim = dim if isinstance(dim, int) and dim > 0 else self._probe_dim()

    def _probe_dim(self) -> int:
        # Models exported with a symbolic output width: run one blank crop to read it.
        return int(self._run(np.zeros((1, 3, CROP_SIZE, CROP_SIZE), np.float32)).shape[-1])

    def _run(self, blob: np.ndarray) -> np.ndarray:
        if self.batch_one and blob.shape[0] > 1:
            return np.concatenate([self._run(blob[i : i + 1]) for i in range(blob.shape[0])])
        out = self.session.run([self.output_name], {self.input_name: blob})[0]
        return np.asarray(out, dtype=np.float32).reshape(blob.shape[0], -1)

    def embed_crops(self, crops: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Aligned (n, 112, 112, 3) or (112, 112, 3) RGB uint8 crops -> (n, D) float32.

        L2-normalised by default; ``normalize=False`` gives the model's raw output (InsightFace's
        ``face.embedding``, which InstantID feeds to its Resampler).
        """
        arr = np.asarray(crops)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
            raise InputError(f"ArcFace needs aligned {CROP_SIZE}x{CROP_SIZE} RGB crops, got shape {np.shape(crops)}")
        raw = self._run(crop_to_blob(arr, self.input_mean, self.input_std))
        return l2_normalize(raw) if normalize else raw

    def align(self, image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        """The 112x112 RGB crop of the face whose five keypoints are ``keypoints``, on the ArcFace template."""
        return align_crop(image, keypoints, size=CROP_SIZE)

    def embed(self, image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        """The L2-normalised (D,) embedding of the face at ``keypoints`` (5, 2) in an RGB uint8 image."""
        return self.embed_crops(self.align(image, keypoints))[0]

    def embed_raw(self, image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        """The un-normalised (D,) output for the face at ``keypoints`` (InsightFace's ``face.embedding``)."""
        return self.embed_crops(self.align(image, keypoints), normalize=False)[0]
