"""Identity adapters (IP-Adapter FaceID family): registry, loading, identity tokens.

Loading goes through diffusers' own ``load_ip_adapter`` for the decoupled cross-attention and the
image projection; FastFace then

- converts the checkpoint's own LoRA (the ``*_lora`` keys of the original FaceID processors) to a
  PEFT adapter named ``fastface_id`` that stays active *beside* the backbone's LoRAs. diffusers
  would load it too, but then activates only that adapter, silently switching the distillation
  LoRA off; so the LoRA keys are kept away from ``load_ip_adapter`` and loaded here instead;
- detaches the image projection from the UNet: identity tokens are computed once per call
  (:meth:`LoadedAdapter.encode`) and reach the attention processors precomputed, instead of the
  UNet re-projecting the embedding at every step and branch;
- replaces the IP-Adapter attention processors by :class:`~fastface.processors.FastFaceIPAttnProcessor`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, InputError
from .faces.types import Identity
from .hub import read_weights, resolve_file, resolve_folder

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline

ID_LORA_ADAPTER = "fastface_id"
IDENTITY_MODES = ("mean", "concat")
FACEID_REPO = "h94/IP-Adapter-FaceID"
CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_FACEID_LICENCE = (
    "IP-Adapter-FaceID weights: non-commercial research use only (h94/IP-Adapter-FaceID model card)"
)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class AdapterSpec:
    """One identity adapter checkpoint and what it expects."""

    name: str
    repo: str
    weight_name: str
    kind: str  # "faceid" (MLP projection) or "faceid-plus" (MLP + perceiver resampler over CLIP)
    embedding_dim: int
    face_backend: str  # default face backend producing embeddings of that size
    licence: tuple[str, ...]
    image_encoder: str | None = None
    shortcut_scale: float = 1.0  # FaceID-Plus v2: tokens = id_tokens + s * resampler(...)
    num_tokens: int = 4
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "repo": self.repo,
            "weight_name": self.weight_name,
            "kind": self.kind,
            "embedding_dim": self.embedding_dim,
            "image_encoder": self.image_encoder,
            "shortcut_scale": self.shortcut_scale if self.kind == "faceid-plus" else None,
            "num_tokens": self.num_tokens,
            "licence": list(self.licence),
        }


ADAPTERS: Mapping[str, AdapterSpec] = MappingProxyType(
    {
        "faceid": AdapterSpec(
            name="faceid",
            repo=FACEID_REPO,
            weight_name="ip-adapter-faceid_sdxl.bin",
            kind="faceid",
            embedding_dim=512,
            face_backend="arcface",
            licence=(_FACEID_LICENCE,),
            description="IP-Adapter FaceID SDXL: 4 tokens from a 512-d ArcFace embedding",
        ),
        "faceid-plusv2": AdapterSpec(
            name="faceid-plusv2",
            repo=FACEID_REPO,
            weight_name="ip-adapter-faceid-plusv2_sdxl.bin",
            kind="faceid-plus",
            embedding_dim=512,
            face_backend="arcface",
            image_encoder=CLIP_H,
            shortcut_scale=1.0,
            licence=(_FACEID_LICENCE, "CLIP ViT-H-14 (LAION): MIT"),
            description="IP-Adapter FaceID-Plus v2 SDXL: ArcFace + CLIP ViT-H face crop, shortcut 1.0",
        ),
    }
)


def get_adapter(name: str) -> AdapterSpec:
    """The registered adapter ``name`` (ConfigError listing the names otherwise)."""
    try:
        return ADAPTERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown adapter {name!r}; choose one of: {', '.join(ADAPTERS)}") from None


def spec_for_backbone(name: str, backbone: str) -> AdapterSpec:
    """The adapter spec, resolved to the tiny test checkpoints for the ``tiny`` backbone."""
    spec = get_adapter(name)
    if backbone != "tiny":
        return spec
    from . import testing

    return AdapterSpec(
        name=spec.name,
        repo="tiny",
        weight_name=testing.FACEID_FILE if spec.kind == "faceid" else testing.FACEID_PLUS_FILE,
        kind=spec.kind,
        embedding_dim=testing.TINY_EMBEDDING_DIM,
        face_backend="dlib",
        licence=("tiny random test weights (no restriction)",),
        image_encoder="tiny" if spec.image_encoder else None,
        shortcut_scale=spec.shortcut_scale,
        num_tokens=spec.num_tokens,
        description=f"tiny random {spec.name} for tests",
    )


@dataclass(frozen=True)
class IdentityTokens:
    """Identity tokens of one call: ``cond`` for I and ``null`` for ∅, each (1, S, C).

    ``info`` describes where they came from (adapter, backend, embedding size, photos, mode).
    Reusable across calls of the pipeline that computed them.
    """

    cond: torch.Tensor
    null: torch.Tensor
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.cond.shape[1])


def _read_checkpoint(path: Path) -> dict[str, dict[str, Any]]:
    state = read_weights(path, what="adapter checkpoint")
    if path.suffix == ".safetensors":
        flat, state = state, {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            group, _, rest = key.partition(".")
            if group in state:
                state[group][rest] = value
    if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
        raise InputError(f"'{path}' is not an IP-Adapter checkpoint (no 'image_proj'/'ip_adapter' keys)")
    return state


def _checkpoint_kind(image_proj: Mapping[str, Any]) -> str:
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "faceid-plus"
    if "norm.weight" in image_proj and "proj.0.weight" in image_proj:
        return "faceid"
    return "other"


def _peft_lora(ip_layers: Mapping[str, Any], processor_names: list[str]) -> dict[str, Any]:
    """The FaceID LoRA keys ``{i}.to_q_lora.down.weight`` … as PEFT ``{module}.to_q.lora_A.weight``.

    ``i`` is the position in ``unet.attn_processors``; the original ``LoRALinearLayer`` has no
    alpha, so PEFT's default ``lora_alpha = r`` gives the same scale 1.
    """
    targets = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
    state = {}
    for index, name in enumerate(processor_names):
        module = name.removesuffix(".processor")
        for source, target in targets.items():
            down = ip_layers.get(f"{index}.{source}_lora.down.weight")
            up = ip_layers.get(f"{index}.{source}_lora.up.weight")
            if down is None or up is None:
                continue
            state[f"{module}.{target}.lora_A.weight"] = down
            state[f"{module}.{target}.lora_B.weight"] = up
    return state


def _image_processor_settings(folder: Path) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(crop size, mean, std) from a CLIP ``preprocessor_config.json`` (CLIP defaults otherwise)."""
    config_path = folder / "preprocessor_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    crop = config.get("crop_size", 224)
    size = int(crop["height"] if isinstance(crop, dict) else crop)
    return size, tuple(config.get("image_mean", _CLIP_MEAN)), tuple(config.get("image_std", _CLIP_STD))


class LoadedAdapter:
    """An adapter loaded into one SDXL pipeline: its image projection and (Plus) image encoder."""

    def __init__(
        self,
        spec: AdapterSpec,
        projection: torch.nn.Module,
        checkpoint: Path,
        image_encoder: torch.nn.Module | None = None,
        image_encoder_path: Path | None = None,
    ) -> None:
        self.spec = spec
        self.projection = projection
        self.checkpoint = checkpoint
        self.image_encoder = image_encoder
        self.image_encoder_path = image_encoder_path
        if image_encoder_path is not None:
            self._crop_size, self._mean, self._std = _image_processor_settings(image_encoder_path)

    @property
    def embedding_dim(self) -> int:
        first = self.projection.proj if self.spec.kind == "faceid-plus" else self.projection.ff
        return int(first.net[0].proj.in_features)

    def describe(self) -> dict[str, Any]:
        info = self.spec.to_dict()
        info["checkpoint"] = str(self.checkpoint)
        info["embedding_dim"] = self.embedding_dim
        if self.image_encoder_path is not None:
            info["image_encoder"] = str(self.image_encoder_path)
        return info

    # -- identity tokens -----------------------------------------------------------------------

    def encode(self, identity: Identity, mode: str = "mean") -> IdentityTokens:
        """Identity tokens for ``identity`` and for the null identity (zero embedding).

        ``mode="mean"``: one token set (4 tokens) from the normalised mean embedding (and, for
        FaceID-Plus, the mean CLIP features of the crops). ``mode="concat"``: one token set per
        photo, concatenated (S = 4·n).
        """
        import torch

        if mode not in IDENTITY_MODES:
            raise ConfigError(f"identity_mode must be one of {', '.join(IDENTITY_MODES)}; got {mode!r}")
        expected = self.embedding_dim
        if identity.dim != expected:
            raise InputError(
                f"the {self.spec.name} adapter expects {expected}-d embeddings, got {identity.dim}-d "
                f"(use the '{self.spec.face_backend}' face backend)"
            )
        param = next(self.projection.parameters())
        device, dtype = param.device, param.dtype
        rows = identity.embeddings if mode == "concat" else identity.embedding[None]
        embeds = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(device, dtype)
        zeros = torch.zeros_like(embeds[:1])
        with torch.no_grad():
            if self.spec.kind == "faceid-plus":
                clip, clip_null = self._clip_features(identity, mode, device)
                cond = self._resample(embeds, clip)
                null = self._resample(zeros, clip_null)
            else:
                cond = self.projection(embeds)
                null = self.projection(zeros)
        count = embeds.shape[0]
        # (n, 4, C) -> (1, 4n, C): several photos become one longer token sequence.
        cond = cond.reshape(1, -1, cond.shape[-1])
        null = null.repeat(count, 1, 1).reshape(1, -1, null.shape[-1])
        info = {
            "adapter": self.spec.name,
            "backend": identity.backend,
            "model": identity.model,
            "dim": identity.dim,
            "num_photos": identity.num_photos,
            "sources": list(identity.sources),
            "outliers": list(identity.outliers),
            "mode": mode,
            "num_tokens": int(cond.shape[1]),
        }
        return IdentityTokens(cond=cond, null=null, info=MappingProxyType(info))

    def _resample(self, id_embeds: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """FaceID-Plus projection with the CLIP features as an argument.

        Same computation as diffusers' ``IPAdapterFaceIDPlusImageProjection.forward``, which reads
        the CLIP features from a module attribute; passing them in leaves no state on the module.
        """
        proj = self.projection
        tokens = proj.norm(proj.proj(id_embeds).reshape(-1, proj.num_tokens, proj.embed_dim))
        context = proj.proj_in(clip.to(tokens.dtype))
        latents = tokens
        for block in proj.layers:
            latents = block(context, latents, latents)
        out = proj.norm_out(proj.proj_out(latents))
        return tokens + self.spec.shortcut_scale * out

    def _clip_features(self, identity: Identity, mode: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate CLIP hidden states of the aligned crops, and of an all-zero pixel tensor."""
        import torch

        if not identity.crops:
            raise InputError(
                f"the {self.spec.name} adapter needs the aligned face crops: pass face photos (or an "
                "Identity from fastface.faces.build_identity), not bare embeddings"
            )
        if len(identity.crops) != identity.num_photos:
            raise InputError(
                f"identity has {identity.num_photos} embeddings but {len(identity.crops)} face crops"
            )
        encoder = self.image_encoder
        dtype = next(encoder.parameters()).dtype
        pixels = torch.from_numpy(np.stack([self._preprocess(c) for c in identity.crops])).to(device, dtype)
        hidden = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        null = encoder(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
        if mode == "mean":
            hidden = hidden.mean(dim=0, keepdim=True)
        return hidden, null

    def _preprocess(self, crop: np.ndarray) -> np.ndarray:
        """CLIPImageProcessor's steps for a square crop: bicubic resize, rescale, normalise."""
        from PIL import Image

        arr = np.asarray(crop)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise InputError(f"face crops must be RGB uint8 (H, W, 3) arrays, got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr)
        if image.size != (self._crop_size, self._crop_size):
            image = _resize_center_crop(image, self._crop_size)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self._mean, np.float32)) / np.asarray(self._std, np.float32)
        return pixels.transpose(2, 0, 1)


def _resize_center_crop(image: Any, size: int) -> Any:
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left = (resized.size[0] - size) // 2
    top = (resized.size[1] - size) // 2
    return resized.crop((left, top, left + size, top + size))


def _checkpoint_path(spec: AdapterSpec, path: str | os.PathLike | None) -> Path:
    if path is None and spec.repo == "tiny":
        from .testing import tiny_model_dir

        return tiny_model_dir() / spec.weight_name
    return resolve_file(
        path if path is not None else spec.repo,
        spec.weight_name,
        what=f"{spec.name} adapter",
        hint=f"download '{spec.weight_name}' from '{spec.repo}' on a connected machine and pass "
        "adapter_path=<file>",
    )


def _image_encoder_path(spec: AdapterSpec, path: str | os.PathLike | None) -> Path:
    if path is None and spec.image_encoder == "tiny":
        from .testing import tiny_model_dir

        return tiny_model_dir() / "image_encoder"
    repo = str(path) if path is not None else spec.image_encoder
    return resolve_folder(
        repo,
        what=f"{spec.name} image encoder",
        hint=f"download '{repo}' (config.json, preprocessor_config.json, model.safetensors) on a "
        "connected machine and pass image_encoder=<folder>",
        allow_patterns=["config.json", "preprocessor_config.json", "model.safetensors"],
    )


def load_adapter(
    pipe: StableDiffusionXLPipeline,
    name: str,
    *,
    backbone: str = "",
    path: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
) -> LoadedAdapter:
    """Load adapter ``name`` into ``pipe``'s UNet; returns the detached projection (+ encoder).

    After this: the UNet's cross-attention processors carry ``to_k_ip``/``to_v_ip`` (diffusers'
    ``IPAdapterAttnProcessor2_0``), the checkpoint's LoRA is PEFT adapter ``fastface_id`` (its
    weight is set by the caller with the other adapters), and ``unet.encoder_hid_proj`` is None.
    """
    from transformers import CLIPVisionModelWithProjection

    spec = spec_for_backbone(name, backbone)
    checkpoint = _checkpoint_path(spec, path)
    state = _read_checkpoint(checkpoint)
    kind = _checkpoint_kind(state["image_proj"])
    if kind != spec.kind:
        label = {"faceid": "a FaceID", "faceid-plus": "a FaceID-Plus"}.get(kind, "not a FaceID-family")
        raise InputError(f"'{checkpoint}' is {label} checkpoint, which the {spec.name} adapter cannot use")
    unet = pipe.unet
    lora_keys = {k for k in state["ip_adapter"] if "_lora." in k}
    without_lora = {
        "image_proj": state["image_proj"],
        "ip_adapter": {k: v for k, v in state["ip_adapter"].items() if k not in lora_keys},
    }
    encoder = None
    encoder_path = None
    if spec.kind == "faceid-plus":
        encoder_path = _image_encoder_path(spec, image_encoder)
        encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_path, dtype=unet.dtype)
        encoder.to(unet.device).eval()
        # Registered on the SDXL pipeline so that .to(device) moves it with the rest, and so that
        # load_ip_adapter does not try to fetch one itself.
        pipe.register_modules(image_encoder=encoder)
    processor_names = list(unet.attn_processors)
    try:
        # A state dict, not the file: diffusers would otherwise load the LoRA keys as adapter
        # "faceid_0" and make it the only active adapter (see the module docstring).
        pipe.load_ip_adapter(without_lora, subfolder=None, weight_name=checkpoint.name, image_encoder_folder=None)
    except (KeyError, RuntimeError) as exc:
        raise InputError(
            f"'{checkpoint}' does not fit this backbone's UNet ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    unet.encoder_hid_proj = None
    unet.register_to_config(encoder_hid_dim_type=None)
    projection.eval()
    lora = _peft_lora(state["ip_adapter"], processor_names)
    if lora_keys and len(lora) != len(lora_keys):
        raise InputError(
            f"'{checkpoint}': its LoRA has {len(lora_keys)} tensors but only {len(lora)} match this UNet's "
            f"{len(processor_names)} attention layers"
        )
    if lora:
        lora = {k: v.to(unet.dtype) for k, v in lora.items()}
        with warnings.catch_warnings():
            # PEFT warns whenever a second adapter joins a model; several adapters is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            unet.load_lora_adapter(lora, adapter_name=ID_LORA_ADAPTER, prefix=None)
    return LoadedAdapter(spec, projection, checkpoint, encoder, encoder_path)
