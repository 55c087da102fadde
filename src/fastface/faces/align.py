"""Five-point face alignment onto the ArcFace template, numpy + Pillow only (no OpenCV).

Coordinates follow the convention of every face detector FastFace uses (and of OpenCV): a pixel's
centre is at integer coordinates, ``(x, y)`` = (column, row). Matrices are (2, 3) affine maps
``p' = M[:, :2] @ p + M[:, 2]`` from image coordinates to crop coordinates.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import InputError

# InsightFace's destination points of the five keypoints (KEYPOINT_NAMES order) in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def template_for(size: int = 112) -> np.ndarray:
    """The ArcFace template for a ``size`` x ``size`` crop, as InsightFace's ``estimate_norm``.

    Multiples of 112 scale the template by ``size / 112`` (224 is the crop FaceID-Plus feeds to
    CLIP); multiples of 128 scale by ``size / 128`` and shift right by ``8 * size / 128`` (the
    128-crop variant); any other size scales by ``size / 112``.
    """
    if size <= 0:
        raise InputError(f"an alignment crop size must be positive, got {size}")
    if size % 112 != 0 and size % 128 == 0:
        ratio = size / 128.0
        out = ARCFACE_TEMPLATE * ratio
        out[:, 0] += 8.0 * ratio
        return out.astype(np.float32)
    return (ARCFACE_TEMPLATE * (size / 112.0)).astype(np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` onto ``dst``.

    Umeyama (1991): with centred point sets ``a = src - mean(src)``, ``b = dst - mean(dst)`` and
    ``U S V^T = svd(b^T a / n)``, ``R = U diag(1, d) V^T`` (``d = sign det`` keeps R a rotation),
    ``s = tr(S diag(1, d)) / var(a)`` and ``t = mean(dst) - s R mean(src)``. Returns ``[s R | t]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise InputError(f"similarity_transform needs two (N, 2) point sets, N >= 2, got {src.shape} and {dst.shape}")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_src, dst - mu_dst
    var_a = float((a**2).sum(axis=1).mean())
    if var_a < 1e-12:
        raise InputError("similarity_transform: the source points all coincide")
    cov = b.T @ a / src.shape[0]
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0  # a reflection fits better; force a proper rotation instead
    rot = u @ np.diag(d) @ vt
    scale = float((sing * d).sum()) / var_a
    trans = mu_dst - scale * rot @ mu_src
    return np.hstack([scale * rot, trans[:, None]]).astype(np.float64)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine map to (N, 2) points: ``p @ M[:, :2]^T + M[:, 2]``."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:, :2].T + m[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a (2, 3) affine map: ``[A | t]^-1 = [A^-1 | -A^-1 t]``."""
    m = np.asarray(matrix, dtype=np.float64)
    a_inv = np.linalg.inv(m[:, :2])
    return np.hstack([a_inv, (-a_inv @ m[:, 2])[:, None]])


def alignment_matrix(keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """The (2, 3) map from image coordinates to a ``size`` crop that best fits the five keypoints."""
    kps = np.asarray(keypoints, dtype=np.float64)
    if kps.shape != (5, 2):
        raise InputError(f"alignment needs the five keypoints as a (5, 2) array, got {kps.shape}")
    return similarity_transform(kps, template_for(size))


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear warp of an RGB uint8 image by ``matrix`` (image -> output), black outside.

    ``size`` is an int (square) or ``(width, height)``. Pillow samples at pixel centres ``+0.5``;
    the inverse map is conjugated by that half-pixel shift so that integer coordinates stay pixel
    centres, as in OpenCV's ``warpAffine``.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"alignment needs an RGB image (H, W, 3), got shape {img.shape}")
    width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    inv = invert_affine(matrix)
    # Pillow maps output (x+.5, y+.5) through the coefficients and samples at input (u-.5, v-.5).
    a, b, c = inv[0]
    d, e, f = inv[1]
    coeffs = (a, b, c + 0.5 - 0.5 * (a + b), d, e, f + 0.5 - 0.5 * (d + e))
    pil = Image.fromarray(np.ascontiguousarray(img.astype(np.uint8, copy=False)), mode="RGB")
    out = pil.transform((width, height), Image.Transform.AFFINE, data=coeffs,
                        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out, dtype=np.uint8)


def align_crop(image: np.ndarray, keypoints: np.ndarray, size: int = 112) -> np.ndarray:
    """The face warped so that its five keypoints land on the ArcFace template: (size, size, 3) uint8.

    ``size=112`` is the ArcFace input, ``size=224`` the crop FaceID-Plus feeds to CLIP (InsightFace's
    ``norm_crop(image, kps, image_size=224)``).
    """
    return warp_affine(image, alignment_matrix(keypoints, size), size)
