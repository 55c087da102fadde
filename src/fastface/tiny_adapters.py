"""Tiny random-weight checkpoints of IP-Adapter Plus-Face, FaceID-Portrait and InstantID.

Each is written in the key layout of the published file, sized for the tiny SDXL of
:mod:`fastface.tiny` (cross-attention width 64, 128-d dlib embeddings, the tiny CLIP image
encoder), so that the real loading code runs on them; :func:`write_tiny_adapters` puts them in the
tiny model folder:

- ``ip-adapter-plus-face_sdxl_vit-h.bin``: ``image_proj`` = the IP-Adapter ``Resampler``
  (``latents``, ``proj_in``, ``layers.{i}.0`` perceiver attention with ``norm1``/``norm2``/
  ``to_q``/``to_kv``/``to_out``, ``layers.{i}.1`` feed-forward ``0``/``1``/``3``, ``proj_out``,
  ``norm_out``) over the CLIP penultimate hidden states; ``ip_adapter`` = ``{i}.to_k_ip`` /
  ``{i}.to_v_ip`` for every cross-attention processor ``i`` (position in ``unet.attn_processors``);
- ``ip-adapter-faceid-portrait_sdxl.bin``: ``image_proj`` = the FaceID ``MLPProjModel``
  (``proj.0``, ``proj.2``, ``norm``) giving 16 tokens, and no LoRA in ``ip_adapter``;
- ``ip-adapter-faceid-portrait_sdxl_unnorm.bin``: ``image_proj`` = a ``Resampler`` over the raw
  embedding (one input token), 16 tokens;
- ``instantid/ip-adapter.bin``: as ``_unnorm`` (Resampler over the raw antelopev2 embedding);
  ``instantid/ControlNetModel/``: a diffusers ``ControlNetModel`` (the IdentityNet) built from
  the tiny UNet, whose zero-initialised output convolutions are given random non-zero weights so
  that a pipeline ignoring it cannot pass a comparison.

LayerNorms are perturbed away from (1, 0) so that a mapping that drops them shows. The Resampler
width is 128 (two 64-d heads, as the published ones use 64-d heads) instead of 1280; the writers
take the sizes as arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .tiny_weights import layer_norm, linear, normal, perceiver_layers

RESAMPLER_DIM = 128
RESAMPLER_DEPTH = 4
NUM_TOKENS = 16

PLUS_FACE_FILE = "ip-adapter-plus-face_sdxl_vit-h.bin"
PORTRAIT_FILE = "ip-adapter-faceid-portrait_sdxl.bin"
PORTRAIT_UNNORM_FILE = "ip-adapter-faceid-portrait_sdxl_unnorm.bin"
INSTANTID_DIR = "instantid"
INSTANTID_FILE = "ip-adapter.bin"
CONTROLNET_DIR = "ControlNetModel"


# ---------------------------------------------------------------------------------------------
# State-dict writers (original key layouts). LayerNorms are perturbed twice as much as in
# fastface.tiny, so that a Resampler norm applied to the wrong tensor moves the tokens visibly.
NORM_STD = 0.1


def ip_layers(unet: Any, generator: Any) -> dict[str, Any]:
    """``ip_adapter`` part without LoRA: ``{i}.to_k_ip`` / ``{i}.to_v_ip`` on every cross-attention processor.

    ``i`` is the processor's position in ``unet.attn_processors`` (self-attention included), as the
    original ``torch.nn.ModuleList(unet.attn_processors.values())`` numbers them.
    """
    blocks = list(unet.config.block_out_channels)
    cross = unet.config.cross_attention_dim
    state = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name.split(".")[1])]
        else:
            hidden = blocks[int(name.split(".")[1])]
        state[f"{index}.to_k_ip.weight"] = normal(generator, hidden, cross, std=cross**-0.5)
        state[f"{index}.to_v_ip.weight"] = normal(generator, hidden, cross, std=cross**-0.5)
    return state


def resampler_state(
    generator: Any,
    *,
    embedding_dim: int,
    output_dim: int,
    dim: int = RESAMPLER_DIM,
    num_queries: int = NUM_TOKENS,
    depth: int = RESAMPLER_DEPTH,
    ff_mult: int = 4,
) -> dict[str, Any]:
    """The IP-Adapter ``Resampler`` state dict (``ip_adapter/resampler.py`` key names).

    The published models use 64-d heads with heads · 64 = dim (1280 = 20 · 64), so the head count
    is dim / 64 here too.
    """
    inner = dim
    state: dict[str, Any] = {"latents": normal(generator, 1, num_queries, dim, std=dim**-0.5)}
    linear(state, "proj_in", generator, dim, embedding_dim)
    linear(state, "proj_out", generator, output_dim, dim)
    layer_norm(state, "norm_out", generator, output_dim, NORM_STD)
    perceiver_layers(state, "", generator, dim=dim, inner=inner, depth=depth, ff_mult=ff_mult, norm_std=NORM_STD)
    return state


def mlp_state(generator: Any, *, embedding_dim: int, output_dim: int, num_tokens: int = NUM_TOKENS) -> dict[str, Any]:
    """FaceID's ``MLPProjModel``: Linear(D, 2D) - GELU - Linear(2D, S·C), LayerNorm(C)."""
    state: dict[str, Any] = {}
    linear(state, "proj.0", generator, 2 * embedding_dim, embedding_dim)
    linear(state, "proj.2", generator, num_tokens * output_dim, 2 * embedding_dim)
    layer_norm(state, "norm", generator, output_dim, NORM_STD)
    return state


def plus_face_checkpoint(unet: Any, clip_hidden: int, seed: int = 11, **resampler: Any) -> dict[str, Any]:
    """``ip-adapter-plus-face_sdxl_vit-h.bin``: Resampler over CLIP hidden states + to_k_ip/to_v_ip."""
    import torch

    g = torch.Generator().manual_seed(seed)
    proj = resampler_state(g, embedding_dim=clip_hidden, output_dim=unet.config.cross_attention_dim, **resampler)
    return {"image_proj": proj, "ip_adapter": ip_layers(unet, g)}


def portrait_checkpoint(unet: Any, embedding_dim: int, unnorm: bool = False, seed: int = 12,
                        **resampler: Any) -> dict[str, Any]:
    """FaceID-Portrait: MLP (16 tokens) on the normed embedding, or (``unnorm``) a Resampler on the raw one."""
    import torch

    g = torch.Generator().manual_seed(seed + int(unnorm))
    c = unet.config.cross_attention_dim
    if unnorm:
        proj = resampler_state(g, embedding_dim=embedding_dim, output_dim=c, **resampler)
    else:
        proj = mlp_state(g, embedding_dim=embedding_dim, output_dim=c)
    return {"image_proj": proj, "ip_adapter": ip_layers(unet, g)}


def instantid_checkpoint(unet: Any, embedding_dim: int, seed: int = 14, **resampler: Any) -> dict[str, Any]:
    """InstantID ``ip-adapter.bin``: Resampler over the raw face embedding + to_k_ip/to_v_ip."""
    import torch

    g = torch.Generator().manual_seed(seed)
    proj = resampler_state(g, embedding_dim=embedding_dim, output_dim=unet.config.cross_attention_dim, **resampler)
    return {"image_proj": proj, "ip_adapter": ip_layers(unet, g)}


def identitynet(unet: Any, seed: int = 15) -> Any:
    """A ControlNet shaped like ``unet`` (weights copied as ``ControlNetModel.from_unet`` does), with
    random non-zero zero-convolutions (conditioning-embedding output, down and mid residual convs)."""
    import torch
    from diffusers import ControlNetModel

    # from_unet initialises its new layers from torch's global generator: seed a private copy of it,
    # so the build is reproducible and leaves the caller's random state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    g = torch.Generator().manual_seed(seed)
    zero_modules = [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                    controlnet.controlnet_mid_block]
    with torch.no_grad():
        for module in zero_modules:
            fan_in = module.weight[0].numel()
            module.weight.copy_(normal(g, *module.weight.shape, std=fan_in**-0.5))
            module.bias.copy_(normal(g, *module.bias.shape, std=0.05))
    return controlnet


def write_tiny_adapters(folder: Path, unet: Any, clip_hidden: int, embedding_dim: int) -> None:
    """Write the four tiny checkpoints and the tiny IdentityNet into ``folder`` (the tiny model folder)."""
    import torch

    torch.save(plus_face_checkpoint(unet, clip_hidden), folder / PLUS_FACE_FILE)
    torch.save(portrait_checkpoint(unet, embedding_dim), folder / PORTRAIT_FILE)
    torch.save(portrait_checkpoint(unet, embedding_dim, unnorm=True), folder / PORTRAIT_UNNORM_FILE)
    (folder / INSTANTID_DIR).mkdir(exist_ok=True)
    torch.save(instantid_checkpoint(unet, embedding_dim), folder / INSTANTID_DIR / INSTANTID_FILE)
    identitynet(unet).save_pretrained(folder / INSTANTID_DIR / CONTROLNET_DIR, safe_serialization=True)
