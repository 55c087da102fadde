"""Tiny random PuLID weights in the original file formats, for tests and offline demos.

:func:`tiny_pulid_dir` writes, once per version, a folder beside the tiny SDXL of
:mod:`fastface.tiny` holding

- ``pulid_v1.bin`` (torch pickle) and ``pulid_v1.1.safetensors``: flat state dicts with the
  official keys, ``id_adapter.*`` (v1 ``IDEncoder``: 5 + 5 tokens; v1.1 ``IDFormer``: 32 queries,
  5 tokens per photo, depth 10) and ``id_adapter_attn_layers.{n}.id_to_k/id_to_v.weight`` for every
  cross-attention layer ``n`` of the tiny UNet (``n`` counts all attention processors, self-attention
  included, in ``unet.attn_processors`` order, as PuLID's ``nn.ModuleList`` does);
- ``EVA02_CLIP_L_336_psz14_s6B.pt``: an EVA02-CLIP vision tower in the key layout of the public
  checkpoint (``visual.*``, rotary tables included), 21 blocks so that all five hidden states PuLID
  reads exist, 64-wide heads as the real model, a 28² input (2x2 patches of 14);
- ``parsing_bisenet.pth``: a BiSeNet with facexlib's keys and narrow channels.

The identity condition is the face embedding (128-d, dlib's, standing in for antelopev2's 512) +
the tiny EVA-CLIP's embedding width. Weights are random but seeded: two builds are identical.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .tiny import (
    TINY_CROSS_ATTENTION_DIM,
    TINY_EMBEDDING_DIM,
    _processor_layout,
    _unet_config,
    default_cache_root,
)
from .tiny_weights import layer_norm, linear, normal, perceiver_layers

TINY_PULID_VERSION = "2"
PULID_V1_FILE = "pulid_v1.bin"
PULID_V11_FILE = "pulid_v1.1.safetensors"
EVA_CLIP_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
PARSING_FILE = "parsing_bisenet.pth"

# The face embedding of the tiny models is dlib's 128-d descriptor (as for the tiny FaceID), standing in
# for antelopev2's 512-d one.
TINY_ANTELOPE_DIM = TINY_EMBEDDING_DIM
TINY_EVA = {"width": 128, "depth": 21, "head_dim": 64, "mlp_hidden": 341, "patch": 14, "image": 28, "embed": 32}
TINY_BISENET = {"stem": 8, "widths": (8, 16, 24, 32), "head": 16, "fuse": 32, "fuse_mid": 8, "out_mid": 16,
                "aux_mid": 8, "classes": 19}
TINY_MAPPING_HIDDEN = 128  # = the tiny EVA width, as PuLID uses 1024 for both


def tiny_pulid_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of tiny PuLID files (built on first use; later calls return it at once)."""
    base = Path(root).expanduser() if root is not None else default_cache_root()
    target = base / f"tiny-pulid-v{TINY_PULID_VERSION}"
    if (target / "COMPLETE").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-pulid-build-", dir=base))
    try:
        build_tiny_pulid(staging)
        (staging / "COMPLETE").write_text(TINY_PULID_VERSION)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "COMPLETE").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target





def _mlp(state: dict, key: str, generator, dims: list[int]) -> None:
    """Linear/LayerNorm/LeakyReLU stacks as PuLID's ``nn.Sequential`` (linear layers at 0, 3, 6)."""
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        linear(state, f"{key}.{3 * i}", generator, d_out, d_in)
        if i < len(dims) - 2:
            layer_norm(state, f"{key}.{3 * i + 1}", generator, d_out)


def tiny_eva_clip_state(generator) -> dict[str, Any]:
    """A tiny EVA02-CLIP checkpoint, ``visual.*`` keys as in ``EVA02_CLIP_L_336_psz14_s6B.pt``."""
    from .models.eva_clip import rotary_tables

    cfg = TINY_EVA
    w, hidden = cfg["width"], cfg["mlp_hidden"]
    grid = cfg["image"] // cfg["patch"]
    state: dict[str, Any] = {}
    state["patch_embed.proj.weight"] = normal(generator, w, 3, cfg["patch"], cfg["patch"], std=(3 * cfg["patch"] ** 2) ** -0.5)
    state["patch_embed.proj.bias"] = normal(generator, w, std=0.02)
    state["cls_token"] = normal(generator, 1, 1, w, std=0.5)
    state["pos_embed"] = normal(generator, 1, grid * grid + 1, w, std=0.5)
    cos, sin = rotary_tables(cfg["head_dim"], grid)
    state["rope.freqs_cos"], state["rope.freqs_sin"] = cos, sin
    for b in range(cfg["depth"]):
        p = f"blocks.{b}"
        layer_norm(state, f"{p}.norm1", generator, w)
        layer_norm(state, f"{p}.norm2", generator, w)
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear(state, f"{p}.attn.{proj}", generator, w, w, bias=False)
        state[f"{p}.attn.q_bias"] = normal(generator, w, std=0.1)
        state[f"{p}.attn.v_bias"] = normal(generator, w, std=0.1)
        layer_norm(state, f"{p}.attn.inner_attn_ln", generator, w)
        linear(state, f"{p}.attn.proj", generator, w, w, gain=0.3)
        state[f"{p}.attn.rope.freqs_cos"], state[f"{p}.attn.rope.freqs_sin"] = cos, sin
        linear(state, f"{p}.mlp.w1", generator, hidden, w)
        linear(state, f"{p}.mlp.w2", generator, hidden, w)
        layer_norm(state, f"{p}.mlp.ffn_ln", generator, hidden)
        linear(state, f"{p}.mlp.w3", generator, w, hidden, gain=0.3)
    layer_norm(state, "norm", generator, w)
    linear(state, "head", generator, cfg["embed"], w)
    return {f"visual.{k}": v for k, v in state.items()}


def tiny_bisenet_state(generator) -> dict[str, Any]:
    """A narrow BiSeNet with the keys of facexlib's ``parsing_bisenet.pth``."""
    import torch

    cfg = TINY_BISENET
    state: dict[str, Any] = {}

    def conv(key: str, out: int, c_in: int, k: int) -> None:
        state[f"{key}.weight"] = normal(generator, out, c_in, k, k, std=(c_in * k * k) ** -0.5)

    def bn(key: str, c: int) -> None:
        state[f"{key}.weight"] = 1.0 + normal(generator, c, std=0.1)
        state[f"{key}.bias"] = normal(generator, c, std=0.1)
        state[f"{key}.running_mean"] = normal(generator, c, std=0.1)
        state[f"{key}.running_var"] = 0.5 + torch.rand(c, generator=generator)
        state[f"{key}.num_batches_tracked"] = torch.tensor(1000)

    def cbr(key: str, out: int, c_in: int, k: int = 3) -> None:
        conv(f"{key}.conv", out, c_in, k)
        bn(f"{key}.bn", out)

    r = "cp.resnet"
    conv(f"{r}.conv1", cfg["stem"], 3, 7)
    bn(f"{r}.bn1", cfg["stem"])
    c_in = cfg["stem"]
    for i, width in enumerate(cfg["widths"]):
        for j in range(2):
            p = f"{r}.layer{i + 1}.{j}"
            first_in = c_in if j == 0 else width
            conv(f"{p}.conv1", width, first_in, 3)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width, 3)
            bn(f"{p}.bn2", width)
            if j == 0 and (first_in != width or i > 0):
                conv(f"{p}.downsample.0", width, first_in, 1)
                bn(f"{p}.downsample.1", width)
        c_in = width
    head, widths = cfg["head"], cfg["widths"]
    for name, c in (("arm16", widths[2]), ("arm32", widths[3])):
        cbr(f"cp.{name}.conv", head, c)
        conv(f"cp.{name}.conv_atten", head, head, 1)
        bn(f"cp.{name}.bn_atten", head)
    cbr("cp.conv_head32", head, head)
    cbr("cp.conv_head16", head, head)
    cbr("cp.conv_avg", head, widths[3], 1)
    cbr("ffm.convblk", cfg["fuse"], widths[1] + head, 1)
    conv("ffm.conv1", cfg["fuse_mid"], cfg["fuse"], 1)
    conv("ffm.conv2", cfg["fuse"], cfg["fuse_mid"], 1)
    for name, c, mid in (("conv_out", cfg["fuse"], cfg["out_mid"]), ("conv_out16", head, cfg["aux_mid"]),
                         ("conv_out32", head, cfg["aux_mid"])):
        cbr(f"{name}.conv", mid, c)
        conv(f"{name}.conv_out", cfg["classes"], mid, 1)
    return state


def _tiny_layout() -> list[tuple[str, int, int | None]]:
    """The tiny UNet's attention processors (built on the meta device: only the layout is needed)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_config())
    return _processor_layout(unet)


def _attn_layers(generator, layout: list[tuple[str, int, int | None]]) -> dict[str, Any]:
    """``id_adapter_attn_layers.{n}.id_to_k/id_to_v`` on every cross-attention layer of the tiny UNet."""
    state = {}
    for index, (_, hidden, cross) in enumerate(layout):
        if cross is not None:
            for proj in ("id_to_k", "id_to_v"):
                state[f"id_adapter_attn_layers.{index}.{proj}.weight"] = normal(generator, hidden, cross, std=cross**-0.5)
    return state


def tiny_id_encoder_v1_state(generator) -> dict[str, Any]:
    """PuLID v1's ``IDEncoder`` (5 body tokens + 5 hidden-state tokens), sized for the tiny models."""
    c, cond = TINY_CROSS_ATTENTION_DIM, TINY_ANTELOPE_DIM + TINY_EVA["embed"]
    h1, h2 = min(c * 5 // 4, 1024), min(c * 5 // 2, 1024)  # PuLID's own width rule
    state: dict[str, Any] = {}
    _mlp(state, "body", generator, [cond, h1, h2, 5 * c])
    for i in range(5):
        dims = [TINY_EVA["width"], TINY_MAPPING_HIDDEN, TINY_MAPPING_HIDDEN, c]
        _mlp(state, f"mapping_{i}", generator, dims)
        _mlp(state, f"mapping_patch_{i}", generator, dims)
    return {f"id_adapter.{k}": v for k, v in state.items()}


def tiny_id_former_state(generator, dim: int = 64, depth: int = 10, heads: int = 2, queries: int = 32) -> dict[str, Any]:
    """PuLID v1.1's ``IDFormer`` (32 queries, 5 identity tokens per photo, 64-wide heads), tiny."""
    c, cond = TINY_CROSS_ATTENTION_DIM, TINY_ANTELOPE_DIM + TINY_EVA["embed"]
    inner = 64 * heads
    state: dict[str, Any] = {
        "latents": normal(generator, 1, queries, dim, std=dim**-0.5),
        "proj_out": normal(generator, dim, c, std=dim**-0.5),
    }
    perceiver_layers(state, "", generator, dim=dim, inner=inner, depth=depth, out_gain=0.5)
    for i in range(5):
        _mlp(state, f"mapping_{i}", generator, [TINY_EVA["width"], TINY_MAPPING_HIDDEN, TINY_MAPPING_HIDDEN, dim])
    _mlp(state, "id_embedding_mapping", generator, [cond, TINY_MAPPING_HIDDEN, TINY_MAPPING_HIDDEN, 5 * dim])
    return {f"id_adapter.{k}": v for k, v in state.items()}


def build_tiny_pulid(folder: Path) -> None:
    """Write the four tiny files into ``folder``."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(4321)
    torch.save(tiny_eva_clip_state(generator), folder / EVA_CLIP_FILE)
    torch.save(tiny_bisenet_state(generator), folder / PARSING_FILE)
    layout = _tiny_layout()
    v1 = {**tiny_id_encoder_v1_state(generator), **_attn_layers(generator, layout)}
    torch.save(v1, folder / PULID_V1_FILE)
    v11 = {**tiny_id_former_state(generator), **_attn_layers(generator, layout)}
    save_file({k: v.contiguous() for k, v in v11.items()}, folder / PULID_V11_FILE)
