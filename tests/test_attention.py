"""Attention manipulation (METHOD §3) against a reference written here from the METHOD text.

The reference loops over samples, heads, tokens and queries in float64; it can also normalise
over the whole batch (the published behaviour) to show that the batch-independence test bites.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastface.attention import (
    AttentionManipulation,
    ScalePowerParams,
    SoftmaskParams,
    manipulate_probs,
    manipulated_ip_attention,
)
from fastface.errors import ConfigError

# METHOD §3.2 defaults, restated here.
S_SCHEDULE = [7.5, 5.0, 5.0, 5.0]
C_SCHEDULE = [1.0, 1.55, 1.55, 1.55]


# ------------------------------------------------------------------------------- reference


def ref_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    B, H, L, d = q.shape
    S = k.shape[2]
    probs = torch.empty(B, H, L, S, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d) for j in range(S)]
                top = max(scores)
                exps = [math.exp(x - top) for x in scores]
                probs[b, h, i] = torch.tensor([e / sum(exps) for e in exps], dtype=torch.float64)
    return probs


def ref_scale_power(P, scale, power, tokens, cap=10.0):
    out = P.clone()
    for j in tokens:
        out[..., j] = torch.clamp(scale * P[..., j] ** power, max=cap)
    return out


def ref_softmask(P, s, c, q, tokens, inverted, cap=10.0, per_sample=True):
    """Steps 1–5 of METHOD §3.2 for the columns ``tokens``; other columns stay P."""
    B, H, L, S = P.shape
    T = P.clone()
    for j in tokens:
        X = 1 - P[..., j] if j in inverted else P[..., j].clone()  # (B, H, L)
        tau = torch.empty(B, H, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                tau[b, h] = max(torch.quantile(X[b, h], q).item(), 1e-6)

        def norm(Y):
            out = torch.empty_like(Y)
            for b in range(B):
                region = Y[b] if per_sample else Y  # jointly over heads and queries (and batch)
                lo, hi = region.min(), region.max()
                out[b] = (Y[b] - lo) / (hi - lo + 1e-12)
            return out

        NX = norm(X)
        Y = torch.empty_like(X)
        for b in range(B):
            for h in range(H):
                Y[b, h] = torch.sigmoid(s * (NX[b, h] - tau[b, h]))
        t = torch.clamp(c * norm(Y), max=cap)
        if j in inverted:
            for b in range(B):
                for h in range(H):
                    t[b, h] = t[b, h].max() - t[b, h]
        T[..., j] = t
    return T


def ref_adain(x, ref, w, eps=1e-6):
    """Per row of the last axis, unbiased std."""
    out = torch.empty_like(x)
    rows_x, rows_r, rows_o = (
        x.reshape(-1, x.shape[-1]),
        ref.reshape(-1, ref.shape[-1]),
        out.view(-1, x.shape[-1]),
    )
    n = x.shape[-1]
    for r in range(rows_x.shape[0]):
        vx, vr = rows_x[r].tolist(), rows_r[r].tolist()
        mx, mr = sum(vx) / n, sum(vr) / n
        sx = math.sqrt(sum((v - mx) ** 2 for v in vx) / (n - 1))
        sr = math.sqrt(sum((v - mr) ** 2 for v in vr) / (n - 1))
        rows_o[r] = torch.tensor(
            [w * v + (1 - w) * ((v - mx) * sr / (sx + eps) + mr) for v in vx], dtype=torch.float64
        )
    return out


def ref_softmask_attention(q, k, v, s, c, quantile, w, tokens=None, inverted=(0,), per_sample=True):
    P = ref_probs(q, k)
    tokens = range(P.shape[-1]) if tokens is None else tokens
    T = ref_softmask(P, s, c, quantile, tokens, inverted, per_sample=per_sample)
    P2 = ref_adain(T, P, w)
    return ref_adain(P2 @ v, P @ v, w)


def qkv(seed=0, B=2, H=2, L=12, S=4, d=8, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(B, H, S, d, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, S, d, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------- scale-power


@pytest.mark.parametrize(("part", "scale"), [("down", 1.55), ("up", 1.45)])
def test_scale_power_defaults_match_reference(part, scale):
    q, k, v = qkv(1)
    got = manipulated_ip_attention(q, k, v, AttentionManipulation.scale_power(), part=part, step=3)
    close(got, ref_scale_power(ref_probs(q, k), scale, 1.3, range(4)) @ v)


def test_scale_power_tokens_steps_and_parts():
    q, k, v = qkv(2)
    am = AttentionManipulation.scale_power(
        parts=("mid", "up"), tokens=(1, 3), steps=(1, 2), params={"mid": ScalePowerParams(2.0, 0.8)}
    )
    P = ref_probs(q, k)
    close(manipulated_ip_attention(q, k, v, am, "mid", 1), ref_scale_power(P, 2.0, 0.8, (1, 3)) @ v)
    close(manipulated_ip_attention(q, k, v, am, "up", 2), ref_scale_power(P, 1.45, 1.3, (1, 3)) @ v)
    plain = F.scaled_dot_product_attention(q, k, v)
    for part, step in [("down", 1), ("mid", 0), ("up", 3)]:
        assert torch.equal(manipulated_ip_attention(q, k, v, am, part, step), plain)


def test_cap_applies():
    q, k, v = qkv(3)
    am = AttentionManipulation.scale_power(s_down=50.0, power=1.0, cap=2.0)
    P = ref_probs(q, k)
    expected = torch.clamp(50.0 * P, max=2.0)
    assert (50.0 * P > 2.0).any()
    close(manipulated_ip_attention(q, k, v, am, "down", 0), expected @ v)


def test_map_is_not_renormalised():
    q, k, _ = qkv(4)
    P = ref_probs(q, k)
    for am in (AttentionManipulation.scale_power(), AttentionManipulation.softmask()):
        rows = manipulate_probs(P, am, "down", 1).sum(dim=-1)
        assert (rows - 1).abs().max() > 1e-2


# ------------------------------------------------------------------------------- softmask


@pytest.mark.parametrize("step", [0, 1, 3, 6])
def test_softmask_defaults_match_reference(step):
    q, k, v = qkv(5)
    s, c = S_SCHEDULE[min(step, 3)], C_SCHEDULE[min(step, 3)]
    got = manipulated_ip_attention(q, k, v, AttentionManipulation.softmask(), "up", step)
    close(got, ref_softmask_attention(q, k, v, s, c, 0.65, 0.7))


@pytest.mark.parametrize("tokens", [(0,), (1, 3), (0, 2)])
def test_softmask_token_targeting(tokens):
    q, k, v = qkv(6)
    got = manipulated_ip_attention(q, k, v, AttentionManipulation.softmask(tokens=tokens), "down", 2)
    close(got, ref_softmask_attention(q, k, v, 5.0, 1.55, 0.65, 0.7, tokens=tokens))


def test_softmask_several_photos_inverts_first_token_of_each():
    q, k, v = qkv(7, S=8)
    got = manipulated_ip_attention(q, k, v, AttentionManipulation.softmask(), "down", 1, tokens_per_photo=4)
    close(got, ref_softmask_attention(q, k, v, 5.0, 1.55, 0.65, 0.7, inverted=(0, 4)))


def test_softmask_photo_size_comes_from_the_adapter_not_a_constant():
    # 16-token adapters (Plus-Face, Portrait, InstantID): two photos invert tokens 0 and 16; without a
    # photo size the whole axis is one photo (token 0 only).
    q, k, v = qkv(7, S=32)
    am = AttentionManipulation.softmask()
    got = manipulated_ip_attention(q, k, v, am, "down", 1, tokens_per_photo=16)
    close(got, ref_softmask_attention(q, k, v, 5.0, 1.55, 0.65, 0.7, inverted=(0, 16)))
    close(manipulated_ip_attention(q, k, v, am, "down", 1), ref_softmask_attention(q, k, v, 5.0, 1.55, 0.65, 0.7))
    with pytest.raises(ConfigError, match="32 identity tokens are not whole photos of 5 tokens"):
        manipulated_ip_attention(q, k, v, am, "down", 1, tokens_per_photo=5)


def test_softmask_per_part_parameters():
    q, k, v = qkv(8)
    custom = SoftmaskParams(s=(3.0, 9.0), c=(2.0,), quantile=0.4, adain_weight=0.3)
    am = AttentionManipulation.softmask(parts=("down", "up"), params={"up": custom})
    close(manipulated_ip_attention(q, k, v, am, "up", 1), ref_softmask_attention(q, k, v, 9.0, 2.0, 0.4, 0.3))
    close(
        manipulated_ip_attention(q, k, v, am, "down", 1),
        ref_softmask_attention(q, k, v, 5.0, 1.55, 0.65, 0.7),
    )
    assert torch.equal(
        manipulated_ip_attention(q, k, v, am, "mid", 1), F.scaled_dot_product_attention(q, k, v)
    )


@pytest.mark.parametrize("w", [0.0, 1.0])
def test_softmask_adain_weight_extremes(w):
    q, k, v = qkv(9)
    am = AttentionManipulation.softmask(adain_weight=w)
    close(
        manipulated_ip_attention(q, k, v, am, "down", 0), ref_softmask_attention(q, k, v, 7.5, 1.0, 0.65, w)
    )


def test_softmask_is_batch_independent():
    q, k, v = qkv(10, B=3)
    k[2] *= 4  # a very different sample in the batch: sharper attention, other min/max
    am = AttentionManipulation.softmask()
    batched = manipulated_ip_attention(q, k, v, am, "down", 1)
    for b in range(3):
        alone = manipulated_ip_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], am, "down", 1)
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-12, atol=1e-12)
    # The published batch-global min/max would make sample 0 depend on sample 2.
    glob = ref_softmask_attention(q, k, v, 5.0, 1.55, 0.65, 0.7, per_sample=False)
    assert (glob[0] - batched[0]).abs().max() > 1e-4


# ------------------------------------------------------------------------------- plain path, dtypes


def test_untargeted_is_sdpa_exactly():
    q, k, v = qkv(11, dtype=torch.float32)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    assert torch.equal(manipulated_ip_attention(q, k, v, None, "down", 0), plain)
    assert torch.equal(
        manipulated_ip_attention(q, k, v, AttentionManipulation.scale_power(), "mid", 0), plain
    )
    softmask_later = AttentionManipulation.softmask(steps="2,3")
    assert torch.equal(manipulated_ip_attention(q, k, v, softmask_later, "up", 1), plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["scale_power", "softmask"])
def test_half_precision(dtype, mode):
    q, k, v = qkv(12, dtype=dtype)
    am = getattr(AttentionManipulation, mode)()
    out = manipulated_ip_attention(q, k, v, am, "down", 1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    reference = manipulated_ip_attention(q.double(), k.double(), v.double(), am, "down", 1)
    torch.testing.assert_close(out.double(), reference, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------- configuration


def test_presets_and_serialisation():
    am = AttentionManipulation.scale_power()
    assert am.targets("down", 0) and am.targets("up", 7) and not am.targets("mid", 0)
    assert am.to_dict() == {
        "mode": "scale-power",
        "parts": {"down": {"scale": 1.55, "power": 1.3}, "up": {"scale": 1.45, "power": 1.3}},
        "tokens": None,
        "steps": None,
        "cap": 10.0,
    }
    soft = AttentionManipulation.softmask(tokens="2,0", steps=[3, 1])
    assert soft.tokens == (0, 2) and soft.steps == (1, 3)
    assert soft.to_dict()["parts"]["up"] == {
        "s": S_SCHEDULE,
        "c": C_SCHEDULE,
        "quantile": 0.65,
        "adain_weight": 0.7,
        "eps": 1e-6,
    }
    assert soft.targets("up", 3) and not soft.targets("up", 2)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: AttentionManipulation("blur", {"down": ScalePowerParams(1.0)}), "attention mode"),
        (lambda: AttentionManipulation("softmask", {"down": ScalePowerParams(1.0)}), "needs SoftmaskParams"),
        (lambda: AttentionManipulation("scale-power", {}), "at least one part"),
        (lambda: AttentionManipulation.scale_power(parts=("left",)), "attention part"),
        (lambda: AttentionManipulation.scale_power(params={"mid": ScalePowerParams(1.0)}), "not targeted"),
        (lambda: AttentionManipulation.scale_power(tokens=(-1,)), "attention tokens"),
        (lambda: AttentionManipulation.scale_power(steps="a,b"), "attention steps"),
        (lambda: AttentionManipulation.scale_power(cap=0), "cap"),
        (lambda: AttentionManipulation.scale_power(power=float("nan")), "power"),
        (lambda: AttentionManipulation.softmask(quantile=1.5), "quantile"),
        (lambda: AttentionManipulation.softmask(s=()), "s schedule"),
        (lambda: AttentionManipulation.softmask().targets("middle", 0), "attention part"),
    ],
)
def test_invalid_configuration(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_invalid_for_the_inputs():
    q, k, v = qkv(13)
    with pytest.raises(ConfigError, match="out of range for 4"):
        manipulated_ip_attention(q, k, v, AttentionManipulation.scale_power(tokens=(4,)), "down", 0)
    q1, k1, v1 = qkv(13, S=1)
    with pytest.raises(ConfigError, match="at least 2 identity tokens"):
        manipulated_ip_attention(q1, k1, v1, AttentionManipulation.softmask(), "down", 0)
