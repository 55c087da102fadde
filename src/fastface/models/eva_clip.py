"""EVA02-CLIP vision tower (the image side of ``EVA02-CLIP-L-14-336``), in plain torch.

PuLID reads two things from it: the class embedding after the final LayerNorm and the output
projection (``head``), and the hidden states that enter blocks 4, 8, 12, 16 and 20 (that is, the
outputs of blocks 3, 7, 11, 15, 19, counting from 0).

The module keeps the key layout of the public checkpoint (``QuanSun/EVA-CLIP``
``EVA02_CLIP_L_336_psz14_s6B.pt``, keys under ``visual.``), so its state dict loads as is. All sizes
are read from the state dict except the head width (64 in every EVA02 model), which a state dict
cannot tell apart from the number of heads.

An EVA02 block differs from a plain ViT block in four ways, all reproduced here:

- 2-D rotary position embedding on the patch queries and keys (not on the class token), with the
  frequencies of a 16x16 pre-training grid interpolated to the actual grid (``intp_freq``);
- a query and a value bias, but no key bias;
- "sub-LN": a LayerNorm on the attention output before the projection, and one inside the MLP;
- a SwiGLU MLP: ``w3(ln(silu(w1 x) * w2 x))``.

The rotary tables are recomputed from the sizes (the official loader drops the stored ones too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EVA_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PULID_HIDDEN_LAYERS = (4, 8, 12, 16, 20)
_EPS = 1e-6


def rotary_tables(head_dim: int, grid: int, pretrain_grid: int = 16, theta: float = 10000.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (grid*grid, head_dim) of EVA02's 2-D rotary embedding.

    Half of each head rotates with the row position, half with the column position; positions are
    rescaled so that the grid spans the pre-training grid's range, and each frequency drives an
    adjacent pair of channels.
    """
    if head_dim % 4:
        raise ValueError(f"the rotary embedding needs a head width divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)
    pos = torch.arange(grid, dtype=torch.float32) / grid * pretrain_grid
    angles = torch.repeat_interleave(torch.outer(pos, freqs), 2, dim=-1)  # (grid, axis_dim)
    rows = angles[:, None, :].expand(grid, grid, axis_dim)
    cols = angles[None, :, :].expand(grid, grid, axis_dim)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class EvaAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.inner_attn_ln = nn.LayerNorm(width, eps=_EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = self.k_proj(x)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        # rotary position on the patches only; the class token (index 0) keeps its features
        q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + _rotate_pairs(q[:, :, 1:]) * sin], dim=2)
        k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + _rotate_pairs(k[:, :, 1:]) * sin], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.inner_attn_ln(out))


class EvaSwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden)
        self.w2 = nn.Linear(width, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=_EPS)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=_EPS)
        self.attn = EvaAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=_EPS)
        self.mlp = EvaSwiGLU(width, mlp_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class EvaPatchEmbed(nn.Module):
    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)


class EVAVisionTower(nn.Module):
    """The EVA02-CLIP image tower; ``forward(pixels) -> (class embedding, hidden states)``.

    ``pixels`` are (B, 3, S, S) normalised with :data:`EVA_CLIP_MEAN` / :data:`EVA_CLIP_STD`, S the
    training size (:attr:`image_size`, 336 for the L-14-336 model).
    """

    def __init__(
        self,
        *,
        width: int = 1024,
        depth: int = 24,
        head_dim: int = 64,
        mlp_hidden: int = 2730,
        patch_size: int = 14,
        image_size: int = 336,
        embed_dim: int = 768,
        pretrain_grid: int = 16,
        hidden_layers: Sequence[int] = PULID_HIDDEN_LAYERS,
    ) -> None:
        super().__init__()
        if width % head_dim:
            raise ValueError(f"width {width} is not a multiple of the head width {head_dim}")
        self.width, self.depth, self.head_dim = width, depth, head_dim
        self.patch_size, self.image_size, self.embed_dim = patch_size, image_size, embed_dim
        self.hidden_layers = tuple(i for i in hidden_layers if 0 < i < depth)
        grid = image_size // patch_size
        self.patch_embed = EvaPatchEmbed(width, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.blocks = nn.ModuleList(EvaBlock(width, width // head_dim, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=_EPS)
        self.head = nn.Linear(width, embed_dim)
        cos, sin = rotary_tables(head_dim, grid, pretrain_grid)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def visual_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The image-tower entries of an EVA-CLIP checkpoint, without the ``visual.`` prefix.

        Accepts a whole CLIP checkpoint (``visual.*`` beside ``text.*``), one wrapped in
        ``state_dict``/``model``/``module``, or a bare tower. Stored rotary tables are dropped.
        """
        for key in ("state_dict", "model", "module"):
            inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
            if isinstance(inner, Mapping):
                state_dict = inner
                break
        if any(k.startswith("module.") for k in state_dict):
            state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        if any(k.startswith("visual.") for k in state_dict):
            state_dict = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
        return {k: v for k, v in state_dict.items() if "freqs_cos" not in k and "freqs_sin" not in k}

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], *, head_dim: int = 64,
                        pretrain_grid: int = 16, hidden_layers: Sequence[int] = PULID_HIDDEN_LAYERS
                        ) -> EVAVisionTower:
        """Build the tower with the sizes the state dict implies and load it (strictly)."""
        sd = cls.visual_state_dict(state_dict)
        try:
            width = sd["cls_token"].shape[-1]
            patch_size = sd["patch_embed.proj.weight"].shape[-1]
            num_patches = sd["pos_embed"].shape[1] - 1
            mlp_hidden = sd["blocks.0.mlp.w1.weight"].shape[0]
            embed_dim = sd["head.weight"].shape[0]
        except KeyError as exc:
            raise ValueError(f"not an EVA02-CLIP vision state dict: no {exc.args[0]!r}") from exc
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
        grid = round(num_patches**0.5)
        if grid * grid != num_patches:
            raise ValueError(f"the position embedding has {num_patches} patches, not a square grid")
        model = cls(width=width, depth=depth, head_dim=head_dim, mlp_hidden=mlp_hidden,
                    patch_size=patch_size, image_size=grid * patch_size, embed_dim=embed_dim,
                    pretrain_grid=pretrain_grid, hidden_layers=hidden_layers)
        model.load_state_dict(sd, strict=True)
        return model.eval()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, S, S) -> (class embedding (B, embed_dim), [hidden (B, 1 + grid², width)] per layer read)."""
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        hidden: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            if index in self.hidden_layers:
                hidden.append(x)
            x = block(x, self.rope_cos, self.rope_sin)
        return self.head(self.norm(x)[:, 0]), hidden
