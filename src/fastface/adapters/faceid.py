"""IP-Adapter FaceID and FaceID-Plus v2 (SDXL): 4 tokens per photo from an ArcFace embedding.

Loading goes through diffusers' own ``load_ip_adapter`` for the decoupled cross-attention and the
image projection; FastFace then

- converts the checkpoint's own LoRA (the ``*_lora`` keys of the original FaceID processors) to a
  PEFT adapter named ``fastface_id`` that stays active *beside* the backbone's LoRAs. diffusers
  would load it too, but then activates only that adapter, silently switching the distillation
  LoRA off; so the LoRA keys are kept away from ``load_ip_adapter`` and loaded here instead;
- detaches the image projection from the UNet: identity tokens are computed once per call
  (:meth:`FaceIDAdapter.encode`) and reach the attention processors precomputed, instead of the
  UNet re-projecting the embedding at every step and branch;
- replaces the IP-Adapter attention processors by :class:`~fastface.processors.FastFaceIPAttnProcessor`.

The null identity ∅ (METHOD §7) is the projection of the zero embedding (FaceID) and, for Plus v2,
the zero embedding with the CLIP features of an all-zero pixel tensor.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .base import (
    ID_LORA_ADAPTER,
    AdapterSpec,
    IdentityAdapter,
    IdentityConditioning,
    check_mode,
    checkpoint_path,
    identity_info,
    image_encoder_path,
    read_ip_adapter_checkpoint,
    tiny_variant,
)
from .clip import CLIP_H, ClipPreprocessor, load_image_encoder, penultimate_features
from .resampler import load_projection

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ..faces.types import Identity

FACEID_REPO = "h94/IP-Adapter-FaceID"
_FACEID_LICENCE = (
    "IP-Adapter-FaceID weights: non-commercial research use only (h94/IP-Adapter-FaceID model card)"
)
_IMPLEMENTATION = "fastface.adapters.faceid:FaceIDAdapter"

SPECS = (
    AdapterSpec(
        name="faceid",
        repo=FACEID_REPO,
        weight_name="ip-adapter-faceid_sdxl.bin",
        kind="faceid",
        embedding_dim=512,
        face_backend="arcface",
        licence=(_FACEID_LICENCE,),
        implementation=_IMPLEMENTATION,
        description="IP-Adapter FaceID SDXL: 4 tokens from a 512-d ArcFace embedding",
    ),
    AdapterSpec(
        name="faceid-plusv2",
        repo=FACEID_REPO,
        weight_name="ip-adapter-faceid-plusv2_sdxl.bin",
        kind="faceid-plus",
        embedding_dim=512,
        face_backend="arcface",
        image_encoder=CLIP_H,
        shortcut_scale=1.0,
        licence=(_FACEID_LICENCE, "CLIP ViT-H-14 (LAION): MIT"),
        implementation=_IMPLEMENTATION,
        description="IP-Adapter FaceID-Plus v2 SDXL: ArcFace + CLIP ViT-H face crop, shortcut 1.0",
    ),
)


def checkpoint_kind(image_proj: Mapping[str, Any]) -> str:
    """"faceid", "faceid-plus" or "other", from the image projection's keys."""
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "faceid-plus"
    if "norm.weight" in image_proj and "proj.0.weight" in image_proj:
        return "faceid"
    return "other"


def peft_lora(ip_layers: Mapping[str, Any], processor_names: list[str]) -> dict[str, Any]:
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


class FaceIDAdapter(IdentityAdapter):
    """FaceID / FaceID-Plus v2 loaded into one SDXL pipeline: its image projection and (Plus) image encoder."""

    def __init__(
        self,
        spec: AdapterSpec,
        projection: torch.nn.Module,
        checkpoint: Path,
        image_encoder: torch.nn.Module | None = None,
        image_encoder_path: Path | None = None,
        has_lora: bool = True,
    ) -> None:
        super().__init__(spec, checkpoint)
        self.projection = projection
        self.image_encoder = image_encoder
        self.image_encoder_path = image_encoder_path
        self._has_lora = has_lora
        self._preprocess = ClipPreprocessor(image_encoder_path) if image_encoder_path is not None else None

    @classmethod
    def tiny_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        from .. import tiny

        return tiny_variant(
            spec,
            weight_name=tiny.FACEID_FILE if spec.kind == "faceid" else tiny.FACEID_PLUS_FILE,
            embedding_dim=tiny.TINY_EMBEDDING_DIM,
            face_backend="dlib",
        )

    @property
    def embedding_dim(self) -> int:
        first = self.projection.proj if self.spec.kind == "faceid-plus" else self.projection.ff
        return int(first.net[0].proj.in_features)

    @property
    def lora_name(self) -> str | None:
        return ID_LORA_ADAPTER if self._has_lora else None

    def modules(self) -> list[torch.nn.Module]:
        # The image encoder is registered on the SDXL pipeline and moves with it.
        return [self.projection]

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.image_encoder_path is not None:
            info["image_encoder"] = str(self.image_encoder_path)
        return info

    # -- identity tokens -----------------------------------------------------------------------

    def encode(self, identity: Identity, mode: str = "mean", **options: Any) -> IdentityConditioning:
        """Identity tokens for ``identity`` and for the null identity (zero embedding).

        ``mode="mean"``: one token set (4 tokens) from the normalised mean embedding (and, for
        FaceID-Plus, the mean CLIP features of the crops). ``mode="concat"``: one token set per
        photo, concatenated (S = 4·n).
        """
        import torch

        self.spec.check_options(options)
        check_mode(mode)
        self.check_identity(identity)
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
        info = identity_info(self, identity, mode, int(cond.shape[1]))
        return IdentityConditioning(cond=cond, null=null, info=MappingProxyType(info))

    def _resample(self, id_embeds: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """FaceID-Plus projection with the CLIP features as an argument.

        Same computation as diffusers' (0.42.1) ``IPAdapterFaceIDPlusImageProjection.forward``,
        which reads the CLIP features from a module attribute; passing them in leaves no state on
        the module.
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
        if not identity.crops:
            raise InputError(
                f"the {self.spec.name} adapter needs the aligned face crops: pass face photos (or an "
                "Identity from fastface.faces.build_identity), not bare embeddings"
            )
        if len(identity.crops) != identity.num_photos:
            raise InputError(
                f"identity has {identity.num_photos} embeddings but {len(identity.crops)} face crops"
            )
        assert self.image_encoder is not None and self._preprocess is not None
        hidden, null = penultimate_features(self.image_encoder, self._preprocess, list(identity.crops), device)
        if mode == "mean":
            hidden = hidden.mean(dim=0, keepdim=True)
        return hidden, null

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        sdxl: StableDiffusionXLPipeline,
        spec: AdapterSpec,
        *,
        path: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
    ) -> FaceIDAdapter:
        """Load into ``sdxl``'s UNet; returns the detached projection (+ encoder).

        After this: the UNet's cross-attention processors carry ``to_k_ip``/``to_v_ip`` (diffusers'
        ``IPAdapterAttnProcessor2_0``), the checkpoint's LoRA is PEFT adapter ``fastface_id`` (its
        weight is set by the engine with the other adapters), and ``unet.encoder_hid_proj`` is None.
        """
        checkpoint = checkpoint_path(spec, path)
        state = read_ip_adapter_checkpoint(checkpoint)
        kind = checkpoint_kind(state["image_proj"])
        if kind != spec.kind:
            label = {"faceid": "a FaceID", "faceid-plus": "a FaceID-Plus"}.get(kind, "not a FaceID-family")
            raise InputError(f"'{checkpoint}' is {label} checkpoint, which the {spec.name} adapter cannot use")
        unet = sdxl.unet
        lora_keys = {k for k in state["ip_adapter"] if "_lora." in k}
        without_lora = {
            "image_proj": state["image_proj"],
            "ip_adapter": {k: v for k, v in state["ip_adapter"].items() if k not in lora_keys},
        }
        encoder = None
        encoder_path = None
        if spec.kind == "faceid-plus":
            encoder_path = image_encoder_path(spec, image_encoder)
            encoder = load_image_encoder(encoder_path, unet.dtype, unet.device)
            # Registered on the SDXL pipeline so that .to(device) moves it with the rest, and so that
            # load_ip_adapter does not try to fetch one itself.
            sdxl.register_modules(image_encoder=encoder)
        processor_names = list(unet.attn_processors)
        # Without the LoRA keys: diffusers would otherwise load them as adapter "faceid_0" and make
        # it the only active adapter (see the module docstring).
        projection = load_projection(sdxl, without_lora, checkpoint)
        lora = peft_lora(state["ip_adapter"], processor_names)
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
        return cls(spec, projection, checkpoint, encoder, encoder_path, has_lora=bool(lora))
