"""PuLID's identity attention, as tensor math (torch only, no diffusers).

PuLID adds to the text attention output ``H`` of every cross-attention layer (before the output
projection) an identity attention ``O = Attn(Q, K_id, V_id)`` over the identity tokens, followed by
``Z`` all-zero "padding" tokens (``NUM_ZERO`` in the official code). The zero tokens have zero keys
and values (the projections have no bias): they only take softmax mass, which weakens the identity.
How ``O`` joins ``H`` (``ortho``):

- ``"off"``:  ``H + λ·O``;
- ``"v1"``:   ``H + λ·(O − proj_H(O))`` ("extremely style" mode of v1);
- ``"v2"``:   ``H + λ·(O + (a − 1)·proj_H(O))`` (v1 "fidelity" mode and the v1.1 default), where
  ``a`` (B, L, 1) is the attention mass on the first ``ortho_tokens`` (5) tokens, from an
  *unscaled* softmax of ``Q K_idᵀ`` averaged over heads, as the official code computes it;

with ``proj_H(O) = (Σ_L H·O / Σ_L H·H) · H`` per sample and channel (sums over the query positions;
zero where H is zero, as for a null-text branch whose text embeddings are all zero). The orthogonal
variants are computed in float32.

Attention manipulation (METHOD §7) acts on the identity softmax — over real and padding tokens as
PuLID normalises it — but changes only the real tokens' columns; the padding columns keep their
probabilities. It is applied before the orthogonal projection; ``a`` of ``"v2"`` stays the
unmanipulated map's, as it is a separate quantity of the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import AttentionManipulation, adain_output, attention_probs, manipulate_probs

ORTHO_MODES = ("off", "v1", "v2")


def pad_tokens(tokens: Tensor, num_zero: int) -> Tensor:
    """``tokens`` (B, S, C) followed by ``num_zero`` zero tokens: (B, S + Z, C)."""
    if num_zero <= 0:
        return tokens
    return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], num_zero, tokens.shape[2])], dim=1)


def identity_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_real: int,
    am: AttentionManipulation | None = None,
    part: str = "down",
    step: int = 0,
    tokens_per_photo: int | None = None,
) -> Tensor:
    """``P V`` over real + padding tokens, AM on the first ``num_real`` columns where targeted.

    query (B, h, L, d), key/value (B, h, S + Z, d) -> (B, h, L, d) in the query's dtype.
    ``tokens_per_photo``: the real tokens are photos of that many tokens (softmask's inversion).
    """
    if am is None or not am.targets(part, step):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    work = torch.promote_types(query.dtype, torch.float32)
    q, k, v = query.to(work), key.to(work), value.to(work)
    probs = attention_probs(q, k)
    real = manipulate_probs(probs[..., :num_real], am, part, step, tokens_per_photo)
    changed = torch.cat([real, probs[..., num_real:]], dim=-1) if num_real < probs.shape[-1] else real
    out = changed @ v
    if am.mode == "softmask":
        params = am.parts[part]
        out = adain_output(out, probs @ v, params.adain_weight, params.eps)
    return out.to(query.dtype)


def ortho_v2_mass(query: Tensor, key: Tensor, ortho_tokens: int = 5) -> Tensor:
    """``a`` of ``"v2"``: softmax(Q Kᵀ) (no 1/√d, as the original) averaged over heads, summed over
    the first ``ortho_tokens`` tokens: (B, h, L, d), (B, h, S, d) -> (B, L, 1) float32."""
    mean = (query @ key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
    return mean[:, :, :ortho_tokens].sum(dim=-1, keepdim=True).float()


def add_identity(hidden: Tensor, identity: Tensor, scale: float, ortho: str = "off",
                 mass: Tensor | None = None) -> Tensor:
    """``hidden`` (B, L, C) plus the identity output (B, L, C) joined as ``ortho`` says (see module doc)."""
    if ortho == "off":
        return hidden + scale * identity
    if ortho not in ORTHO_MODES:
        raise ValueError(f"ortho must be one of {ORTHO_MODES}, got {ortho!r}")
    dtype = hidden.dtype
    h, o = hidden.float(), identity.float()
    # A zero H (FastFace's null text is all-zero embeddings, METHOD §2, so a null-text branch's text
    # attention is exactly zero) has a zero projection; the official division would give 0/0 = NaN.
    energy = (h * h).sum(dim=-2, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    projection = (h * o).sum(dim=-2, keepdim=True) / energy * h
    if ortho == "v1":
        joined = o - projection
    else:
        if mass is None:
            raise ValueError("ortho 'v2' needs the attention mass of the first identity tokens")
        joined = o + (mass - 1) * projection
    return (h + scale * joined).to(dtype)
