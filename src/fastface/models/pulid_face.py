"""PuLID's face preprocessing: the aligned 512² face, its parsing mask, EVA-CLIP's input.

The official pipeline (facexlib's ``FaceRestoreHelper``) warps the photo so that the five
keypoints land on the FFHQ 512² template (a similarity fitted by ``cv2.estimateAffinePartial2D``
with LMEDS, outside filled with grey (132, 133, 135) RGB), parses the crop with BiSeNet, turns the
face grey and everything else white, resizes it to EVA-CLIP's 336² (bicubic, no antialiasing, as
torchvision 0.15 pinned by PuLID does on tensors) and normalises it with CLIP's mean and std.
OpenCV (from the ``[faces]`` extra) does the fit and the warp, so the crop is facexlib's for the
same keypoints; the keypoints come from FastFace's face backend (PuLID detects them a second
time with RetinaFace).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .eva_clip import EVA_CLIP_MEAN, EVA_CLIP_STD
from .face_parsing import IMAGENET_MEAN, IMAGENET_STD, BiSeNet, face_only_gray

# facexlib's FFHQ five-point template for a 512² face (eyes, nose tip, mouth corners).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float64,
)
FACE_SIZE = 512
BORDER_RGB = (132, 133, 135)  # facexlib's (135, 133, 132) BGR


def align_face_512(image: np.ndarray, keypoints: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The RGB uint8 photo warped onto the FFHQ template: (size, size, 3) uint8."""
    import cv2

    kps = np.asarray(keypoints, dtype=np.float64).reshape(5, 2)
    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    matrix = cv2.estimateAffinePartial2D(kps, template, method=cv2.LMEDS)[0]
    if matrix is None:
        from ..errors import InputError

        raise InputError("the five face keypoints are degenerate: no alignment to the 512² template")
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_RGB)


def _normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def eva_pixels(face: np.ndarray, parser: BiSeNet, image_size: int) -> torch.Tensor:
    """EVA-CLIP's input for an aligned face (H, W, 3) uint8 RGB: (1, 3, image_size, image_size) float32.

    Runs on the parser's device; the parsing and the masking happen at the crop's size (512²).
    """
    param = next(parser.parameters())
    rgb = torch.from_numpy(np.ascontiguousarray(face)).to(param.device).permute(2, 0, 1)[None].float() / 255.0
    logits = parser(_normalise(rgb, IMAGENET_MEAN, IMAGENET_STD).to(param.dtype)).float()
    masked = face_only_gray(rgb, logits)
    resized = F.interpolate(masked, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return _normalise(resized, EVA_CLIP_MEAN, EVA_CLIP_STD)
