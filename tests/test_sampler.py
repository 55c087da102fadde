"""``--sampler NAME``: a distilled backbone's sampling (scheduler, steps, CFG-free) over a checkpoint
that has the distillation baked in, loading no distillation weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from fastface.backbones import BACKBONES, DISTILL_ADAPTER, backbone_spec, sampler_spec
from fastface.errors import ConfigError


def test_sampler_spec_takes_the_sampling_and_drops_the_weights():
    spec = sampler_spec("lightning-4", "sdxl")
    lightning = BACKBONES["lightning-4"]
    assert (spec.scheduler, dict(spec.scheduler_kwargs), spec.steps, spec.cfg_scale) == (
        lightning.scheduler, dict(lightning.scheduler_kwargs), lightning.steps, lightning.cfg_scale)
    assert spec.unet is None and spec.lora is None and spec.name == "custom" and spec.sampler == "lightning-4"
    dmd2 = sampler_spec("dmd2", "sdxl")
    assert dmd2.timesteps == (999, 749, 499, 249) and dmd2.scheduler == "LCMScheduler"
    tiny = backbone_spec("tiny", "hyper-4")
    assert tiny.name == "tiny" and tiny.scheduler == "DDIMScheduler" and tiny.lora is None
    with pytest.raises(ConfigError, match="unknown sampler 'bogus'"):
        sampler_spec("bogus")
    with pytest.raises(ConfigError, match="give it with base_model="):
        backbone_spec("hyper-4", "lightning-4")


def test_tiny_folder_runs_with_the_hyper_sd_scheduler_via_sampler(tmp_path):
    """One real generate run: the sampler setting, and every library warning as one CLI line."""
    astronaut = skimage.data.astronaut()
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        hopper = np.asarray(Image.open(fh).convert("RGB").resize((512, 512)))
    photo = np.concatenate([astronaut, hopper], axis=1)
    # A corner pixel unique to this run, so that this run detects the faces itself (the embedding
    # cache's replay of the several-faces warning is tested in test_faces_analysis).
    photo[0, 0] = np.frombuffer(os.urandom(3), np.uint8)
    Image.fromarray(photo).save(tmp_path / "two.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastface.cli", "generate", "--face", "two.png", "--prompt", "p",
                           "--negative-prompt", "blurry", "--backbone", "tiny", "--sampler", "hyper-4", "--method",
                           "none", "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "out" / "image_p00_seed0.json").read_text())
    config = meta["backbone_config"]
    assert config["scheduler"] == "DDIMScheduler" and config["scheduler_kwargs"] == {"timestep_spacing": "trailing"}
    assert config["sampler"] == "hyper-4" and config["lora"] is None
    assert DISTILL_ADAPTER not in meta["lora_weights"] and meta["steps"] == 4
    assert meta["unet_evaluations"] == 4  # method none, CFG-free: one branch per step
    warning_lines = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert ("warning: --negative-prompt has no effect: method none on this backbone is CFG-free (no step "
            "evaluates the negative text branch)") in warning_lines
    assert any("2 faces found in 'two.png'" in line and "pass --select <index>" in line for line in warning_lines)
    assert "UserWarning" not in proc.stderr and "select=" not in proc.stderr and ".py:" not in proc.stderr


def test_sampler_without_a_checkpoint_is_one_line_in_flags(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastface.cli", "generate", "--face", "x.png", "--prompt", "p",
                           "--sampler", "lightning-4", "--out", "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --sampler lightning-4 samples a checkpoint that has the distillation "
                                  "baked in; give it with --base-model <.safetensors file or diffusers folder>")
    assert "--backbone lightning-4" in proc.stderr and proc.stderr.count("\n") == 1
