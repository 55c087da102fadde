"""Speed II on the CPU: the fused scale-power kernel, identity K/V once per call, cached placement, FP8 layers."""

from __future__ import annotations

import copy
import cProfile
import pstats

import numpy as np
import pytest
import torch

from fastface.attention import AttentionManipulation, fused_scale_power_attention, manipulated_ip_attention
from fastface.errors import ConfigError
from fastface.fp8 import Float8Linear, fp8_support, quantize_module_fp8, quantize_unet_fp8
from fastface.pipeline import FastFacePipeline
from fastface.placement import encode_sdxl_text

PROMPT = "a portrait photo"


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return FastFacePipeline.from_pretrained("tiny", "faceid", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def embedding():
    return np.random.default_rng(3).standard_normal(128).astype(np.float32)


def _qkv(dtype: torch.dtype, seed: int, length: int = 50, tokens: int = 4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, length, 16, generator=g, dtype=torch.float64) * 3
    k = torch.randn(2, 3, tokens, 16, generator=g, dtype=torch.float64) * 3
    v = torch.randn(2, 3, tokens, 16, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("scale", "power"), [(1.55, 1.3), (1.45, 1.3), (9.5, 2.0), (0.7, 0.5)])
def test_fused_kernel_matches_the_reference(seed, scale, power):
    am = AttentionManipulation.scale_power(s_down=scale, power=power)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        q, k, v = _qkv(dtype, seed * 7 + int(scale * 10), tokens=4 + seed * 4)
        expected = manipulated_ip_attention(q, k, v, am, part="down")
        torch.testing.assert_close(fused_scale_power_attention(q, k, v, scale, power, am.cap), expected,
                                   rtol=tol, atol=tol)
        # the parameters as 0-d tensors (as a compiled graph receives them): the same result
        got = fused_scale_power_attention(q, k, v, torch.tensor(scale, dtype=dtype), torch.tensor(power, dtype=dtype))
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_fused_kernel_keeps_the_exact_cap_when_it_can_bind():
    q, k, v = _qkv(torch.float32, 5)
    am = AttentionManipulation.scale_power(s_down=30.0, power=1.0, cap=10.0)
    expected = manipulated_ip_attention(q, k, v, am, part="down")
    uncapped = fused_scale_power_attention(q, k, v, 30.0, 1.0, cap=1e9)
    assert (uncapped - expected).abs().max() > 1e-2  # the cap binds on these inputs
    torch.testing.assert_close(fused_scale_power_attention(q, k, v, 30.0, 1.0, 10.0), expected, rtol=1e-5, atol=1e-5)


def test_fused_kernel_in_bfloat16_stays_near_the_float32_reference():
    q, k, v = _qkv(torch.float32, 9)
    am = AttentionManipulation.scale_power()
    reference = manipulated_ip_attention(q, k, v, am, part="up")
    half = fused_scale_power_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1.45, 1.3)
    assert half.dtype == torch.bfloat16
    assert (half.float() - reference).norm() / reference.norm() < 1e-2


def test_engine_fused_kernel_equals_reference_and_projects_identity_once_per_call(pipe, embedding):
    pipe.set_am_kernel("reference")
    try:
        reference = pipe(PROMPT, embedding, method="fastface", output_type="latent", progress=False).latents
        pipe.set_am_kernel("fused")
        # Count the identity K projections of one layer: once per call, for every distinct token
        # stack of it together (fastface at 4 steps: (null, id, full) and (null, full)), not once per
        # step, nor once per stack.
        layer = next(iter(pipe._ip_processors.values())).to_k_ip[0]
        calls = []
        handle = layer.register_forward_hook(lambda *_: calls.append(1))
        try:
            fused = pipe(PROMPT, embedding, method="fastface", output_type="latent", progress=False)
        finally:
            handle.remove()
    finally:
        pipe.set_am_kernel("fused")
    signatures = {tuple(p["branches"]) for p in fused.metadata[0]["schedule"]}
    assert len(signatures) == 2 and len(calls) == 1
    torch.testing.assert_close(fused.latents, reference, rtol=1e-5, atol=1e-5)
    # λ = 0 through the tensor path: the identity has no effect at all
    assert pipe.am_kernel == "fused"
    zero = pipe(PROMPT, embedding, method="none", ip_scale=0.0, output_type="latent", progress=False).latents
    other = pipe(PROMPT, -embedding, method="none", ip_scale=0.0, output_type="latent", progress=False).latents
    assert torch.equal(zero, other)


def test_prompt_encoding_equals_diffusers(pipe):
    prompts = ["a portrait photo", "an old man with a hat, oil painting"]
    with torch.no_grad():
        expected, _, pooled, _ = pipe.sdxl.encode_prompt(
            prompt=prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        got, got_pooled = encode_sdxl_text(pipe.sdxl, prompts, pipe.device)
    assert torch.equal(got, expected) and torch.equal(got_pooled, pooled)


WALKS = ("get_parameter_dtype", "get_parameter_device", "_get_top_level_group_offload_hook", "attn_processors")


def _walks_during(fn) -> dict[str, int]:
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    stats = pstats.Stats(profile).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    return {name: sum(v[1] for k, v in stats.items() if k[2] == name) for name in WALKS}


def test_a_call_walks_no_module_tree_and_to_moves_the_cache(pipe, embedding):
    pipe(PROMPT, embedding, output_type="pil", progress=False)  # warm
    walks = _walks_during(lambda: pipe(PROMPT, embedding, output_type="pil", progress=False))
    assert walks == dict.fromkeys(WALKS, 0)
    # The same measurement sees the walks the old placement reads make (the probe works).
    from fastface.bench import legacy_placement_view

    legacy = legacy_placement_view(pipe)
    old = _walks_during(lambda: legacy(PROMPT, embedding, output_type="pil", progress=False))
    assert old["get_parameter_dtype"] > 0 and old["get_parameter_device"] > 0
    # .to() re-reads the placement; the call then runs in the new dtype
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    before = pipe(PROMPT, embedding, output_type="latent", progress=False).latents
    pipe.to(dtype=torch.float64)
    try:
        assert pipe.dtype == torch.float64
        again = pipe(PROMPT, embedding, output_type="latent", progress=False)
        assert again.latents.dtype == torch.float64 and again.metadata[0]["dtype"] == "float64"
        assert torch.isfinite(again.latents).all()
    finally:
        pipe.to(dtype=torch.float32)
    assert pipe.dtype == torch.float32
    torch.testing.assert_close(pipe(PROMPT, embedding, output_type="latent", progress=False).latents, before)


def test_fp8_linear_matches_the_product_and_refuses_the_cpu_pipeline(pipe):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g))
    x = torch.randn(2, 10, 64, generator=g).bfloat16()
    layer = Float8Linear(linear.bfloat16())
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn
    got = layer(x)
    expected = linear(x).float()
    assert got.shape == (2, 10, 48) and got.dtype == torch.bfloat16
    # e4m3 keeps 3 mantissa bits: a few per cent of error per product, never more
    assert (got.float() - expected).norm() / expected.norm() < 0.06
    # only the transformer blocks' layers are replaced, never the identity K/V projections
    unet = copy.deepcopy(pipe.sdxl.unet)
    count = quantize_module_fp8(unet)
    assert count > 0 and not any("to_k_ip" in n for n, m in unet.named_modules() if isinstance(m, Float8Linear))
    assert "CUDA" in (fp8_support(torch.device("cpu")) or "")
    with pytest.raises(ConfigError, match="FP8 needs a CUDA GPU"):
        quantize_unet_fp8(pipe)


def test_stacks_projected_together_equal_each_stack_projected_alone(pipe):
    from fastface.processors import CallContexts

    processors = pipe._ip_processors
    width = next(iter(processors.values())).to_k_ip[0].in_features
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 4, width, generator=g), torch.randn(3, 4, width, generator=g)
    c = torch.randn(1, 8, width, generator=g)  # another token count: projected in its own group
    layer = next(iter(processors.values())).to_k_ip[0]
    calls = []
    handle = layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        together = CallContexts(processors, 1.0, None)
        together.project_stacks([a, b, c, a, b])
    finally:
        handle.remove()
    assert len(calls) == 2  # (a, b) joined, c alone; the repeated stacks not again
    for tokens in (a, b, c):
        alone = CallContexts(processors, 1.0, None)._kv(tokens)
        for name, (k, v) in together._kv(tokens).items():
            assert k.shape == alone[name][0].shape and v.shape == alone[name][1].shape
            torch.testing.assert_close(k, alone[name][0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(v, alone[name][1], rtol=1e-6, atol=1e-6)
    assert together._kv(a) is together._kv(a)  # a projected stack is looked up, not projected again
