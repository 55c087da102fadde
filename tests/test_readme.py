"""The README's tiny-model Python example runs as written, offline; wrapping a diffusers pipeline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_readme_tiny_example_runs_as_written(tmp_path):
    tiny = [block for block in _python_blocks() if block.startswith("# tiny models, offline")]
    assert len(tiny) == 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", tiny[0]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "10"  # fastface's branch plan on the tiny 4-step backbone
    assert (tmp_path / "chef_tiny.png").is_file()
    # The API prints no third-party loading notices.
    assert "No LoRA keys" not in proc.stderr and "torchvision" not in proc.stderr


def test_from_pipe_wraps_an_existing_pipeline_like_from_pretrained():
    from diffusers import StableDiffusionXLPipeline

    from fastface import FastFacePipeline
    from fastface.faces.types import Identity
    from fastface.testing import TINY_EMBEDDING_DIM, tiny_model_dir

    face = Identity.from_embeddings(torch.randn(TINY_EMBEDDING_DIM, generator=torch.Generator().manual_seed(3)).numpy())
    loaded = FastFacePipeline.from_pretrained("tiny", "faceid", sampler="hyper-4", device="cpu")
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir() / "backbone")
    wrapped = FastFacePipeline.from_pipe(sdxl, "faceid", backbone="tiny", sampler="hyper-4")
    kwargs = {"face": face, "seed": 5, "output_type": "latent", "progress": False}
    a = loaded("a person", **kwargs)
    b = wrapped("a person", **kwargs)
    assert type(wrapped.sdxl.scheduler).__name__ == "DDIMScheduler"  # the sampler's, not the folder's Euler
    assert b.metadata[0]["backbone_config"]["sampler"] == "hyper-4"
    assert torch.equal(a.latents, b.latents)
