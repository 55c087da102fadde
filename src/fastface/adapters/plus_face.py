"""IP-Adapter Plus-Face SDXL: 16 tokens from a Resampler over CLIP ViT-H features of the face crop.

Checkpoint ``h94/IP-Adapter`` ``sdxl_models/ip-adapter-plus-face_sdxl_vit-h.bin``: ``image_proj``
is the IP-Adapter Resampler (16 queries, width 1280, 20 heads) over the penultimate hidden states
of CLIP ViT-H-14 (``h94/IP-Adapter`` ``models/image_encoder``, the LAION ViT-H), ``ip_adapter``
the ``to_k_ip``/``to_v_ip`` of every cross-attention layer; no LoRA. No face embedding is needed,
so it also runs where no ArcFace model is available: the aligned face crops of the identity are
enough.

Null identity ∅ (METHOD §7): Resampler(CLIP(all-zero pixel tensor)), as the official
``IPAdapterPlusXL.get_image_embeds`` computes it (zeros of the *normalised* pixel tensor) — not
zero tokens. Several photos: ``mean`` averages their CLIP hidden states (16 tokens), ``concat``
gives 16 tokens per photo.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .base import (
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
from .resampler import load_projection, require_resampler, resampler_input_dim

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ..faces.types import Identity

IP_ADAPTER_REPO = "h94/IP-Adapter"

SPECS = (
    AdapterSpec(
        name="plus-face",
        repo=IP_ADAPTER_REPO,
        weight_name="sdxl_models/ip-adapter-plus-face_sdxl_vit-h.bin",
        kind="plus-face",
        embedding_dim=None,
        face_backend="dlib",
        # "vit-h": the ViT-H-14 encoder (h94 ships the same model as models/image_encoder)
        image_encoder=CLIP_H,
        num_tokens=16,
        licence=("IP-Adapter (h94/IP-Adapter): Apache-2.0", "CLIP ViT-H-14 (LAION): MIT"),
        implementation="fastface.adapters.plus_face:PlusFaceAdapter",
        description="IP-Adapter Plus-Face SDXL: Resampler (16 tokens) over CLIP ViT-H features of the face crop; "
        "no face embedding needed",
        presets_tuned=False,
    ),
)


class PlusFaceAdapter(IdentityAdapter):
    """Plus-Face loaded into one SDXL pipeline: the Resampler and the CLIP image encoder."""

    def __init__(self, spec: AdapterSpec, projection: torch.nn.Module, checkpoint: Path,
                 image_encoder: torch.nn.Module, image_encoder_folder: Path) -> None:
        super().__init__(spec, checkpoint)
        self.projection = projection
        self.image_encoder = image_encoder
        self.image_encoder_path = image_encoder_folder
        self._preprocess = ClipPreprocessor(image_encoder_folder)

    @classmethod
    def tiny_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        from ..tiny_adapters import PLUS_FACE_FILE

        return tiny_variant(spec, weight_name=PLUS_FACE_FILE)

    @property
    def embedding_dim(self) -> None:
        return None

    @property
    def tokens_per_photo(self) -> int:
        return int(self.projection.latents.shape[1])

    def modules(self) -> list[torch.nn.Module]:
        return [self.projection]  # the encoder is registered on the SDXL pipeline

    def describe(self) -> dict:
        info = super().describe()
        info["image_encoder"] = str(self.image_encoder_path)
        return info

    def check_identity(self, identity: Identity) -> None:
        if not identity.crops or len(identity.crops) != identity.num_photos:
            raise InputError(
                f"the {self.spec.name} adapter needs one aligned face crop per photo: pass face photos (or an "
                "Identity from fastface.faces.build_identity), not bare embeddings"
            )

    def encode(self, identity: Identity, mode: str = "mean", **options: Any) -> IdentityConditioning:
        """Resampler tokens of the crops' CLIP features, and of an all-zero pixel tensor's (∅)."""
        import torch

        check_mode(mode)
        self.spec.check_options(options)
        self.check_identity(identity)
        device = next(self.projection.parameters()).device
        with torch.no_grad():
            hidden, null_hidden = penultimate_features(self.image_encoder, self._preprocess, list(identity.crops),
                                                       device)
            if mode == "mean":
                hidden = hidden.mean(dim=0, keepdim=True)
            dtype = next(self.projection.parameters()).dtype
            cond = self.projection(hidden.to(dtype))
            null = self.projection(null_hidden.to(dtype))
        count = cond.shape[0]
        cond = cond.reshape(1, -1, cond.shape[-1])
        null = null.repeat(count, 1, 1).reshape(1, -1, null.shape[-1])
        info = identity_info(self, identity, mode, int(cond.shape[1]))
        return IdentityConditioning(cond=cond, null=null, info=MappingProxyType(info))

    @classmethod
    def load(
        cls,
        sdxl: StableDiffusionXLPipeline,
        spec: AdapterSpec,
        *,
        path: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
    ) -> PlusFaceAdapter:
        checkpoint = checkpoint_path(spec, path)
        state = read_ip_adapter_checkpoint(checkpoint)
        require_resampler(state, checkpoint, "an IP-Adapter Plus checkpoint, which the plus-face adapter needs")
        encoder_folder = image_encoder_path(spec, image_encoder)
        unet = sdxl.unet
        encoder = load_image_encoder(encoder_folder, unet.dtype, unet.device)
        hidden = int(encoder.config.hidden_size)
        if resampler_input_dim(state["image_proj"]) != hidden:
            raise InputError(
                f"'{checkpoint}' expects {resampler_input_dim(state['image_proj'])}-d image features but the image "
                f"encoder '{encoder_folder}' gives {hidden}-d ones (Plus-Face SDXL 'vit-h' needs CLIP ViT-H-14)"
            )
        # Registered on the SDXL pipeline so that .to(device) moves it with the rest, and so that
        # load_ip_adapter does not try to fetch one itself.
        sdxl.register_modules(image_encoder=encoder)
        projection = load_projection(sdxl, state, checkpoint)
        return cls(spec, projection, checkpoint, encoder, encoder_folder)
