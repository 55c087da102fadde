"""Shared helpers of the evaluation tests: tiny random CLIP models and an aesthetic head, built offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastface.testing import write_clip_tokenizer

CLIP_IMAGE_SIZE = 32


def make_tiny_clip(folder: Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """A random CLIPModel (text + vision) with tokenizer and preprocessing config, saved to ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_clip_tokenizer(folder, merges=[("p", "h"), ("ph", "o"), ("t", "o</w>")])
    config = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": vocab_size - 1,
                     "bos_token_id": vocab_size - 2, "pad_token_id": vocab_size - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": CLIP_IMAGE_SIZE, "patch_size": 8},
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": CLIP_IMAGE_SIZE},
        "crop_size": {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


def make_aesthetic_head(path: Path, width: int, seed: int = 0) -> Path:
    """Random weights in the LAION improved-aesthetic-predictor layout (layers.0/2/4/6/7), as .pth."""
    import torch

    sizes = [width, 64, 32, 16, 8, 1]
    keys = [0, 2, 4, 6, 7]
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, fan_in, fan_out in zip(keys, sizes[:-1], sizes[1:]):
        state[f"layers.{key}.weight"] = torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5
        state[f"layers.{key}.bias"] = torch.randn(fan_out, generator=gen) * 0.1
    torch.save(state, path)
    return path


def fastface_cli(*args: str, env: dict | None = None, timeout: float = 240, cwd: Path | None = None):
    """Run ``python -m fastface.cli ...`` in a real subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastface.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
