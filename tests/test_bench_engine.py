"""Engine speed options: LoRA fusion, the lean AM kernel, public decode (tiny models, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastface.attention import AttentionManipulation, manipulated_ip_attention
from fastface.errors import ConfigError
from fastface.pipeline import FastFacePipeline
from fastface.processors import make_am_kernel, scale_power_attention

PROMPT = "a portrait photo"


@pytest.fixture(scope="module")
def embedding():
    return np.random.default_rng(0).standard_normal(128).astype(np.float32)


def _pipe() -> FastFacePipeline:
    return FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def unfused():
    return _pipe()


def test_fused_loras_give_the_unfused_result_and_fix_the_weights(unfused, embedding):
    expected = unfused(PROMPT, embedding, lora_scale=0.4, output_type="latent", progress=False).latents
    pipe = _pipe()
    fused = pipe.fuse_loras(lora_scale=0.4)
    assert fused == {"fastface_distill": 1.0, "fastface_id": 0.4}
    assert pipe.fused_loras == fused and unfused.fused_loras is None
    # No LoRA layer is left: a later adapter load has nothing to silently switch off.
    assert not any("lora" in type(m).__module__ for m in pipe.sdxl.unet.modules())
    got = pipe(PROMPT, embedding, lora_scale=0.4, output_type="latent", progress=False).latents
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # both LoRAs are in the fused weights: the distillation LoRA's share is not lost
    unfused.set_lora_weights({"fastface_distill": 0.0})
    try:
        without = unfused(PROMPT, embedding, lora_scale=0.4, output_type="latent", progress=False).latents
    finally:
        unfused.set_lora_weights({"fastface_distill": 1.0})
    assert (without - got).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="fused at lora_scale=0.4"):
        pipe(PROMPT, embedding, output_type="latent", progress=False)
    with pytest.raises(ConfigError, match="fused"):
        pipe.set_lora_weights({"fastface_distill": 0.5})
    with pytest.raises(ConfigError, match="cannot be removed"):
        pipe.unload()
    with pytest.raises(ConfigError, match="already fused"):
        pipe.fuse_loras(lora_scale=0.4)


def _qkv(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 4, 50, 16, generator=g) * 2
    k = torch.randn(3, 4, 4, 16, generator=g) * 2
    v = torch.randn(3, 4, 4, 16, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("part", ["down", "up"])
def test_lean_scale_power_matches_the_reference(part):
    am = AttentionManipulation.scale_power()
    params = am.parts[part]
    q, k, v = _qkv(torch.float32)
    expected = manipulated_ip_attention(q, k, v, am, part=part)
    got = scale_power_attention(q, k, v, params.scale, params.power, am.cap)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    qh, kh, vh = _qkv(torch.bfloat16)
    half = scale_power_attention(qh, kh, vh, params.scale, params.power, am.cap)
    assert half.dtype == torch.bfloat16
    reference = manipulated_ip_attention(qh, kh, vh, am, part=part).float()
    assert (half.float() - reference).abs().max() < 0.03 * reference.abs().max()


def test_lean_kernel_applies_the_cap_when_it_binds():
    am = AttentionManipulation.scale_power(s_down=40.0, cap=10.0)
    q, k, v = _qkv(torch.float32, seed=1)
    expected = manipulated_ip_attention(q, k, v, am, part="down")
    got = scale_power_attention(q, k, v, 40.0, am.parts["down"].power, 10.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pipeline_results_do_not_depend_on_the_am_kernel(unfused, embedding):
    pipe = unfused
    assert pipe.am_kernel == "fused"
    pipe.set_am_kernel("lean")
    lean = pipe(PROMPT, embedding, method="fastface", output_type="latent", progress=False).latents
    pipe.set_am_kernel("reference")
    reference = pipe(PROMPT, embedding, method="fastface", output_type="latent", progress=False).latents
    torch.testing.assert_close(lean, reference, rtol=1e-4, atol=1e-4)
    # a token subset is not the lean kernel's case: the reference path runs
    subset = AttentionManipulation.scale_power(tokens=[1, 2])
    pipe.set_am_kernel("lean")
    a = pipe(PROMPT, embedding, attention=subset, output_type="latent", progress=False).latents
    pipe.set_am_kernel("reference")
    b = pipe(PROMPT, embedding, attention=subset, output_type="latent", progress=False).latents
    pipe.set_am_kernel("fused")
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="am kernel"):
        make_am_kernel("fastest")


def test_public_decode_matches_the_call_output(unfused, embedding):
    pipe = unfused
    result = pipe(PROMPT, embedding, method="fastface", progress=False)
    again = pipe.decode(result.latents)
    assert np.array_equal(np.asarray(again[0]), np.asarray(result.images[0]))
    assert pipe.decode(result.latents, "np")[0].shape == (64, 64, 3)
    with pytest.raises(ConfigError, match="decode"):
        pipe.decode(result.latents, "latent")
