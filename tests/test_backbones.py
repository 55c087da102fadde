"""Backbone registry, schedulers and loading (offline errors, local bases, LoRAs)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastface.backbones import (
    BACKBONES,
    DISTILL_ADAPTER,
    STYLE_ADAPTER,
    get_backbone,
    load_backbone,
    make_scheduler,
)
from fastface.errors import ConfigError, InputError, MissingWeightsError
from fastface.testing import DISTILL_LORA_FILE


def test_registry_matches_the_method_table():
    expected = {
        "sdxl": ("EulerDiscreteScheduler", 30, 1024, 5.0),
        "hyper-1": ("DDIMScheduler", 1, 1024, 1.0),
        "hyper-2": ("DDIMScheduler", 2, 1024, 1.0),
        "hyper-4": ("DDIMScheduler", 4, 1024, 1.0),
        "hyper-8": ("DDIMScheduler", 8, 1024, 1.0),
        "lcm": ("LCMScheduler", 4, 1024, 1.5),
        "lightning-2": ("EulerDiscreteScheduler", 2, 1024, 1.0),
        "lightning-4": ("EulerDiscreteScheduler", 4, 1024, 1.0),
        "lightning-8": ("EulerDiscreteScheduler", 8, 1024, 1.0),
        "turbo": ("EulerAncestralDiscreteScheduler", 4, 512, 1.0),
        "dmd2": ("LCMScheduler", 4, 1024, 1.0),
        "tcd": ("TCDScheduler", 4, 1024, 1.0),
        "tiny": ("EulerDiscreteScheduler", 4, 64, 1.0),
    }
    assert set(BACKBONES) == set(expected)
    for name, (scheduler, steps, resolution, cfg) in expected.items():
        spec = BACKBONES[name]
        assert (spec.scheduler, spec.steps, spec.resolution, spec.cfg_scale) == (scheduler, steps, resolution, cfg)
        assert spec.licence
    assert BACKBONES["hyper-4"].lora == ("ByteDance/Hyper-SD", "Hyper-SDXL-4steps-lora.safetensors")
    assert BACKBONES["hyper-1"].lora == ("ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.safetensors")
    assert BACKBONES["lightning-4"].unet == ("ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors")
    assert BACKBONES["dmd2"].unet == ("tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin")
    assert BACKBONES["turbo"].base == "stabilityai/sdxl-turbo"
    assert BACKBONES["hyper-2"].scheduler_kwargs["timestep_spacing"] == "trailing"
    with pytest.raises(TypeError):
        BACKBONES["sdxl"].scheduler_kwargs["timestep_spacing"] = "leading"  # constant registry


def test_unknown_backbone_lists_the_names():
    with pytest.raises(ConfigError, match="unknown backbone 'hyper-3'.*hyper-4.*lightning-8.*tiny"):
        get_backbone("hyper-3")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_scheduler_builds_and_runs_its_default_steps(tiny_dir, name):
    import json

    spec = BACKBONES[name]
    base_config = json.loads((tiny_dir / "backbone" / "scheduler" / "scheduler_config.json").read_text())
    scheduler = make_scheduler(spec, base_config)
    assert type(scheduler).__name__ == spec.scheduler
    if spec.timesteps:
        scheduler.set_timesteps(timesteps=list(spec.timesteps))
        assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    else:
        scheduler.set_timesteps(spec.steps)
        assert len(scheduler.timesteps) == spec.steps
        if spec.scheduler_kwargs.get("timestep_spacing") == "trailing":
            assert int(scheduler.timesteps[0]) == 999  # trailing starts at the last training step


def test_missing_distillation_lora_names_repo_and_file(tiny_dir):
    with pytest.raises(MissingWeightsError) as info:
        load_backbone("hyper-4", base_model=tiny_dir / "backbone", device="cpu")
    message = str(info.value)
    assert "ByteDance/Hyper-SD" in message and "Hyper-SDXL-4steps-lora.safetensors" in message
    assert "offline" in message


def test_missing_replacement_unet_names_repo_and_file(tiny_dir):
    with pytest.raises(MissingWeightsError, match="sdxl_lightning_4step_unet.safetensors.*ByteDance/SDXL-Lightning"):
        load_backbone("lightning-4", base_model=tiny_dir / "backbone", device="cpu")


def test_missing_base_model_names_the_repo():
    with pytest.raises(MissingWeightsError, match="stabilityai/stable-diffusion-xl-base-1.0"):
        load_backbone("sdxl", device="cpu")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_backbone("sdxl", base_model="./no/such/folder", device="cpu")


def test_unreadable_single_file_base_is_an_input_error(tiny_dir, tmp_path):
    bogus = tmp_path / "not-sdxl.safetensors"
    save_file({"weight": torch.zeros(3)}, str(bogus))
    with pytest.raises(InputError, match="single-file SDXL checkpoint"):
        load_backbone("tiny", base_model=bogus, device="cpu")


def test_local_base_with_distillation_and_style_loras_all_active(tiny_dir):
    pipe = load_backbone("tiny", loras=[(tiny_dir / DISTILL_LORA_FILE, 0.5)], device="cpu")
    layer = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q
    style = STYLE_ADAPTER.format(0)
    assert set(layer.active_adapters) == {DISTILL_ADAPTER, style}
    assert layer.scaling[style] == pytest.approx(0.5) and layer.scaling[DISTILL_ADAPTER] == pytest.approx(1.0)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_bad_lora_argument_is_a_config_error(tiny_dir):
    with pytest.raises(ConfigError, match="LoRA weight must be a number"):
        load_backbone("tiny", loras=[(tiny_dir / DISTILL_LORA_FILE, "strong")], device="cpu")
