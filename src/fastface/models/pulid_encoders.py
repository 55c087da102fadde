"""PuLID's identity encoders, loaded from the ``id_adapter.*`` keys of the official checkpoints.

Both map the identity condition ``[antelopev2 embedding ‖ normalised EVA-CLIP class embedding]``
(512 + 768 = 1280 values for the public models) and five EVA-CLIP hidden states to identity tokens
in the UNet's cross-attention width (2048 for SDXL):

- :class:`IDEncoder` (``pulid_v1.bin``): an MLP turns the condition into ``n`` tokens (5); each
  hidden state gives one more token, ``mapping_i(class token) + mean(mapping_patch_i(patches))``:
  10 tokens in all.
- :class:`IDFormer` (``pulid_v1.1.safetensors``): a perceiver over 32 learned queries plus the
  condition's tokens (5 per photo); each hidden state, mapped to the perceiver width, is the
  context (beside the condition's tokens) of ``depth / 5`` perceiver layers in turn. The 32 query
  tokens, projected by ``proj_out``, are the identity tokens.

Sizes come from the state dict. The attention head width of the IDFormer (64 in the public
model) is the one size a state dict does not carry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear -> LayerNorm -> LeakyReLU between every pair of widths, a plain Linear at the end."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers += [nn.LayerNorm(d_out), nn.LeakyReLU()]
    return nn.Sequential(*layers)


def _mlp_dims(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """Widths of a ``_mlp`` stored under ``prefix`` (linear layers at indices 0, 3, 6, ...)."""
    dims = [sd[f"{prefix}.0.weight"].shape[1]]
    index = 0
    while f"{prefix}.{index}.weight" in sd:
        dims.append(sd[f"{prefix}.{index}.weight"].shape[0])
        index += 3
    return dims


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


class IDEncoder(nn.Module):
    """PuLID v1 identity encoder: ``forward(cond (B, 1280), hidden [5 x (B, L, W)]) -> (B, n + 5, C)``."""

    def __init__(self, body_dims: Sequence[int], mapping_dims: Sequence[int], num_hidden: int = 5) -> None:
        super().__init__()
        self.context_dim = mapping_dims[-1]
        if body_dims[-1] % self.context_dim:
            raise ValueError(f"the body's output {body_dims[-1]} is not a multiple of the token width {self.context_dim}")
        self.num_token = body_dims[-1] // self.context_dim
        self.num_hidden = num_hidden
        self.body = _mlp(body_dims)
        for i in range(num_hidden):
            self.add_module(f"mapping_{i}", _mlp(mapping_dims))
            self.add_module(f"mapping_patch_{i}", _mlp(mapping_dims))

    @property
    def num_tokens(self) -> int:
        return self.num_token + self.num_hidden

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> IDEncoder:
        sd = _strip(state_dict, "id_adapter.")
        num_hidden = len({m.group(1) for k in sd if (m := re.match(r"mapping_(\d+)\.", k))})
        model = cls(_mlp_dims(sd, "body"), _mlp_dims(sd, "mapping_0"), num_hidden)
        model.load_state_dict(sd, strict=True)
        return model.eval()

    def forward(self, cond: torch.Tensor, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        tokens = self.body(cond).reshape(-1, self.num_token, self.context_dim)
        extra = [
            getattr(self, f"mapping_{i}")(h[:, :1]) + getattr(self, f"mapping_patch_{i}")(h[:, 1:]).mean(dim=1, keepdim=True)
            for i, h in enumerate(hidden)
        ]
        return torch.cat([tokens, *extra], dim=1)


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys and values from ``[context ‖ latents]``."""

    def __init__(self, dim: int, inner: int, head_dim: int) -> None:
        super().__init__()
        self.heads = inner // head_dim
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.norm1(context), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([context, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # Scaling q and k by d^-1/4 each (instead of the product by d^-1/2) as the original, and a
        # float32 softmax: the same numbers in half precision.
        scale = 1.0 / math.sqrt(math.sqrt(q.shape[-1]))
        weights = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(),
                         nn.Linear(hidden, dim, bias=False))


class IDFormer(nn.Module):
    """PuLID v1.1 identity encoder: ``forward(cond (B, 1280) or (B, P, 1280), hidden [5 x (B, L·P, W)])``.

    With ``P`` photos, the condition gives ``5·P`` context tokens and the hidden states of all photos
    are concatenated along the token axis (PuLID v1.1's multi-photo input); the output is always the
    ``num_queries`` (32) tokens.
    """

    def __init__(self, *, dim: int, num_queries: int, output_dim: int, depth: int, inner: int, ff_hidden: int,
                 id_dims: Sequence[int], mapping_dims: Sequence[int], num_hidden: int = 5, head_dim: int = 64) -> None:
        super().__init__()
        if depth % num_hidden:
            raise ValueError(f"IDFormer depth {depth} is not a multiple of the {num_hidden} hidden states")
        if id_dims[-1] % dim:
            raise ValueError(f"the identity mapping's output {id_dims[-1]} is not a multiple of the width {dim}")
        self.dim, self.num_queries, self.num_hidden = dim, num_queries, num_hidden
        self.num_id_token = id_dims[-1] // dim
        self.per_scale = depth // num_hidden
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_out = nn.Parameter(torch.zeros(dim, output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, inner, head_dim), FeedForward(dim, ff_hidden)]) for _ in range(depth)
        )
        for i in range(num_hidden):
            self.add_module(f"mapping_{i}", _mlp(mapping_dims))
        self.id_embedding_mapping = _mlp(id_dims)

    @property
    def num_tokens(self) -> int:
        return self.num_queries

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], head_dim: int = 64) -> IDFormer:
        sd = _strip(state_dict, "id_adapter.")
        _, num_queries, dim = sd["latents"].shape
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        num_hidden = len({m.group(1) for k in sd if (m := re.match(r"mapping_(\d+)\.", k))})
        model = cls(dim=dim, num_queries=num_queries, output_dim=sd["proj_out"].shape[1], depth=depth,
                    inner=sd["layers.0.0.to_q.weight"].shape[0], ff_hidden=sd["layers.0.1.1.weight"].shape[0],
                    id_dims=_mlp_dims(sd, "id_embedding_mapping"), mapping_dims=_mlp_dims(sd, "mapping_0"),
                    num_hidden=num_hidden, head_dim=head_dim)
        model.load_state_dict(sd, strict=True)
        return model.eval()

    def forward(self, cond: torch.Tensor, hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        photos = cond.shape[1] if cond.ndim == 3 else 1
        latents = self.latents.expand(cond.shape[0], -1, -1)
        id_tokens = self.id_embedding_mapping(cond).reshape(-1, self.num_id_token * photos, self.dim)
        latents = torch.cat([latents, id_tokens], dim=1)
        for i in range(self.num_hidden):
            context = torch.cat([id_tokens, getattr(self, f"mapping_{i}")(hidden[i])], dim=1)
            for attn, ff in self.layers[i * self.per_scale:(i + 1) * self.per_scale]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :self.num_queries] @ self.proj_out


def load_id_encoder(state_dict: Mapping[str, torch.Tensor]) -> IDEncoder | IDFormer:
    """The encoder a PuLID checkpoint holds: an IDFormer (v1.1) when it has learned queries, else v1's MLP."""
    sd = _strip(state_dict, "id_adapter.")
    if "latents" in sd:
        return IDFormer.from_state_dict(sd)
    if "body.0.weight" in sd:
        return IDEncoder.from_state_dict(sd)
    raise ValueError("not a PuLID checkpoint: no id_adapter.body.* (v1) or id_adapter.latents (v1.1)")
