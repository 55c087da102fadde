"""InstantID's IdentityNet conditioning image: the five face keypoints drawn as InstantID draws them.

The IdentityNet was trained on this exact rendering, so it is reproduced primitive by primitive
(OpenCV's ellipse polygon, convex fill and filled circle; the limb layer dimmed to 60 %):

- a black canvas the size of the photo the keypoints come from;
- four limbs from the nose (keypoint 2) to each other keypoint, each an ellipse polygon centred
  on the limb's midpoint (integer-truncated), half-axes (length / 2, 4), rotated by the limb's
  angle in whole degrees, drawn in the colour of the limb's outer keypoint; the limb layer is then
  multiplied by 0.6 and truncated to uint8;
- on top, a filled circle of radius 10 at every keypoint in its colour:
  left eye red, right eye green, nose blue, mouth-left yellow, mouth-right magenta (RGB).

The pipeline then resizes this image to the output size like diffusers' ControlNet pipelines
(:func:`control_tensor`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InputError

KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
LIMB_HALF_WIDTH = 4
LIMB_DIM = 0.6
POINT_RADIUS = 10


def draw_keypoints(keypoints: Any, size: tuple[int, int]) -> np.ndarray:
    """The (H, W, 3) uint8 RGB keypoint image for ``keypoints`` (5, 2) on a ``size`` = (width, height) canvas."""
    import cv2

    kps = np.asarray(keypoints)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise InputError(f"InstantID needs five finite (x, y) face keypoints, got an array of shape {kps.shape}")
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise InputError(f"the keypoint canvas must have a positive size, got {width}x{height}")
    # Float canvas, as the limbs are dimmed before the conversion to uint8.
    limbs = np.zeros((height, width, 3))
    for outer, inner in LIMBS:
        xs = kps[[outer, inner], 0]
        ys = kps[[outer, inner], 1]
        length = ((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        centre = (int(np.mean(xs)), int(np.mean(ys)))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), LIMB_HALF_WIDTH), int(angle), 0, 360, 1)
        limbs = cv2.fillConvexPoly(limbs, polygon, KEYPOINT_COLORS[outer])
    image = (limbs * LIMB_DIM).astype(np.uint8)
    for index, (x, y) in enumerate(kps):
        image = cv2.circle(image, (int(x), int(y)), POINT_RADIUS, KEYPOINT_COLORS[index], -1)
    return image


def control_tensor(image: np.ndarray, height: int, width: int, vae_scale_factor: int = 8) -> Any:
    """The (1, 3, height, width) float32 ControlNet input in [0, 1], resized as diffusers' ControlNet
    pipelines resize their conditioning image (``VaeImageProcessor``, no normalisation)."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
    return processor.preprocess(Image.fromarray(image), height=height, width=width).float()
