"""dlib face backend: HOG or MMOD-CNN detection, 68/5-point landmarks, ResNet 128-d embedding.

dlib comes from the ``dlib-bin`` wheel and its model files from the ``face-recognition-models``
package, located with ``find_spec`` rather than imported (its ``__init__`` needs pkg_resources).
Both are imported only when a :class:`DlibBackend` is built.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MissingWeightsError
from .align import ARCFACE_TEMPLATE, similarity_transform, transform_points
from .types import Face

MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn": "mmod_human_face_detector.dat",
    68: "shape_predictor_68_face_landmarks.dat",
    5: "shape_predictor_5_face_landmarks.dat",
}

# A HOG detection whose SVM margin is below this is kept only when no detection reaches it: on the
# test photos clear faces score > 0.9 while the astronaut's shoulder patch (a false positive) scores
# 0.12 and the cameraman's three-quarter face -0.11 (found only with threshold=-0.3 or the CNN).
WEAK_MARGIN = 0.4


def models_dir() -> Path:
    """The ``models`` folder of the installed ``face-recognition-models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "models"
        if (folder / MODEL_FILES["recognition"]).is_file():
            return folder
    raise MissingWeightsError("dlib face models not found: pip install face-recognition-models")


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as exc:
        raise MissingWeightsError(f"the dlib face backend needs dlib: pip install dlib-bin ({exc})") from None
    return dlib


def margin_to_score(margin: float) -> float:
    """A detector margin (0 at dlib's decision threshold) as a confidence in (0, 1): sigmoid(2 m)."""
    return 1.0 / (1.0 + math.exp(-2.0 * margin))


def keypoints_from_68(landmarks: np.ndarray) -> np.ndarray:
    """The five ArcFace-order keypoints from iBUG 68 landmarks.

    Eye centres are the means of points 36-41 (image-left eye) and 42-47; the nose tip is 30; the
    mouth corners are 48 and 54.
    """
    lm = np.asarray(landmarks, dtype=np.float32)
    return np.stack([lm[36:42].mean(axis=0), lm[42:48].mean(axis=0), lm[30], lm[48], lm[54]]).astype(np.float32)


def keypoints_from_5(landmarks: np.ndarray) -> np.ndarray:
    """The five ArcFace-order keypoints from dlib's 5-point model (eye corners and nose base).

    That model has no mouth: eye centres (points 2-3 image-left, 0-1 image-right) and the nose base
    (4) are fitted to the template's eyes and nose by a similarity, which then places the template's
    mouth corners. The mouth corners are therefore an estimate of a frontal face.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    observed = np.stack([lm[2:4].mean(axis=0), lm[0:2].mean(axis=0), lm[4]])
    to_image = similarity_transform(ARCFACE_TEMPLATE[:3], observed)
    mouth = transform_points(to_image, ARCFACE_TEMPLATE[3:])
    return np.vstack([observed, mouth]).astype(np.float32)


class DlibBackend:
    """dlib detection + landmarks + ``dlib_face_recognition_resnet_model_v1`` (128-d, L2-normalised).

    ``detector="hog"`` (fast, frontal faces) or ``"cnn"`` (MMOD, slower, more poses); ``upsample``
    defaults to 1 for images up to 800 px and 0 above (dlib finds faces >= 80 px / 2^upsample);
    ``threshold`` is dlib's decision margin (0 by default; lower finds harder faces); ``jitter`` is
    dlib's number of re-sampled embeddings averaged (0: one pass).
    """

    name = "dlib"
    model_id = "dlib_face_recognition_resnet_model_v1"
    embedding_dim = 128
    licence = "Boost Software License (dlib); models CC0 (face_recognition_models)"
    det_sizes: tuple[int, ...] = ()  # no fixed-size input: retrying at other det_size is pointless

    def __init__(self, detector: str = "hog", landmarks: int = 68, upsample: int | None = None,
                 threshold: float | None = None, jitter: int = 0) -> None:
        if detector not in ("hog", "cnn"):
            raise ConfigError(f"unknown dlib detector {detector!r}: choose 'hog' or 'cnn'")
        if landmarks not in (68, 5):
            raise ConfigError(f"dlib landmarks must be 68 or 5, got {landmarks!r}")
        if upsample is not None and not 0 <= int(upsample) <= 3:
            raise ConfigError(f"dlib upsample must be 0..3, got {upsample!r}")
        self._dlib = dlib = _import_dlib()
        folder = models_dir()
        for needed in ("recognition", int(landmarks), *(("cnn",) if detector == "cnn" else ())):
            if not (folder / MODEL_FILES[needed]).is_file():
                # The wheel (0.1.3) ships only the recogniser and the 68-point model; the CNN detector and the
                # 5-point model come with the source-only 0.3 release.
                raise MissingWeightsError(
                    f"dlib model file {MODEL_FILES[needed]} is not installed in {folder}: "
                    "pip install 'face-recognition-models>=0.3' for the CNN detector and the 5-point model"
                )
        self.detector_kind = detector
        self.num_landmarks = int(landmarks)
        self.upsample = upsample
        self.threshold = 0.0 if threshold is None else float(threshold)
        self.jitter = int(jitter)
        if detector == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            self._detector = dlib.cnn_face_detection_model_v1(str(folder / MODEL_FILES["cnn"]))
        self._predictor = dlib.shape_predictor(str(folder / MODEL_FILES[self.num_landmarks]))
        self._encoder = dlib.face_recognition_model_v1(str(folder / MODEL_FILES["recognition"]))
        # Part of the embedding-cache key: these options change which face and which vector come out.
        self.config_id = f"{detector}-{self.num_landmarks}-t{self.threshold:g}-u{upsample}-j{self.jitter}"

    def __repr__(self) -> str:
        return f"DlibBackend(detector={self.detector_kind!r}, landmarks={self.num_landmarks})"

    def _upsample_for(self, image: np.ndarray) -> int:
        if self.upsample is not None:
            return int(self.upsample)
        return 1 if max(image.shape[:2]) <= 800 else 0

    def _rectangles(self, image: np.ndarray) -> list[tuple[Any, float]]:
        up = self._upsample_for(image)
        if self.detector_kind == "hog":
            rects, margins, _ = self._detector.run(image, up, self.threshold)
            found = list(zip(rects, margins))
        else:
            found = [(d.rect, d.confidence) for d in self._detector(image, up) if d.confidence >= self.threshold]
        if any(m >= WEAK_MARGIN for _, m in found):
            found = [(r, m) for r, m in found if m >= WEAK_MARGIN]
        return found

    def _shape(self, image: np.ndarray, rect: Any) -> np.ndarray:
        shape = self._predictor(image, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)

    def detect(self, image: np.ndarray, *, det_size: int | None = None) -> list[Face]:
        img = np.ascontiguousarray(image, dtype=np.uint8)
        faces = []
        for rect, margin in self._rectangles(img):
            lm = self._shape(img, rect)
            kps = keypoints_from_68(lm) if self.num_landmarks == 68 else keypoints_from_5(lm)
            bbox = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float32)
            faces.append(Face(bbox=bbox, score=margin_to_score(float(margin)), keypoints=kps, landmarks=lm))
        return faces

    def _full_object_detection(self, image: np.ndarray, face: Face) -> Any:
        dlib = self._dlib
        x0, y0, x1, y1 = (round(float(v)) for v in face.bbox)
        rect = dlib.rectangle(int(x0), int(y0), int(x1) - 1, int(y1) - 1)
        lm = face.landmarks
        if lm is None or lm.shape != (self.num_landmarks, 2):
            # A face from another detector (or rescaled without landmarks): place ours in its box.
            return self._predictor(image, rect)
        return dlib.full_object_detection(rect, [dlib.point(round(float(x)), round(float(y))) for x, y in lm])

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        vec = self.embed_raw(image, face)
        return vec / max(float(np.linalg.norm(vec)), 1e-12)

    def embed_raw(self, image: np.ndarray, face: Face) -> np.ndarray:
        """dlib's descriptor as computed (before FastFace's L2 normalisation)."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        shape = self._full_object_detection(img, face)
        return np.asarray(self._encoder.compute_face_descriptor(img, shape, self.jitter, 0.25), dtype=np.float32)
