"""A single-file base model: the tiny SDXL written in the original key layout by the test, read back
through diffusers' ``from_single_file`` offline; the shipped SDXL configurations for real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastface.backbones import load_backbone
from fastface.single_file import CONFIGS, TOKENIZER_FILES, sdxl_config_folder
from fastface.testing import write_tiny_single_file


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    return write_tiny_single_file(tmp_path_factory.mktemp("single") / "tiny-merge.safetensors")


def test_single_file_loads_the_same_weights_as_the_folder(single_file):
    from safetensors import safe_open

    with safe_open(str(single_file), "pt") as fh:
        keys = set(fh.keys())
    # The original layout, as community checkpoints ship it.
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith(("unet.", "down_blocks.", "text_model.")) for k in keys)
    folder = load_backbone("tiny", device="cpu", dtype=torch.float32)
    single = load_backbone("tiny", base_model=single_file, device="cpu", dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_single_file_with_a_sampler_from_the_cli(single_file, tmp_path):
    np.save(tmp_path / "face.npy", np.random.default_rng(0).standard_normal(128).astype(np.float32))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastface.cli", "generate", "--face", "face.npy", "--prompt", "p",
                           "--backbone", "tiny", "--base-model", str(single_file), "--sampler", "lightning-4",
                           "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "out" / "image_p00_seed0.json").read_text())
    assert meta["backbone_config"]["sampler"] == "lightning-4"
    assert meta["backbone_config"]["scheduler"] == "EulerDiscreteScheduler"


def test_eval_run_samples_a_single_file_like_a_backbone(single_file, tmp_path):
    """`eval run --sampler` runs, and the manifest holds it: its command repeats it, a resume without it is refused."""
    from fastface.evaluation.dataset import write_smoke_dataset

    smoke = write_smoke_dataset(tmp_path / "smoke").root
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "fastface.cli", "eval", "run", "--dataset", str(smoke), "--run-dir", "run",
              "--backbone", "tiny", "--base-model", str(single_file), "--split", "realistic", "--limit", "1",
              "--no-progress"]
    proc = subprocess.run([*common, "--sampler", "lightning-4"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["sampler"] == "lightning-4"
    assert "--sampler lightning-4" in manifest["canonical_command"]
    records = sorted((tmp_path / "run" / "records").glob("*.json"))
    assert len(records) == 2  # one realistic prompt x 2 identities
    again = subprocess.run(common, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2, again.stderr
    assert again.stderr.startswith("error: refusing to resume") and "--sampler is None here but 'lightning-4'" in again.stderr


def test_shipped_configs_describe_the_real_sdxl_layout(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizers = {}
    for folder in ("tokenizer", "tokenizer_2"):  # stand-ins: the layout is what is checked here
        for name in TOKENIZER_FILES:
            (tmp_path / "tok" / folder).mkdir(parents=True, exist_ok=True)
            tokenizers[f"{folder}/{name}"] = tmp_path / "tok" / folder / name
            tokenizers[f"{folder}/{name}"].write_text("{}")
    folder = sdxl_config_folder(tmp_path / "config", tokenizers)
    index = StableDiffusionXLPipeline.load_config(folder)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    config = UNet2DConditionModel.load_config(folder / "unet")
    assert config == {k: v for k, v in json.loads((CONFIGS / "sdxl_unet.json").read_text()).items() if k != "_note"}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    from fastface.single_file import _unet

    keys = set(_unet(unet.state_dict(), unet.config))  # the full SDXL UNet, on the meta device
    # Names every SDXL single-file checkpoint has (down-samplers, the up-samplers of the two attention up
    # blocks, the 10-layer middle transformer).
    for known in ("input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight", "output_blocks.2.2.conv.weight",
                  "output_blocks.5.2.conv.weight", "middle_block.1.transformer_blocks.9.attn1.to_q.weight",
                  "input_blocks.4.1.proj_in.weight", "label_emb.0.0.weight", "out.2.weight"):
        assert f"model.diffusion_model.{known}" in keys, known
    assert all(k.startswith("model.diffusion_model.") for k in keys) and len(keys) == len(unet.state_dict())
