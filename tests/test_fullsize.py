"""Full-size SDXL configurations (no weights) and random-weight materialisation."""

from __future__ import annotations

import pytest
import torch

from fastface import fullsize
from fastface.errors import ConfigError


@pytest.mark.parametrize("name", sorted(fullsize.EXPECTED_PARAMETERS))
def test_config_builds_on_meta_with_published_parameter_count(name):
    module = fullsize.build_meta(name)
    assert all(p.is_meta for p in module.parameters())
    assert fullsize.count_parameters(module) == fullsize.EXPECTED_PARAMETERS[name]


def test_unet_config_is_sdxl_base():
    unet = fullsize.build_meta("unet")
    assert tuple(unet.config.block_out_channels) == (320, 640, 1280)
    assert tuple(unet.config.transformer_layers_per_block) == (1, 2, 10)
    assert unet.config.cross_attention_dim == 2048
    assert unet.config.addition_time_embed_dim == 256
    assert unet.config.projection_class_embeddings_input_dim == 2816
    assert round(fullsize.count_parameters(unet) / 1e9, 3) == 2.567


def test_unknown_component_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown full-size component"):
        fullsize.load_config("unet3")
    with pytest.raises(ConfigError, match="not a model"):
        fullsize.build_meta("scheduler")


def test_random_materialisation_is_seeded_finite_and_keeps_buffers():
    a = fullsize.build_component("vae_tiny", "cpu", torch.float32, seed=3)
    b = fullsize.build_component("vae_tiny", "cpu", torch.float32, seed=3)
    c = fullsize.build_component("vae_tiny", "cpu", torch.float32, seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert not any(p.is_meta for p in pa.values())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa if pa[k].ndim >= 2)
    with torch.no_grad():
        image = a.decode(torch.randn(1, 4, 8, 8)).sample
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    # Variance-preserving scale: a kernel's spread follows its fan-in.
    weight = next(p for p in pa.values() if p.ndim == 4 and p.shape[1] * p.shape[2] * p.shape[3] >= 64)
    fan_in = weight[0].numel()
    assert weight.std().item() == pytest.approx((1.0 / fan_in) ** 0.5, rel=0.1)


def test_text_encoder_buffers_survive_materialisation():
    # Only the parameters are meta during construction: position ids must stay 0..76.
    from transformers import CLIPTextConfig, CLIPTextModel

    config = fullsize.load_config("text_encoder")
    small = {k: v for k, v in config.items() if not k.startswith("_")} | {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 100,
    }
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = CLIPTextModel(CLIPTextConfig(**small))
    fullsize.materialise_random_(model, "cpu", torch.float32, seed=0)
    buffers = {name: b for name, b in model.named_buffers() if name.endswith("position_ids")}
    assert len(buffers) == 1
    assert torch.equal(next(iter(buffers.values())).flatten(), torch.arange(77))


def test_faceid_checkpoint_matches_the_tiny_original_layout():
    """Two independent writers (this one and fastface.testing's) agree on keys and shapes."""
    from diffusers import UNet2DConditionModel

    from fastface import testing

    folder = testing.tiny_model_dir()
    unet = UNet2DConditionModel.from_pretrained(folder / "backbone", subfolder="unet")
    reference = torch.load(folder / testing.FACEID_FILE, map_location="cpu", weights_only=True)
    ours = fullsize.faceid_state_dict(
        unet, embedding_dim=testing.TINY_EMBEDDING_DIM, num_tokens=testing.TINY_NUM_TOKENS,
        rank=testing.TINY_LORA_RANK,
    )
    for part in ("image_proj", "ip_adapter"):
        assert {k: tuple(v.shape) for k, v in ours[part].items()} == {
            k: tuple(v.shape) for k, v in reference[part].items()
        }


def test_full_size_faceid_checkpoint_shapes_on_meta_unet():
    unet = fullsize.build_meta("unet")
    state = fullsize.faceid_state_dict(unet, dtype=torch.float16, device="meta")
    proj, layers = state["image_proj"], state["ip_adapter"]
    assert proj["proj.0.weight"].shape == (1024, 512)
    assert proj["proj.2.weight"].shape == (4 * 2048, 1024)
    assert sum(k.endswith("to_k_ip.weight") for k in layers) == 70
    assert layers["1.to_k_ip.weight"].shape == (640, 2048)
    assert layers["0.to_q_lora.down.weight"].shape == (128, 640)
    # the published file is about 1.07 GB in fp16
    assert 1.0e9 < fullsize.parameter_bytes(state) < 1.15e9
