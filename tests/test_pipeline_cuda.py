"""GPU-only checks of the engine: no host-device synchronisation inside the denoising loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastface.backbones import BACKBONES, make_scheduler
from fastface.pipeline import FastFacePipeline
from fastface.testing import tiny_model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "fastface-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTFACE_CACHE", str(root))
        tiny_model_dir(root)
        yield FastFacePipeline.from_pretrained("tiny", "faceid", device="cuda", dtype=torch.float16)


def _strict_after_first_step(k: int, latents: torch.Tensor) -> None:
    # Step 0 may warm caches; from the end of it on, any synchronising call inside the loop raises.
    if k == 0:
        torch.cuda.set_sync_debug_mode("error")


@pytest.mark.parametrize("backbone", ["tiny", "hyper-4", "lcm", "turbo", "dmd2", "tcd"])
@pytest.mark.parametrize("method", ["fastface", "fastface-softmask", "none"])
def test_no_host_device_sync_in_the_loop(pipe, backbone, method):
    spec = dataclasses.replace(BACKBONES[backbone], resolution=64, lora=pipe.backbone.lora)
    original = (pipe.backbone, pipe.sdxl.scheduler)
    pipe.backbone, pipe.sdxl.scheduler = spec, make_scheduler(spec, pipe.sdxl.scheduler.config)
    try:
        result = pipe(["a photo", "a portrait"], torch.randn(128), method=method, steps=4,
                      callback=_strict_after_first_step, output_type="latent", progress=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        pipe.backbone, pipe.sdxl.scheduler = original
    assert torch.isfinite(result.latents).all()


def test_half_precision_images(pipe):
    result = pipe("a photo", torch.randn(128), method="fastface", progress=False)
    assert result.images[0].size == (64, 64)
    assert result.metadata[0]["dtype"] == "float16" and result.metadata[0]["device"].startswith("cuda")
