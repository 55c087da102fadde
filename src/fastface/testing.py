"""Test helpers: the tiny random-weight models of :mod:`fastface.tiny`, under the name tests use.

No engine module imports this one (``tests/test_architecture.py`` checks it); production code that
needs the tiny models imports :mod:`fastface.tiny`.
"""

from __future__ import annotations

from .tiny import (
    CLIP_MEAN,
    CLIP_STD,
    DISTILL_LORA_FILE,
    FACEID_FILE,
    FACEID_PLUS_FILE,
    TINY_CLIP_IMAGE_SIZE,
    TINY_CROSS_ATTENTION_DIM,
    TINY_EMBEDDING_DIM,
    TINY_LORA_RANK,
    TINY_NUM_TOKENS,
    TINY_RESOLUTION,
    TINY_VERSION,
    default_cache_root,
    tiny_model_dir,
    write_clip_tokenizer,
)
from .tiny_adapters import (
    CONTROLNET_DIR,
    INSTANTID_DIR,
    INSTANTID_FILE,
    PLUS_FACE_FILE,
    PORTRAIT_FILE,
    PORTRAIT_UNNORM_FILE,
)
from .tiny_pulid import (
    EVA_CLIP_FILE,
    PARSING_FILE,
    PULID_V1_FILE,
    PULID_V11_FILE,
    TINY_ANTELOPE_DIM,
    TINY_BISENET,
    TINY_EVA,
    build_tiny_pulid,
    tiny_pulid_dir,
)

__all__ = [
    "CONTROLNET_DIR",
    "INSTANTID_DIR",
    "INSTANTID_FILE",
    "PLUS_FACE_FILE",
    "PORTRAIT_FILE",
    "PORTRAIT_UNNORM_FILE",
    "EVA_CLIP_FILE",
    "PARSING_FILE",
    "PULID_V1_FILE",
    "PULID_V11_FILE",
    "TINY_ANTELOPE_DIM",
    "TINY_BISENET",
    "TINY_EVA",
    "build_tiny_pulid",
    "tiny_pulid_dir",
    "CLIP_MEAN",
    "CLIP_STD",
    "DISTILL_LORA_FILE",
    "FACEID_FILE",
    "FACEID_PLUS_FILE",
    "TINY_CLIP_IMAGE_SIZE",
    "TINY_CROSS_ATTENTION_DIM",
    "TINY_EMBEDDING_DIM",
    "TINY_LORA_RANK",
    "TINY_NUM_TOKENS",
    "TINY_RESOLUTION",
    "TINY_VERSION",
    "default_cache_root",
    "tiny_model_dir",
    "write_clip_tokenizer",
]
