"""CLIP ViT image features of face crops, shared by the adapters that use a CLIP image encoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image_encoder(folder: Path, dtype: Any, device: Any) -> torch.nn.Module:
    """``CLIPVisionModelWithProjection`` from ``folder``, in eval mode on ``device``."""
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype)
    return encoder.to(device).eval()


class ClipPreprocessor:
    """CLIPImageProcessor's steps for square face crops: bicubic resize, rescale, normalise.

    Settings come from the encoder folder's ``preprocessor_config.json`` (CLIP defaults otherwise).
    """

    def __init__(self, folder: Path) -> None:
        config_path = folder / "preprocessor_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        crop = config.get("crop_size", 224)
        self.size = int(crop["height"] if isinstance(crop, dict) else crop)
        self.mean = tuple(config.get("image_mean", _CLIP_MEAN))
        self.std = tuple(config.get("image_std", _CLIP_STD))

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        """(3, size, size) float32 pixels of one RGB uint8 crop."""
        from PIL import Image

        arr = np.asarray(crop)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise InputError(f"face crops must be RGB uint8 (H, W, 3) arrays, got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr)
        if image.size != (self.size, self.size):
            image = resize_center_crop(image, self.size)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.transpose(2, 0, 1)


def resize_center_crop(image: Any, size: int) -> Any:
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left = (resized.size[0] - size) // 2
    top = (resized.size[1] - size) // 2
    return resized.crop((left, top, left + size, top + size))


def penultimate_features(
    encoder: torch.nn.Module, preprocess: ClipPreprocessor, crops: list[np.ndarray], device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate CLIP hidden states of ``crops`` (n, L, D), and of one all-zero pixel tensor (1, L, D)."""
    import torch

    dtype = next(encoder.parameters()).dtype
    pixels = torch.from_numpy(np.stack([preprocess(c) for c in crops])).to(device, dtype)
    hidden = encoder(pixels, output_hidden_states=True).hidden_states[-2]
    null = encoder(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
    return hidden, null
