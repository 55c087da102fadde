"""Full-size SDXL (+ FaceID adapter) with random weights, for timing where no weights can be downloaded.

The architectures are the published ones (``fastface/configs/*.json``: SDXL base 1.0 UNet, VAE,
CLIP ViT-L and OpenCLIP bigG text encoders, the CLIP ViT-H image encoder of FaceID-Plus v2, the
tiny SDXL autoencoder). Modules are built on the ``meta`` device (no initialisation cost) and then
materialised with cheap uniform random values of a variance-preserving scale, so activations stay
finite in fp16/bf16 through the 70 transformer blocks.

Random weights give the real cost of every operation, never meaningful images: anything measured
here is valid for timing and memory only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .pipeline import FastFacePipeline

RANDOM_WEIGHTS_BANNER = (
    "RANDOM WEIGHTS: full-size SDXL architecture with random weights; numbers are valid for "
    "timing and memory only, never for image quality."
)

CONFIG_FILES = {
    "unet": "sdxl_unet.json",
    "vae": "sdxl_vae.json",
    "vae_tiny": "sdxl_vae_tiny.json",
    "text_encoder": "sdxl_text_encoder.json",
    "text_encoder_2": "sdxl_text_encoder_2.json",
    "image_encoder": "clip_vit_h14_vision.json",
    "scheduler": "sdxl_scheduler.json",
}

# Parameter counts of the published checkpoints; the configs reproduce them exactly.
EXPECTED_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "vae_tiny": 2_445_063,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "image_encoder": 632_076_800,
}

# The published FaceID SDXL adapter: 512-d ArcFace embedding, 4 tokens, rank-128 LoRA.
FACEID_EMBEDDING_DIM = 512
FACEID_NUM_TOKENS = 4
FACEID_LORA_RANK = 128
# A distillation LoRA standing in for Hyper-SD/LCM/TCD (they are rank 64 and cover more layers;
# fused, their size costs nothing).
DISTILL_LORA_RANK = 64

VAE_CHOICES = ("sdxl", "fp16-fix", "tiny")


def load_config(name: str) -> dict[str, Any]:
    """The JSON configuration ``name`` (a key of :data:`CONFIG_FILES`) shipped with the package."""
    if name not in CONFIG_FILES:
        raise ConfigError(f"unknown full-size component {name!r}; choose one of: {', '.join(CONFIG_FILES)}")
    text = resources.files("fastface").joinpath("configs", CONFIG_FILES[name]).read_text()
    return json.loads(text)


def build_meta(name: str) -> torch.nn.Module:
    """Component ``name`` on the ``meta`` device: shapes only, nothing allocated or initialised."""
    import torch

    config = load_config(name)
    with torch.device("meta"):
        return _construct(name, config)


def _construct(name: str, config: dict[str, Any]) -> torch.nn.Module:
    if name not in EXPECTED_PARAMETERS:
        raise ConfigError(f"{name!r} is not a model; models: {', '.join(EXPECTED_PARAMETERS)}")
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    if name == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(fields)
    if name in ("vae", "vae_tiny"):
        from diffusers import AutoencoderKL, AutoencoderTiny

        cls = AutoencoderTiny if name == "vae_tiny" else AutoencoderKL
        return cls.from_config(fields)
    if name == "image_encoder":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection(CLIPVisionConfig(**fields))
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    return cls(CLIPTextConfig(**fields))


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def build_component(
    name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> torch.nn.Module:
    """Component ``name`` with random weights on ``device`` in ``dtype`` (eval mode, no grad)."""
    import torch
    from accelerate import init_empty_weights

    config = load_config(name)
    # Parameters on meta (free), buffers real: buffers such as CLIP's position ids must keep
    # their values, which a meta round trip would lose.
    with init_empty_weights(include_buffers=False):
        module = _construct(name, config)
    materialise_random_(module, device, dtype or torch.float32, seed)
    module.to(device)
    return module.eval().requires_grad_(False)


def _owners(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, str]]:
    for owner_name, owner in module.named_modules():
        for leaf in list(owner._parameters):
            if owner._parameters[leaf] is not None:
                yield owner, leaf, f"{owner_name}.{leaf}" if owner_name else leaf


def random_fill_(tensor: torch.Tensor, name: str, generator: torch.Generator | None) -> torch.Tensor:
    """Fill in place with a variance-preserving random value chosen by the parameter's role.

    Matrices and kernels: ``U(−a, a)`` with ``a = √(3 / fan_in)`` (unit-variance outputs for
    unit-variance inputs); norm weights 1, biases 0; other vectors ``U(−0.02, 0.02)``.
    """
    if tensor.ndim >= 2:
        fan_in = tensor[0].numel()
        bound = math.sqrt(3.0 / fan_in)
        return tensor.uniform_(-bound, bound, generator=generator)
    if name.endswith("bias"):
        return tensor.zero_()
    if name.endswith("weight"):
        return tensor.fill_(1.0)
    return tensor.uniform_(-0.02, 0.02, generator=generator)


def _generator(device: str | torch.device, seed: int) -> torch.Generator | None:
    """A seeded generator on ``device``; None on ``meta``, where values do not exist."""
    import torch

    device = torch.device(device)
    return None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)


def materialise_random_(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype, seed: int) -> None:
    """Replace every meta parameter of ``module`` by a random one on ``device`` (in place)."""
    import torch

    generator = _generator(device, seed)
    for owner, leaf, full_name in _owners(module):
        old = owner._parameters[leaf]
        value = torch.empty(old.shape, device=device, dtype=dtype if old.is_floating_point() else old.dtype)
        random_fill_(value, full_name, generator)
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


# ---------------------------------------------------------------------------------------------
# Adapter checkpoints with random weights, in the original key layout


def attention_layout(unet: torch.nn.Module) -> list[tuple[str, int, int, int]]:
    """(processor name, hidden size, key/value input size, query input size) per attention layer.

    The order is ``unet.attn_processors``' order, which is how the original IP-Adapter numbers its
    layers (self- and cross-attention alike) and how diffusers reads them back.
    """
    layout = []
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        layout.append((name, attn.to_q.out_features, attn.to_k.in_features, attn.to_q.in_features))
    return layout


def faceid_state_dict(
    unet: torch.nn.Module,
    *,
    embedding_dim: int = FACEID_EMBEDDING_DIM,
    num_tokens: int = FACEID_NUM_TOKENS,
    rank: int = FACEID_LORA_RANK,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """A FaceID checkpoint (``image_proj`` + ``ip_adapter``) with random weights, sized for ``unet``.

    ``image_proj`` is the original ``MLPProjModel``: ``Linear(D, 2D) → GELU → Linear(2D, S·C)``
    and ``LayerNorm(C)``. ``ip_adapter`` holds, per attention layer ``i``, the LoRA
    ``i.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight`` and on cross-attention layers
    ``i.to_k_ip.weight`` / ``i.to_v_ip.weight``.
    """
    import torch

    dtype = dtype or torch.float32
    generator = _generator(device, seed)

    def rand(name: str, *shape: int) -> torch.Tensor:
        return random_fill_(torch.empty(shape, dtype=dtype, device=device), name, generator)

    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.0.weight": rand("w", 2 * embedding_dim, embedding_dim),
        "proj.0.bias": rand("bias", 2 * embedding_dim),
        "proj.2.weight": rand("w", num_tokens * cross, 2 * embedding_dim),
        "proj.2.bias": rand("bias", num_tokens * cross),
        "norm.weight": rand("weight", cross),
        "norm.bias": rand("bias", cross),
    }
    layers: dict[str, torch.Tensor] = {}
    for index, (name, hidden, kv_in, q_in) in enumerate(attention_layout(unet)):
        for proj, fan_in in (("to_q", q_in), ("to_k", kv_in), ("to_v", kv_in), ("to_out", hidden)):
            layers[f"{index}.{proj}_lora.down.weight"] = rand("w", rank, fan_in)
            # Small up-projections: the LoRA nudges the layer instead of doubling it.
            layers[f"{index}.{proj}_lora.up.weight"] = rand("w", hidden, rank).mul_(0.1)
        if not name.endswith("attn1.processor"):
            layers[f"{index}.to_k_ip.weight"] = rand("w", hidden, kv_in)
            layers[f"{index}.to_v_ip.weight"] = rand("w", hidden, kv_in)
    return {"image_proj": image_proj, "ip_adapter": layers}


def distill_lora_state_dict(
    unet: torch.nn.Module,
    *,
    rank: int = DISTILL_LORA_RANK,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 1,
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format LoRA (``unet.<module>.lora_{A,B}.weight``) on every attention projection."""
    import torch

    dtype = dtype or torch.float32
    generator = _generator(device, seed)
    state: dict[str, torch.Tensor] = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            linear = attn.get_submodule(proj)
            down = torch.empty(rank, linear.in_features, dtype=dtype, device=device)
            up = torch.empty(linear.out_features, rank, dtype=dtype, device=device)
            state[f"unet.{name.removesuffix('.processor')}.{proj}.lora_A.weight"] = random_fill_(down, "w", generator)
            state[f"unet.{name.removesuffix('.processor')}.{proj}.lora_B.weight"] = random_fill_(up, "w", generator).mul_(0.1)
    return state


def parameter_bytes(state: dict[str, Any]) -> int:
    """Bytes held by the tensors of a (nested) state dict."""
    total = 0
    for value in state.values():
        total += parameter_bytes(value) if isinstance(value, dict) else value.numel() * value.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# A FastFacePipeline from the random full-size components


def fullsize_spec(like: str = "hyper-4") -> Any:
    """The backbone spec of ``fullsize``: the scheduler, steps and LoRA layout of backbone ``like``."""
    import dataclasses

    from .backbones import get_backbone

    base = get_backbone(like)
    if base.name == "tiny":
        raise ConfigError("fullsize cannot mimic the tiny backbone; choose a METHOD §6 backbone")
    return dataclasses.replace(
        base,
        name="fullsize",
        base="random full-size SDXL",
        lora=("random", f"rank-{DISTILL_LORA_RANK} LoRA") if base.lora is not None else None,
        unet=None,
        licence=("random weights: timing only",),
        description=f"SDXL architecture with random weights, sampled like {base.name}",
    )


def build_fullsize_pipeline(
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    adapter: str | None = "faceid",
    like: str = "hyper-4",
    vae: str = "sdxl",
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    log: Any = None,
) -> FastFacePipeline:
    """A :class:`~fastface.pipeline.FastFacePipeline` on the full-size SDXL architecture, random weights.

    ``like`` picks the backbone whose scheduler, default steps and distillation LoRA are mimicked
    (a random rank-64 LoRA stands in for the latter); ``vae`` is ``sdxl`` (upcast to fp32 when
    decoding in fp16, like the original), ``fp16-fix`` (same architecture, no upcast, like
    madebyollin/sdxl-vae-fp16-fix) or ``tiny`` (AutoencoderTiny, for previews). The FaceID
    checkpoint (512-d, rank-128 LoRA) is written in the original format to ``workdir`` (a
    temporary folder by default, removed after loading) and loaded through the normal adapter
    path. Images are noise: valid for timing and memory only.
    """
    import tempfile

    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from .adapters import load_adapter
    from .backbones import (
        DISTILL_ADAPTER,
        backbone_lora_weights,
        default_device,
        default_dtype,
        make_scheduler,
    )
    from .pipeline import FastFacePipeline
    from .tiny import tiny_model_dir

    if vae not in VAE_CHOICES:
        raise ConfigError(f"vae must be one of {', '.join(VAE_CHOICES)}; got {vae!r}")
    say = log or (lambda _line: None)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    spec = fullsize_spec(like)

    say("building full-size SDXL with random weights (UNet 2.6 B, text encoders 0.8 B, VAE)")
    unet = build_component("unet", device, dtype, seed)
    text_encoder = build_component("text_encoder", device, dtype, seed + 1)
    text_encoder_2 = build_component("text_encoder_2", device, dtype, seed + 2)
    if vae == "tiny":
        autoencoder = build_component("vae_tiny", device, dtype, seed + 3)
    else:
        autoencoder = build_component("vae", device, dtype, seed + 3)
        # The fp16-safe VAE differs only in its weights; its config drops the fp32 upcast.
        autoencoder.register_to_config(force_upcast=vae == "sdxl")
    # Tokenisation costs microseconds: the byte-level tokenizer of the tiny models stands in for
    # the CLIP BPE vocabulary (which cannot be downloaded); its ids fit the 49408-token tables.
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir() / "backbone" / "tokenizer")
    scheduler_config = {k: v for k, v in load_config("scheduler").items() if not k.startswith("_")}
    sdxl = StableDiffusionXLPipeline(
        vae=autoencoder if vae != "tiny" else None,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=make_scheduler(spec, scheduler_config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    if vae == "tiny":
        # Registered after construction: the SDXL pipeline derives its x8 scale from the KL
        # VAE's config, which the tiny autoencoder (also x8) does not have.
        sdxl.register_modules(vae=autoencoder)
    sdxl.set_progress_bar_config(disable=True)
    if spec.lora is not None:
        lora = distill_lora_state_dict(unet, dtype=dtype, device=device, seed=seed + 4)
        sdxl.load_lora_weights(lora, adapter_name=DISTILL_ADAPTER)
        weights = backbone_lora_weights(spec)
        sdxl.set_adapters(list(weights), adapter_weights=list(weights.values()))
    loaded = None
    if adapter is not None:
        if adapter != "faceid":
            raise ConfigError("the fullsize backbone ships a random FaceID checkpoint only (adapter 'faceid')")
        say("writing a random full-size FaceID checkpoint (512-d, rank-128 LoRA)")
        with tempfile.TemporaryDirectory(dir=workdir) as folder:
            path = Path(folder) / "ip-adapter-faceid_sdxl.safetensors"
            save_flat_checkpoint(faceid_state_dict(unet, dtype=dtype, device=device, seed=seed + 5), path)
            loaded = load_adapter(sdxl, adapter, backbone=spec.name, path=path)
        loaded.projection.to(device=device, dtype=dtype)
    sdxl.to(device)
    return FastFacePipeline(sdxl, spec, loaded)


def save_flat_checkpoint(state: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike) -> Path:
    """Write an ``image_proj``/``ip_adapter`` checkpoint as one safetensors file (``group.key`` names)."""
    from safetensors.torch import save_file

    flat = {f"{group}.{key}": value.contiguous() for group, part in state.items() for key, value in part.items()}
    save_file(flat, str(path))
    return Path(path)
