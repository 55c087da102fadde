"""SCRFD face detection run directly with onnxruntime (no ``insightface`` package).

SCRFD (Guo et al., 2021, "Sample and Computation Redistribution for Efficient Face Detection") is an
anchor-based single-stage detector. Its ONNX export, as shipped in InsightFace's model packs, takes
one NCHW float32 image and returns, for each feature-pyramid level (strides 8, 16, 32), a score per
anchor, four box distances per anchor and, in the ``kps`` variants, ten keypoint offsets per anchor.
The facts this module relies on (as InsightFace's ``model_zoo/scrfd.py`` uses the models):

* input: the image letterboxed into ``det_size`` x ``det_size`` keeping its aspect ratio, placed at
  the top-left of a black canvas, RGB, ``(x - 127.5) / 128``;
* anchors: two per cell, centred at ``(column, row) * stride`` (no half-cell offset);
* distances are in units of the stride: ``box = (cx - l, cy - t, cx + r, cy + b) * stride``;
* post-processing: score threshold 0.5, NMS at IoU 0.4, coordinates divided by the letterbox scale.

Everything except :class:`ScrfdDetector` is a pure numpy function so that decoding can be tested
without a model. onnxruntime is only imported when a detector is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError

INPUT_MEAN = 127.5
INPUT_STD = 128.0
DEFAULT_NMS_IOU = 0.4
DEFAULT_SCORE_THRESHOLD = 0.5
BASE_STRIDE = 8


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of an (H, W, C) uint8 image, sampled as OpenCV's ``INTER_LINEAR`` does.

    Output pixel ``(x, y)`` reads the input at ``u = (x + 0.5) * W / width - 0.5`` (same for ``v``),
    clamped to the image, interpolating its four neighbours; no antialiasing, so the detector sees
    the same pixels as in InsightFace (which resizes with ``cv2.resize``).
    """
    src = np.asarray(image)
    in_h, in_w = src.shape[:2]

    def _axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        pos = np.clip(pos, 0.0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = _axis(height, in_h)
    x0, x1, fx = _axis(width, in_w)
    data = src.astype(np.float32)
    rows = data[y0] * (1.0 - fy)[:, None, None] + data[y1] * fy[:, None, None]
    out = rows[:, x0] * (1.0 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def letterbox(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, float]:
    """Resize ``image`` to fit ``width`` x ``height`` keeping its aspect ratio, top-left on black.

    Returns the canvas and ``scale`` = new height / original height, so that canvas coordinates
    divided by ``scale`` are original-image coordinates.
    """
    in_h, in_w = image.shape[:2]
    ratio = in_h / in_w  # computed as InsightFace does, so that sizes round the same way
    if ratio > height / width:
        new_h = height
        new_w = max(1, int(new_h / ratio))
    else:
        new_w = width
        new_h = max(1, int(new_w * ratio))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resize_bilinear(image, new_w, new_h)
    return canvas, new_h / in_h


def to_blob(image: np.ndarray, mean: float = INPUT_MEAN, std: float = INPUT_STD) -> np.ndarray:
    """(H, W, 3) RGB uint8 -> (1, 3, H, W) float32 ``(x - mean) / std``."""
    chw = np.transpose(np.asarray(image, dtype=np.float32), (2, 0, 1))
    return ((chw - mean) / std)[None]


def anchor_centers(height: int, width: int, stride: int, num_anchors: int = 2) -> np.ndarray:
    """Anchor centres of a ``height`` x ``width`` feature map: (height * width * num_anchors, 2).

    Row-major over cells, each cell's centre ``(col * stride, row * stride)`` repeated
    ``num_anchors`` times (the anchors of one cell are consecutive in SCRFD's outputs).
    """
    rows, cols = np.mgrid[:height, :width]
    centres = np.stack([cols, rows], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centres, num_anchors, axis=0)


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Boxes from centre-to-side distances: ``(x - l, y - t, x + r, y + b)``; (N, 2), (N, 4) -> (N, 4)."""
    return np.concatenate([points - distance[:, :2], points + distance[:, 2:4]], axis=1)


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Keypoints from offsets: ``k_i = p + d_i``; (N, 2), (N, 2K) -> (N, K, 2)."""
    return points[:, None, :] + distance.reshape(distance.shape[0], distance.shape[1] // 2, 2)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(boxes[..., 3] - boxes[..., 1], 0, None)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with (N, 4) boxes: ``|A ∩ B| / (|A| + |B| - |A ∩ B|)``, continuous coordinates."""
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    union = _area(box) + _area(boxes) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = DEFAULT_NMS_IOU) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, by decreasing score.

    Repeatedly keep the best remaining box and drop every box whose IoU with it exceeds
    ``iou_threshold``.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def group_outputs(outputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray] | None]:
    """Split SCRFD's raw outputs into per-level (scores, box distances, keypoint offsets).

    Outputs are recognised by their last dimension (1 score, 4 distances, 10 keypoint offsets) and
    ordered by decreasing anchor count, i.e. increasing stride; a leading batch dimension of 1 is
    dropped. This accepts the 6-output (no keypoints) and 9-output exports as well as the 10/15
    output five-level ones, in any output order.
    """
    flat = []
    for out in outputs:
        arr = np.asarray(out, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise ConfigError(f"not an SCRFD detector: an output has shape {tuple(np.shape(out))}, expected (N, C)")
        flat.append(arr)
    by_width: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
    for arr in flat:
        if arr.shape[1] not in by_width:
            raise ConfigError(f"not an SCRFD detector: an output has {arr.shape[1]} channels (expected 1, 4 or 10)")
        by_width[arr.shape[1]].append(arr)
    levels = len(by_width[1])
    if levels == 0 or len(by_width[4]) != levels or len(by_width[10]) not in (0, levels):
        raise ConfigError(
            f"not an SCRFD detector: {len(flat)} outputs ({levels} score, {len(by_width[4])} box, "
            f"{len(by_width[10])} keypoint maps)"
        )
    ordered = {w: sorted(arrs, key=lambda a: -a.shape[0]) for w, arrs in by_width.items()}
    return ordered[1], ordered[4], (ordered[10] or None)


def decode(
    outputs: Sequence[np.ndarray],
    input_height: int,
    input_width: int,
    threshold: float = DEFAULT_SCORE_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw SCRFD outputs -> (boxes (n, 4), scores (n,), keypoints (n, 5, 2) or None), input coordinates.

    Level ``i`` has stride ``8 * 2**i`` and a ``(H // stride) x (W // stride)`` grid; the number of
    anchors per cell is read from the size of the first level. Distances are multiplied by the
    stride, then decoded around the anchor centres; anchors scoring below ``threshold`` are dropped.
    """
    scores, boxes, kps = group_outputs(outputs)
    cells0 = (input_height // BASE_STRIDE) * (input_width // BASE_STRIDE)
    if cells0 == 0 or scores[0].shape[0] % cells0:
        raise ConfigError(
            f"SCRFD outputs do not match a {input_width}x{input_height} input "
            f"({scores[0].shape[0]} anchors at stride {BASE_STRIDE})"
        )
    num_anchors = scores[0].shape[0] // cells0
    out_boxes, out_scores, out_kps = [], [], []
    for level, (score, dist) in enumerate(zip(scores, boxes)):
        stride = BASE_STRIDE * 2**level
        centres = anchor_centers(input_height // stride, input_width // stride, stride, num_anchors)
        if centres.shape[0] != score.shape[0] or dist.shape[0] != score.shape[0]:
            raise ConfigError(
                f"SCRFD stride-{stride} outputs have {score.shape[0]} scores and {dist.shape[0]} boxes, "
                f"expected {centres.shape[0]} for a {input_width}x{input_height} input"
            )
        hit = score[:, 0] >= threshold
        out_scores.append(score[hit, 0])
        out_boxes.append(distance2bbox(centres[hit], dist[hit] * stride))
        if kps is not None:
            out_kps.append(distance2kps(centres[hit], kps[level][hit] * stride))
    return (
        np.concatenate(out_boxes).astype(np.float32),
        np.concatenate(out_scores).astype(np.float32),
        np.concatenate(out_kps).astype(np.float32) if kps is not None else None,
    )


def select_largest_central(boxes: np.ndarray, image_height: int, image_width: int, max_num: int) -> np.ndarray:
    """Indices of the ``max_num`` best boxes by ``area - 2 * |centre - image centre|^2`` (InsightFace's rule)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 - image_width // 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 - image_height // 2
    value = area - 2.0 * (cx**2 + cy**2)
    return np.argsort(-value, kind="stable")[:max_num]


def postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    kps: np.ndarray | None,
    scale: float,
    image_height: int,
    image_width: int,
    iou_threshold: float = DEFAULT_NMS_IOU,
    max_num: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """NMS, then map to original-image coordinates (divide by the letterbox ``scale``), then keep
    at most ``max_num`` faces (0 = all). Results are ordered by decreasing score."""
    keep = nms(boxes, scores, iou_threshold)
    boxes, scores = boxes[keep] / scale, scores[keep]
    kps = kps[keep] / scale if kps is not None else None
    if 0 < max_num < len(keep):
        chosen = np.sort(select_largest_central(boxes, image_height, image_width, max_num))
        boxes, scores = boxes[chosen], scores[chosen]
        kps = kps[chosen] if kps is not None else None
    return boxes.astype(np.float32), scores.astype(np.float32), (kps.astype(np.float32) if kps is not None else None)


def _static_dim(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class ScrfdDetector:
    """An SCRFD ONNX model plus its pre- and post-processing.

    ``det_size`` (a multiple of 32) is used when the model's input size is dynamic; a model exported
    with a fixed input size always runs at that size.
    """

    def __init__(
        self,
        model_path: str | None = None,
        providers: Sequence[Any] | None = None,
        *,
        session: Any = None,
        det_size: int = 640,
        nms_threshold: float = DEFAULT_NMS_IOU,
    ) -> None:
        if session is None:
            if model_path is None:
                raise ConfigError("ScrfdDetector needs a model path or an onnxruntime session")
            from .onnx_backend import open_session

            session = open_session(model_path, providers)
        self.session = session
        self.model_path = model_path
        self.nms_threshold = float(nms_threshold)
        inp = session.get_inputs()[0]
        if len(inp.shape) != 4:
            raise ConfigError(f"not an SCRFD detector: input '{inp.name}' has shape {inp.shape}, expected NCHW")
        self.input_name = inp.name
        self.fixed_size = None
        height, width = _static_dim(inp.shape[2]), _static_dim(inp.shape[3])
        if height and width:
            self.fixed_size = (width, height)
        self.output_names = [o.name for o in session.get_outputs()]
        self.has_keypoints = len(self.output_names) in (9, 15)
        self.det_size = self._check_size(det_size)

    @staticmethod
    def _check_size(det_size: int) -> int:
        size = int(det_size)
        if size < 32 or size % 32:
            raise ConfigError(f"det_size must be a positive multiple of 32 (e.g. 640), got {det_size}")
        return size

    def input_size(self, det_size: int | None = None) -> tuple[int, int]:
        """(width, height) the model will run at."""
        if self.fixed_size is not None:
            return self.fixed_size
        size = self.det_size if det_size is None else self._check_size(det_size)
        return size, size

    def detect(
        self,
        image: np.ndarray,
        threshold: float = DEFAULT_SCORE_THRESHOLD,
        det_size: int | None = None,
        max_num: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Faces in an RGB uint8 (H, W, 3) image: boxes (n, 4), scores (n,), keypoints (n, 5, 2) or None."""
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
            raise InputError(f"face detection needs an RGB image (H, W, 3), got shape {img.shape}")
        width, height = self.input_size(det_size)
        canvas, scale = letterbox(img.astype(np.uint8, copy=False), width, height)
        outputs = self.session.run(self.output_names, {self.input_name: to_blob(canvas)})
        boxes, scores, kps = decode(outputs, height, width, threshold)
        return postprocess(boxes, scores, kps, scale, img.shape[0], img.shape[1], self.nms_threshold, max_num)
