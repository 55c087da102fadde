"""Random tensors in the original key layouts, shared by the tiny checkpoint writers.

:mod:`fastface.tiny` (FaceID, FaceID-Plus), :mod:`fastface.tiny_adapters` (Plus-Face, Portrait,
InstantID) and :mod:`fastface.tiny_pulid` (PuLID) draw every tensor through these, in a fixed order
from one ``torch.Generator``, so that a tiny checkpoint is the same on every machine.
"""

from __future__ import annotations

from typing import Any


def normal(generator: Any, *shape: int, std: float) -> Any:
    import torch

    return torch.randn(*shape, generator=generator) * std


def linear(state: dict, key: str, generator: Any, out: int, fan_in: int, bias: bool = True,
           gain: float = 1.0) -> None:
    """``key.weight`` (out, fan_in) with std gain/√fan_in, and ``key.bias`` with std 0.02."""
    state[f"{key}.weight"] = normal(generator, out, fan_in, std=gain * fan_in**-0.5)
    if bias:
        state[f"{key}.bias"] = normal(generator, out, std=0.02)


def layer_norm(state: dict, key: str, generator: Any, dim: int, std: float = 0.05) -> None:
    """A LayerNorm perturbed away from (1, 0) by ``std``, so that a wrong key or a skipped norm shows."""
    state[f"{key}.weight"] = 1.0 + normal(generator, dim, std=std)
    state[f"{key}.bias"] = normal(generator, dim, std=std)


def perceiver_layers(state: dict, prefix: str, generator: Any, *, dim: int, inner: int, depth: int,
                     ff_mult: int = 4, out_gain: float = 1.0, norm_std: float = 0.05) -> None:
    """The ``layers.{i}.0`` (PerceiverAttention) / ``layers.{i}.1`` (FeedForward) blocks of IP-Adapter's
    ``Resampler``, ``FacePerceiverResampler`` and PuLID's ``IDFormer``, which share that layout.

    ``prefix`` goes before ``layers`` (e.g. ``"perceiver_resampler."``); ``out_gain`` scales the
    attention output and the feed-forward output projections; ``norm_std`` perturbs the LayerNorms.
    """
    for layer in range(depth):
        attn, ff = f"{prefix}layers.{layer}.0", f"{prefix}layers.{layer}.1"
        layer_norm(state, f"{attn}.norm1", generator, dim, norm_std)
        layer_norm(state, f"{attn}.norm2", generator, dim, norm_std)
        linear(state, f"{attn}.to_q", generator, inner, dim, bias=False)
        linear(state, f"{attn}.to_kv", generator, 2 * inner, dim, bias=False)
        linear(state, f"{attn}.to_out", generator, dim, inner, bias=False, gain=out_gain)
        layer_norm(state, f"{ff}.0", generator, dim, norm_std)
        linear(state, f"{ff}.1", generator, ff_mult * dim, dim, bias=False)
        linear(state, f"{ff}.3", generator, dim, ff_mult * dim, bias=False, gain=out_gain)
