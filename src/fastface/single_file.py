"""Single-file SDXL checkpoints: the diffusers configuration they are read with, and the way back.

A community checkpoint (``my-lightning-merge.safetensors``) holds the weights of the UNet, the VAE and
both text encoders in the original (Stability "LDM") key layout. diffusers' ``from_single_file``
converts them, given the diffusers configuration of the architecture. FastFace ships that
configuration (``fastface/configs/``), so only the two tokenizers (~3 MB, from the SDXL base
repository's cache) are needed besides the file: :func:`sdxl_config_folder` assembles them into the
folder ``from_single_file(config=...)`` reads, without any network.

:func:`to_original_layout` is the inverse of diffusers' conversion (written here from the key
layouts that ``diffusers.loaders.single_file_utils`` 0.42 reads): it turns a diffusers SDXL pipeline
into an original-layout state dict, so that tests can write a real single-file checkpoint of the tiny
model and load it through the same code path as a user's file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).parent / "configs"
TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_SHIPPED = {
    "unet/config.json": "sdxl_unet.json",
    "vae/config.json": "sdxl_vae.json",
    "text_encoder/config.json": "sdxl_text_encoder.json",
    "text_encoder_2/config.json": "sdxl_text_encoder_2.json",
    "scheduler/scheduler_config.json": "sdxl_scheduler.json",
}


def sdxl_config_folder(dest: str | os.PathLike, tokenizers: dict[str, Path]) -> Path:
    """Write the diffusers configuration folder of SDXL into ``dest`` from the shipped configs.

    ``tokenizers`` maps ``"tokenizer/vocab.json"``-style names (:data:`TOKENIZER_FILES` under
    ``tokenizer/`` and ``tokenizer_2/``) to local files, which are copied in.
    """
    root = Path(dest)
    for target, shipped in _SHIPPED.items():
        config = json.loads((CONFIGS / shipped).read_text(encoding="utf-8"))
        config = {k: v for k, v in config.items() if k != "_note"}
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_text(json.dumps(config, indent=2), encoding="utf-8")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2), encoding="utf-8")
    for name, path in tokenizers.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / name)
    return root


# --------------------------------------------------------------------------- diffusers -> original

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _resnet(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    head, _, tail = rest.partition(".")
    for new, old in table:
        if head == new:
            return f"{old}.{tail}"
    return rest


def _unet_key(key: str, layers: int) -> str:
    """Original ``model.diffusion_model.`` name of one diffusers UNet key (``layers`` per down block)."""
    parts = key.split(".")
    module, param = ".".join(parts[:-1]), parts[-1]
    for new, old in _UNET_TOP.items():
        if module == new:
            return f"{old}.{param}"
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.*
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{parts[-1]}"
        index = 1 + block * (layers + 1) + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet(rest, _UNET_RESNET)}"
        return f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        index = int(parts[2])
        rest = ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * index}.{_resnet(rest, _UNET_RESNET)}"
        return f"middle_block.{2 * index + 1}.{rest}"
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            raise KeyError(key)  # placed by the caller: its slot depends on the block having attentions
        index = block * (layers + 1) + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet(rest, _UNET_RESNET)}"
        return f"output_blocks.{index}.1.{rest}"
    raise KeyError(key)


def _unet(state: dict[str, Any], config: Any) -> dict[str, Any]:
    layers = int(config.layers_per_block)
    out: dict[str, Any] = {}
    with_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    for key, value in state.items():
        if key.startswith("up_blocks.") and ".upsamplers." in key:
            block = int(key.split(".")[1])
            slot = 2 if block in with_attention else 1
            name = f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv.{key.split('.')[-1]}"
        else:
            name = _unet_key(key, layers)
        out[f"model.diffusion_model.{name}"] = value
    return out


_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _vae(state: dict[str, Any], config: Any) -> dict[str, Any]:
    up_blocks = len(config.up_block_types)
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        side, rest = parts[0], parts[1:]
        name = key
        if side in ("encoder", "decoder"):
            if rest[0] in _VAE_TOP:
                name = f"{side}.{_VAE_TOP[rest[0]]}.{'.'.join(rest[1:])}"
            elif rest[0] in ("down_blocks", "up_blocks"):
                block = int(rest[1])
                level = block if rest[0] == "down_blocks" else up_blocks - 1 - block
                stage = "down" if rest[0] == "down_blocks" else "up"
                if rest[2] == "resnets":
                    tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                    name = f"{side}.{stage}.{level}.block.{rest[3]}.{tail}"
                else:  # downsamplers.0.conv / upsamplers.0.conv
                    name = f"{side}.{stage}.{level}.{'downsample' if stage == 'down' else 'upsample'}.conv.{rest[-1]}"
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
                    name = f"{side}.mid.block_{int(rest[2]) + 1}.{tail}"
                else:
                    tail = ".".join(rest[3:])
                    for new, old in _VAE_ATTENTION:
                        if tail.startswith(new + "."):
                            tail = old + tail[len(new):]
                    name = f"{side}.mid.attn_1.{tail}"
                    if value.ndim == 2:  # the original attention projections are 1x1 convolutions
                        value = value[:, :, None, None]
        out[f"first_stage_model.{name}"] = value
    return out


def _text_keys(state: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5.6 flattens CLIPTextModel (no ``text_model.`` prefix): put it back."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def _open_clip(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    state = _text_keys(state)
    prefix = "conditioner.embedders.1.model."
    top = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
           "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
           "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    out: dict[str, Any] = {}
    qkv: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in top:
            out[prefix + top[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # a Linear there, a matrix x @ P here
        elif key.startswith("text_model.encoder.layers."):
            layer, _, rest = key.removeprefix("text_model.encoder.layers.").partition(".")
            base = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(f"{base}attn.in_proj_{rest.split('.')[-1]}", {})[rest.split(".")[1]] = value
                continue
            rest = (rest.replace("self_attn.", "attn.").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[base + rest] = value
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def to_original_layout(pipe: Any) -> dict[str, Any]:
    """The state dict of an SDXL pipeline (UNet, VAE, both text encoders) in the original key layout."""
    state: dict[str, Any] = {}
    state.update(_unet(pipe.unet.state_dict(), pipe.unet.config))
    state.update(_vae(pipe.vae.state_dict(), pipe.vae.config))
    state.update({f"conditioner.embedders.0.transformer.{k}": v
                  for k, v in _text_keys(pipe.text_encoder.state_dict()).items() if not k.endswith("position_ids")})
    state.update(_open_clip(pipe.text_encoder_2.state_dict()))
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_single_file(pipe: Any, path: str | os.PathLike) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` checkpoint (as community merges ship)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(to_original_layout(pipe), str(path))
    return path


# --------------------------------------------------------------------------- original -> diffusers (text encoder 2)

OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


def open_clip_to_diffusers(checkpoint: dict[str, Any], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, Any]:
    """SDXL's second text encoder (OpenCLIP layout) as ``CLIPTextModelWithProjection`` keys."""
    top = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
           "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
           "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias"}
    out: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in top:
            out[top[rest]] = value
        elif rest == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif rest.startswith("transformer.resblocks."):
            layer, _, tail = rest.removeprefix("transformer.resblocks.").partition(".")
            base = f"text_model.encoder.layers.{layer}."
            if tail.startswith("attn.in_proj_"):
                kind = tail.rsplit("_", 1)[-1]  # weight / bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            tail = (tail.replace("attn.", "self_attn.").replace("ln_1", "layer_norm1").replace("ln_2", "layer_norm2")
                    .replace("mlp.c_fc", "mlp.fc1").replace("mlp.c_proj", "mlp.fc2"))
            out[base + tail] = value
    return out


def ambiguous_text_encoders(config_folder: Path) -> bool:
    """diffusers tells SDXL's two text encoders apart in a single file by their widths; with equal widths
    (the tiny test models) it would read encoder 1's weights into encoder 2."""
    widths = [json.loads((config_folder / name / "config.json").read_text(encoding="utf-8")).get("hidden_size")
              for name in ("text_encoder", "text_encoder_2")]
    return widths[0] == widths[1]


def load_text_encoder_2(path: Path, config_folder: Path, dtype: Any) -> Any:
    """Text encoder 2 of a single-file checkpoint, read by FastFace (see :func:`ambiguous_text_encoders`)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(config_folder / "text_encoder_2")
    model = CLIPTextModelWithProjection(config)
    state = open_clip_to_diffusers(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"text encoder 2: {len(missing)} missing and {len(unexpected)} unexpected keys")
    return model.to(dtype).eval()
