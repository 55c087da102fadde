"""A tiny random-weight SDXL and tiny identity adapters: the ``tiny`` backbone (offline demos, tests).

This is product code, not a test fixture: the registered backbone ``tiny`` and every adapter's tiny
variant load from here, so ``fastface demo`` runs offline in seconds. :mod:`fastface.testing`
re-exports it for tests.

Everything is built from configs (no download) with seeded initialisation, so two builds are
identical. :func:`tiny_model_dir` writes, once per version, a folder holding:

- ``backbone/``: a diffusers ``StableDiffusionXLPipeline`` folder (UNet with down, mid and up
  cross-attention, two CLIP text encoders, a VAE with the real ×8 latent scale, byte-level
  tokenizers, an Euler scheduler);
- ``tiny-distill-lora.safetensors``: a LoRA on the UNet attention projections in diffusers' PEFT
  key format, standing in for a distillation LoRA (Hyper-SD, LCM, TCD);
- ``ip-adapter-faceid_sdxl.bin`` and ``ip-adapter-faceid-plusv2_sdxl.bin``: adapters in the key
  layout of the original IP-Adapter FaceID checkpoints (``image_proj`` + ``ip_adapter`` with the
  per-processor LoRA), sized for this UNet and 128-d (dlib) identity embeddings;
- ``image_encoder/``: a tiny ``CLIPVisionModelWithProjection`` plus its ``CLIPImageProcessor``;
- IP-Adapter Plus-Face, FaceID-Portrait (both variants) and InstantID (``instantid/ip-adapter.bin``
  + ``instantid/ControlNetModel/``) in their original layouts (:mod:`fastface.tiny_adapters`).

The weights are random: images are noise-like, but every code path (adapter loading, LoRA
conversion, attention processors, guidance) runs exactly as on the real models.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .tiny_adapters import write_tiny_adapters
from .tiny_weights import layer_norm, linear, normal, perceiver_layers

# Bump when anything written below changes: the version is part of the folder name, so a stale
# cache is never read.
TINY_VERSION = "5"

# Sizes shared by the tiny models and their adapters.
TINY_CROSS_ATTENTION_DIM = 64  # = hidden size of text encoder 1 + text encoder 2
TINY_EMBEDDING_DIM = 128  # dlib's face descriptor
TINY_NUM_TOKENS = 4
TINY_LORA_RANK = 4
TINY_RESOLUTION = 64  # pixels; latents are 8x8 with the x8 VAE
TINY_SIZE_MULTIPLE = 16  # the x8 VAE and two UNet resolutions
TINY_CLIP_IMAGE_SIZE = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FACEID_FILE = "ip-adapter-faceid_sdxl.bin"
FACEID_PLUS_FILE = "ip-adapter-faceid-plusv2_sdxl.bin"
DISTILL_LORA_FILE = "tiny-distill-lora.safetensors"


def default_cache_root() -> Path:
    """``$FASTFACE_CACHE`` or ``~/.cache/fastface``."""
    return Path(os.environ.get("FASTFACE_CACHE") or Path.home() / ".cache" / "fastface").expanduser()


def tiny_model_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder of tiny models (built on first use; later calls return it at once)."""
    base = Path(root).expanduser() if root is not None else default_cache_root()
    target = base / f"tiny-sdxl-v{TINY_VERSION}"
    if (target / "COMPLETE").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a reader never sees a half-written folder, and two
    # processes racing both end up with one complete copy.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=base))
    try:
        _build(staging)
        (staging / "COMPLETE").write_text(TINY_VERSION)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "COMPLETE").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Building blocks


@contextmanager
def _seeded(seed: int):
    """Seed torch's default generator for module initialisation without leaking the change."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_clip_tokenizer(folder: Path, merges: Sequence[tuple[str, str]] = ()) -> int:
    """An offline CLIP BPE tokenizer over single bytes (plus ``merges``); returns the vocabulary size.

    Any text tokenizes (every byte is a symbol), so tiny text encoders need no downloaded vocabulary.
    """
    symbols = [_bytes_to_unicode()[b] for b in range(256)]
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                # SDXL pads to this length; without it padding to "max_length" fails.
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    return len(vocab)


def _unet_config() -> dict[str, Any]:
    return {
        "sample_size": TINY_RESOLUTION // 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        # 6 micro-conditioning numbers x 8 + the 32-d pooled text embedding
        "projection_class_embeddings_input_dim": 80,
        "cross_attention_dim": TINY_CROSS_ATTENTION_DIM,
        "norm_num_groups": 16,
    }


def _text_config(vocab_size: int, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        # The pooled output is read at the first end-of-text token.
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
        projection_dim=32 if projection else 512,
    )


def _scheduler_config() -> dict[str, Any]:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
    }


def _build_backbone(folder: Path) -> Any:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    staging = folder / "_tok"
    vocab_size = write_clip_tokenizer(staging)
    tokenizer = CLIPTokenizer.from_pretrained(staging)
    shutil.rmtree(staging)

    with _seeded(0):
        unet = UNet2DConditionModel(**_unet_config())
    with _seeded(1):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=TINY_RESOLUTION,
            scaling_factor=0.13025,
            force_upcast=True,
        )
    with _seeded(2):
        text_encoder = CLIPTextModel(_text_config(vocab_size, projection=False))
    with _seeded(3):
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, projection=True))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_scheduler_config()),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder / "backbone", safe_serialization=True)
    return pipe



def _processor_layout(unet) -> list[tuple[str, int, int | None]]:
    """(name, hidden size, cross-attention dim or None) per attention processor, in diffusers' order.

    The original IP-Adapter numbers its layers by position in ``unet.attn_processors``, self- and
    cross-attention alike; diffusers reads the same numbering back.
    """
    blocks = list(unet.config.block_out_channels)
    layout = []
    for name in unet.attn_processors:
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name.split(".")[1])]
        else:
            hidden = blocks[int(name.split(".")[1])]
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        layout.append((name, hidden, cross))
    return layout


def _ip_adapter_layers(unet, generator) -> dict[str, Any]:
    """``ip_adapter`` part of a FaceID checkpoint: to_k_ip/to_v_ip on attn2, the LoRA on every layer."""
    rank = TINY_LORA_RANK
    state = {}
    for index, (_, hidden, cross) in enumerate(_processor_layout(unet)):
        inputs = {"to_q": hidden, "to_k": cross or hidden, "to_v": cross or hidden, "to_out": hidden}
        for proj, fan_in in inputs.items():
            state[f"{index}.{proj}_lora.down.weight"] = normal(generator, rank, fan_in, std=fan_in**-0.5)
            state[f"{index}.{proj}_lora.up.weight"] = normal(generator, hidden, rank, std=0.3 * rank**-0.5)
        if cross is not None:
            state[f"{index}.to_k_ip.weight"] = normal(generator, hidden, cross, std=cross**-0.5)
            state[f"{index}.to_v_ip.weight"] = normal(generator, hidden, cross, std=cross**-0.5)
    return state




def _faceid_projection(generator) -> dict[str, Any]:
    """Original ``MLPProjModel``: Linear(D, 2D) - GELU - Linear(2D, 4·C), LayerNorm(C)."""
    d, c = TINY_EMBEDDING_DIM, TINY_CROSS_ATTENTION_DIM
    state: dict[str, Any] = {}
    linear(state, "proj.0", generator, 2 * d, d)
    linear(state, "proj.2", generator, TINY_NUM_TOKENS * c, 2 * d)
    layer_norm(state, "norm", generator, c)
    return state


def _faceid_plus_projection(generator, clip_hidden: int) -> dict[str, Any]:
    """Original ``ProjPlusModel``: the FaceID MLP plus a ``FacePerceiverResampler`` (depth 4).

    The resampler uses 64-d heads and ``C // 64`` heads (diffusers infers heads = to_q rows // 64).
    """
    c = TINY_CROSS_ATTENTION_DIM
    inner = (c // 64) * 64
    state = _faceid_projection(generator)
    prefix = "perceiver_resampler"
    linear(state, f"{prefix}.proj_in", generator, c, clip_hidden)
    linear(state, f"{prefix}.proj_out", generator, c, c)
    layer_norm(state, f"{prefix}.norm_out", generator, c)
    perceiver_layers(state, f"{prefix}.", generator, dim=c, inner=inner, depth=4)
    return state


def _build_image_encoder(folder: Path) -> int:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=TINY_CLIP_IMAGE_SIZE,
        patch_size=4,
        projection_dim=32,
        hidden_act="gelu",
    )
    with _seeded(4):
        model = CLIPVisionModelWithProjection(config)
    model.save_pretrained(folder, safe_serialization=True)
    # Written by hand: transformers' image processors want torchvision just to be constructed.
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": TINY_CLIP_IMAGE_SIZE},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": list(CLIP_MEAN),
                "image_std": list(CLIP_STD),
                "do_convert_rgb": True,
            }
        )
    )
    return config.hidden_size


def _distill_lora(unet, generator) -> dict[str, Any]:
    """A PEFT-format LoRA on every attention projection (the layers the FaceID LoRA also touches)."""
    rank = 4
    state = {}
    for name, module in unet.named_modules():
        if not name.endswith(("attn1", "attn2")):
            continue
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            layer = module.get_submodule(proj)
            key = f"unet.{name}.{proj}"
            state[f"{key}.lora_A.weight"] = normal(generator, rank, layer.in_features, std=layer.in_features**-0.5)
            state[f"{key}.lora_B.weight"] = normal(generator, layer.out_features, rank, std=0.3 * rank**-0.5)
    return state


def _build(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    pipe = _build_backbone(folder)
    clip_hidden = _build_image_encoder(folder / "image_encoder")
    generator = torch.Generator().manual_seed(1234)
    layers = _ip_adapter_layers(pipe.unet, generator)
    torch.save({"image_proj": _faceid_projection(generator), "ip_adapter": layers}, folder / FACEID_FILE)
    plus_layers = _ip_adapter_layers(pipe.unet, generator)
    torch.save(
        {"image_proj": _faceid_plus_projection(generator, clip_hidden), "ip_adapter": plus_layers},
        folder / FACEID_PLUS_FILE,
    )
    save_file({k: v.contiguous() for k, v in _distill_lora(pipe.unet, generator).items()}, folder / DISTILL_LORA_FILE)
    write_tiny_adapters(folder, pipe.unet, clip_hidden, TINY_EMBEDDING_DIM)


def write_tiny_single_file(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The tiny SDXL written as one original-layout ``.safetensors`` checkpoint (as community merges
    ship), so that single-file loading runs for real in tests."""
    from diffusers import StableDiffusionXLPipeline

    from .single_file import save_single_file

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir(root) / "backbone")
    return save_single_file(pipe, path)
