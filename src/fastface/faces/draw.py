"""Drawing detections for a human to check: boxes, the five keypoints, the 68 landmarks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .types import Face

KEYPOINT_COLOURS = ((0, 160, 255), (0, 160, 255), (255, 200, 0), (255, 60, 160), (255, 60, 160))


def draw_faces(image: np.ndarray, faces: Sequence[Face], chosen: int | None = None) -> Image.Image:
    """An RGB image with every face's box (the chosen one green, others red), keypoints and landmarks."""
    out = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    pen = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 300))
    radius = max(2, width + 1)
    for i, face in enumerate(faces):
        colour = (40, 220, 40) if i == chosen else (230, 40, 40)
        pen.rectangle([float(v) for v in face.bbox], outline=colour, width=width)
        pen.text((float(face.bbox[0]) + 2, float(face.bbox[1]) + 2), f"#{i} {face.score:.2f}", fill=colour)
        if face.landmarks is not None:
            for x, y in face.landmarks:
                pen.point((float(x), float(y)), fill=(255, 255, 255))
        for (x, y), kc in zip(face.keypoints, KEYPOINT_COLOURS):
            pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=kc)
    if not faces:
        _banner(out, pen, NO_FACE)
    return out


NO_FACE = "no face found"


def _banner(image: Image.Image, pen: ImageDraw.ImageDraw, text: str) -> None:
    """``text`` in white on a red band across the top, large enough to read on a thumbnail."""
    from PIL import ImageFont

    size = max(12, image.size[0] // 16)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the small bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    pad = max(4, size // 4)
    pen.rectangle([0, 0, image.size[0], bottom - top + 2 * pad], fill=(200, 30, 30))
    pen.text((pad, pad - top), text, fill=(255, 255, 255), font=font)
