"""Memory options of the engine: replacement VAEs (fp16-fix, tiny, a local folder), VAE tiling, CPU offload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastface.errors import ConfigError, InputError, MissingWeightsError
from fastface.messages import to_cli
from fastface.pipeline import FastFacePipeline, replace_vae


def _save_tiny_autoencoder(folder: Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """A random AutoencoderTiny with the tiny backbone's 8x scale (3 upsampling decoder blocks)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
    )
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_autoencoder(tmp_path_factory.mktemp("taesd-tiny"))


@pytest.fixture(scope="module")
def default_pipe(tiny_dir) -> FastFacePipeline:
    return FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu")


@pytest.fixture(scope="module")
def tiny_vae_pipe(tiny_dir, tiny_vae_dir) -> FastFacePipeline:
    return FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", vae=tiny_vae_dir)


def test_local_tiny_autoencoder_replaces_the_decoder_only(default_pipe, tiny_vae_pipe, tiny_vae_dir):
    face = torch.randn(128, generator=torch.Generator().manual_seed(0))
    ours = tiny_vae_pipe("a photo", face, seed=3, output_type="np", progress=False)
    base = default_pipe("a photo", face, seed=3, output_type="np", progress=False)
    # Same UNet, same seed: the latents agree; only the decoder that turns them into pixels differs.
    torch.testing.assert_close(ours.latents, base.latents)
    assert ours.images[0].shape == base.images[0].shape == (64, 64, 3)
    assert np.isfinite(ours.images[0]).all()
    assert np.abs(ours.images[0] - base.images[0]).max() > 1e-3
    memory = ours.metadata[0]["memory"]
    assert memory == {"vae": str(tiny_vae_dir), "vae_source": str(tiny_vae_dir), "vae_class": "AutoencoderTiny",
                      "vae_tiling": False, "cpu_offload": False}
    assert "vae" in ours.metadata[0]["licence"]
    assert base.metadata[0]["memory"]["vae"] == "default"
    assert base.metadata[0]["memory"]["vae_class"] == "AutoencoderKL"
    assert "vae" not in base.metadata[0]["licence"]


@pytest.mark.parametrize(("name", "repo"), [("fp16-fix", "madebyollin/sdxl-vae-fp16-fix"), ("tiny", "madebyollin/taesdxl")])
def test_named_vae_offline_names_the_repository(tiny_dir, name, repo):
    with pytest.raises(MissingWeightsError, match=repo) as info:
        FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", vae=name)
    message = str(info.value)
    assert f"fastface download --vae {name}" in message and len(message.splitlines()) == 1
    assert "or pass vae=<local diffusers VAE folder>" in message  # the CLI shows: --vae <local ...>
    assert "or pass --vae <local diffusers VAE folder>" in to_cli(message)


def test_unusable_vae_choices(tiny_dir, tmp_path, default_pipe):
    with pytest.raises(ConfigError, match="fp16-fix"):
        FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", vae="fp16fix")  # a typo, no such folder
    not_a_vae = tmp_path / "unet"
    not_a_vae.mkdir()
    (not_a_vae / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(InputError, match="UNet2DConditionModel"):
        FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", vae=not_a_vae)
    from diffusers import AutoencoderTiny

    wrong = _save_tiny_autoencoder(tmp_path / "eight-channels", latent_channels=8)
    before = default_pipe.sdxl.vae
    with pytest.raises(InputError, match="8 latent channels"):
        replace_vae(default_pipe.sdxl, AutoencoderTiny.from_pretrained(wrong), "eight-channels")
    assert default_pipe.sdxl.vae is before


def test_tiling_leaves_small_images_unchanged(default_pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = default_pipe.decode(latents, "np")
    default_pipe.set_vae_tiling(True)
    try:
        assert default_pipe.vae_tiling
        # 8x8 latents are below the KL VAE's tile size (its 64 px sample size): decoded in one piece.
        tiled = default_pipe.decode(latents, "np")
    finally:
        default_pipe.set_vae_tiling(False)
    np.testing.assert_allclose(np.stack(tiled), np.stack(plain), atol=1e-6)


def test_tiled_tiny_decode_with_small_tiles(tiny_dir, tiny_vae_dir, tiny_vae_pipe):
    pipe = FastFacePipeline.from_pretrained("tiny", None, device="cpu", vae=tiny_vae_dir, vae_tiling=True)
    vae = pipe.sdxl.vae
    # 4-latent tiles with one latent of overlap: an 8x8 latent is decoded as 3x3 blended tiles.
    vae.tile_latent_min_size, vae.tile_overlap_factor = 4, 0.25
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    tiled = pipe.decode(latents, "np")[0]
    whole = tiny_vae_pipe.decode(latents, "np")[0]
    assert tiled.shape == whole.shape == (64, 64, 3)
    assert np.isfinite(tiled).all()
    assert np.abs(tiled - whole).max() > 1e-4  # the tiles' borders show: tiling did run
    result = pipe("a photo", seed=0, output_type="latent", progress=False)
    assert result.metadata[0]["memory"]["vae_tiling"] is True


def test_cpu_offload_needs_cuda(tiny_dir):
    with pytest.raises(ConfigError, match="cpu_offload=True needs a CUDA device"):
        FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", cpu_offload=True)


def _fastface(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastface.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_generate_with_a_local_vae(tiny_dir, tiny_vae_dir, tmp_path):
    # FASTFACE_CACHE (set by tiny_dir) reaches the subprocess: it reuses the session's tiny models.
    face = tmp_path / "face.npy"
    np.save(face, np.random.default_rng(0).standard_normal(128).astype(np.float32))
    out = tmp_path / "image.png"
    proc = _fastface("generate", "--backbone", "tiny", "--face", str(face), "--prompt", "a photo",
                     "--vae", str(tiny_vae_dir), "--vae-tiling", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["memory"]["vae"] == str(tiny_vae_dir)
    assert meta["memory"]["vae_class"] == "AutoencoderTiny" and meta["memory"]["vae_tiling"] is True
    assert "vae: see the licence" in proc.stderr


def test_cli_missing_vae_is_one_line(tiny_dir, tmp_path):
    face = tmp_path / "face.npy"
    np.save(face, np.ones(128, dtype=np.float32))
    proc = _fastface("generate", "--backbone", "tiny", "--face", str(face), "--prompt", "x", "--vae", "fp16-fix",
                     "--device", "cpu", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "madebyollin/sdxl-vae-fp16-fix" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_offload_on_cuda_matches_the_resident_pipeline(tiny_dir):
    resident = FastFacePipeline.from_pretrained("tiny", "faceid", device="cuda", dtype=torch.float16)
    offloaded = FastFacePipeline.from_pretrained("tiny", "faceid", device="cuda", dtype=torch.float16,
                                                 cpu_offload=True)
    face = torch.randn(128, generator=torch.Generator().manual_seed(0))
    expected = resident(["a photo", "a portrait"], face, seed=5, output_type="np", progress=False)
    tokens = offloaded.encode_identity(face)
    embeds = offloaded.encode_prompt(["a photo", "a portrait"])
    got = offloaded(None, tokens, seed=5, output_type="np", progress=False, prompt_embeds=embeds)
    torch.testing.assert_close(got.latents, expected.latents, atol=2e-3, rtol=2e-3)
    assert got.latents.device.type == "cuda" and offloaded.device.type == "cuda"
    assert got.metadata[0]["memory"]["cpu_offload"] is True
    assert got.metadata[0]["device"].startswith("cuda")
    # Between calls the weights rest on the CPU.
    assert next(offloaded.sdxl.unet.parameters()).device.type == "cpu"
    assert next(offloaded.sdxl.vae.parameters()).device.type == "cpu"
