"""The tiny model builder: layout, original key formats, determinism, atomic reuse."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastface.testing import (
    CONTROLNET_DIR,
    DISTILL_LORA_FILE,
    FACEID_FILE,
    FACEID_PLUS_FILE,
    INSTANTID_DIR,
    INSTANTID_FILE,
    PLUS_FACE_FILE,
    PORTRAIT_FILE,
    PORTRAIT_UNNORM_FILE,
    TINY_VERSION,
    tiny_model_dir,
)


def test_layout_and_reuse(tiny_dir):
    assert tiny_dir.name == f"tiny-sdxl-v{TINY_VERSION}"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_dir / "backbone" / part).is_dir()
    for name in (FACEID_FILE, FACEID_PLUS_FILE, DISTILL_LORA_FILE, "image_encoder/config.json"):
        assert (tiny_dir / name).is_file()
    stamp = (tiny_dir / FACEID_FILE).stat().st_mtime_ns
    assert tiny_model_dir(tiny_dir.parent) == tiny_dir  # a second call reuses the folder
    assert (tiny_dir / FACEID_FILE).stat().st_mtime_ns == stamp
    assert not [p for p in tiny_dir.parent.iterdir() if p.name.startswith(".tiny-build-")]
    config = json.loads((tiny_dir / "backbone" / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77


def test_faceid_checkpoint_has_the_original_key_layout(tiny_dir):
    state = torch.load(tiny_dir / FACEID_FILE, weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert set(state["image_proj"]) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
                                        "norm.weight", "norm.bias"}
    layers = state["ip_adapter"]
    indices = {int(k.split(".")[0]) for k in layers}
    assert indices == set(range(24))  # every attention processor of the tiny UNet
    ip_indices = {int(k.split(".")[0]) for k in layers if "_ip." in k}
    assert ip_indices == set(range(1, 24, 2))  # attn2 follows attn1 in every transformer block
    for index in range(24):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            assert f"{index}.{proj}_lora.down.weight" in layers and f"{index}.{proj}_lora.up.weight" in layers
    assert layers["1.to_k_lora.down.weight"].shape[1] == 64  # cross-attention input: the text width
    assert state["image_proj"]["proj.0.weight"].shape == (256, 128)  # 128-d (dlib) embeddings


def test_faceid_plus_checkpoint_has_the_perceiver_layout(tiny_dir):
    proj = torch.load(tiny_dir / FACEID_PLUS_FILE, weights_only=True)["image_proj"]
    for layer in range(4):
        for key in ("0.norm1.weight", "0.norm2.bias", "0.to_q.weight", "0.to_kv.weight", "0.to_out.weight",
                    "1.0.weight", "1.1.weight", "1.3.weight"):
            assert f"perceiver_resampler.layers.{layer}.{key}" in proj
    # diffusers infers heads = to_q rows // 64: the tiny resampler has one 64-d head.
    assert proj["perceiver_resampler.layers.0.0.to_q.weight"].shape == (64, 64)
    assert proj["perceiver_resampler.layers.0.0.to_kv.weight"].shape == (128, 64)
    image_encoder = json.loads((tiny_dir / "image_encoder" / "config.json").read_text())
    assert proj["perceiver_resampler.proj_in.weight"].shape[1] == image_encoder["hidden_size"]


def test_builds_are_deterministic(tiny_dir, tmp_path):
    other = tiny_model_dir(tmp_path)
    assert other != tiny_dir
    for name in (FACEID_FILE, FACEID_PLUS_FILE):
        first = torch.load(tiny_dir / name, weights_only=True)
        second = torch.load(other / name, weights_only=True)
        for group in first:
            for key, value in first[group].items():
                torch.testing.assert_close(second[group][key], value, rtol=0, atol=0)
    from safetensors.torch import load_file

    unet_a = load_file(tiny_dir / "backbone" / "unet" / "diffusion_pytorch_model.safetensors")
    unet_b = load_file(other / "backbone" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    for name in (PLUS_FACE_FILE, PORTRAIT_FILE, PORTRAIT_UNNORM_FILE, f"{INSTANTID_DIR}/{INSTANTID_FILE}"):
        first, second = (torch.load(d / name, weights_only=True) for d in (tiny_dir, other))
        assert all(torch.equal(first[g][k], second[g][k]) for g in first for k in first[g])
    net = Path(INSTANTID_DIR) / CONTROLNET_DIR / "diffusion_pytorch_model.safetensors"
    net_a, net_b = load_file(tiny_dir / net), load_file(other / net)
    assert all(torch.equal(net_a[k], net_b[k]) for k in net_a)


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model_dir(tmp_path)
    torch.testing.assert_close(torch.rand(3), expected)
