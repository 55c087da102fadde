"""IP-Adapter FaceID-Portrait SDXL: 16 tokens per photo, several photos concatenated, no LoRA.

Checkpoints ``h94/IP-Adapter-FaceID``:

- ``ip-adapter-faceid-portrait_sdxl.bin``: ``image_proj`` is FaceID's ``MLPProjModel``
  (``proj.0``, ``proj.2``, ``norm``) giving 16 tokens from the L2-normalised ArcFace embedding;
  ``ip_adapter`` has ``to_k_ip``/``to_v_ip`` and, unlike FaceID, no LoRA;
- ``ip-adapter-faceid-portrait_sdxl_unnorm.bin``: ``image_proj`` is an IP-Adapter Resampler over
  the *raw* (un-normalised) embedding, one input token per photo.

The variant is read from the checkpoint's keys (MLP or Resampler), not from the file name. The
model was trained on several photos of one person concatenated (the official
``IPAdapterFaceIDXL(n_cond=n)`` of ``ip_adapter_faceid_separate.py``), so it always
concatenates: S = 16·n, whatever the identity mode. Null identity ∅ (METHOD §7): the projection
of zero embedding(s), one per photo, as the official ``get_image_embeds`` computes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .base import (
    AdapterSpec,
    IdentityAdapter,
    IdentityConditioning,
    check_mode,
    checkpoint_path,
    identity_info,
    read_ip_adapter_checkpoint,
    tiny_variant,
)
from .faceid import FACEID_REPO
from .resampler import load_projection, mlp_shape, projection_kind, resampler_input_dim

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ..faces.types import Identity

_LICENCE = "IP-Adapter-FaceID weights: non-commercial research use only (h94/IP-Adapter-FaceID model card)"
_IMPLEMENTATION = "fastface.adapters.portrait:PortraitAdapter"
VARIANTS = {"mlp": "normed", "resampler": "unnorm"}

SPECS = (
    AdapterSpec(
        name="faceid-portrait",
        repo=FACEID_REPO,
        weight_name="ip-adapter-faceid-portrait_sdxl.bin",
        kind="faceid-portrait",
        embedding_dim=512,
        face_backend="arcface",
        num_tokens=16,
        licence=(_LICENCE,),
        implementation=_IMPLEMENTATION,
        description="IP-Adapter FaceID-Portrait SDXL: 16 tokens per photo (normed ArcFace), photos concatenated",
        presets_tuned=False,
    ),
    AdapterSpec(
        name="faceid-portrait-unnorm",
        repo=FACEID_REPO,
        weight_name="ip-adapter-faceid-portrait_sdxl_unnorm.bin",
        kind="faceid-portrait",
        embedding_dim=512,
        face_backend="arcface",
        num_tokens=16,
        licence=(_LICENCE,),
        implementation=_IMPLEMENTATION,
        description="IP-Adapter FaceID-Portrait SDXL _unnorm: Resampler on the raw ArcFace embedding, "
        "16 tokens per photo",
        presets_tuned=False,
    ),
)


class PortraitAdapter(IdentityAdapter):
    """FaceID-Portrait (either variant) loaded into one SDXL pipeline."""

    def __init__(self, spec: AdapterSpec, projection: torch.nn.Module, checkpoint: Path, variant: str,
                 embedding_dim: int, tokens: int) -> None:
        super().__init__(spec, checkpoint)
        self.projection = projection
        self.variant = variant  # "normed" (MLP) or "unnorm" (Resampler on the raw embedding)
        self._embedding_dim = embedding_dim
        self._tokens = tokens

    @classmethod
    def tiny_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        from .. import tiny, tiny_adapters

        name = tiny_adapters.PORTRAIT_UNNORM_FILE if spec.name.endswith("unnorm") else tiny_adapters.PORTRAIT_FILE
        return tiny_variant(spec, weight_name=name, embedding_dim=tiny.TINY_EMBEDDING_DIM,
                            face_backend="dlib")

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def tokens_per_photo(self) -> int:
        return self._tokens

    def modules(self) -> list[torch.nn.Module]:
        return [self.projection]

    def describe(self) -> dict:
        info = super().describe()
        info["variant"] = self.variant
        return info

    def encode(self, identity: Identity, mode: str = "mean", **options: Any) -> IdentityConditioning:
        """16 tokens per photo (always concatenated: the model was trained so) and the null tokens."""
        import torch

        check_mode(mode)
        self.spec.check_options(options)
        self.check_identity(identity)
        if self.variant == "unnorm":
            if identity.raw_embeddings is None:
                raise InputError(
                    "the FaceID-Portrait _unnorm checkpoint needs the raw (un-normalised) face embedding: pass "
                    "face photos analysed with an ArcFace backend (arcface, antelopev2), or raw vectors"
                )
            rows = identity.raw_embeddings
        else:
            rows = identity.embeddings
        param = next(self.projection.parameters())
        embeds = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(param.device, param.dtype)
        if self.variant == "unnorm":
            embeds = embeds[:, None, :]  # one Resampler input token per photo
        with torch.no_grad():
            cond = self.projection(embeds)
            null = self.projection(torch.zeros_like(embeds))
        cond = cond.reshape(1, -1, cond.shape[-1])
        null = null.reshape(1, -1, null.shape[-1])
        info = identity_info(self, identity, "concat", int(cond.shape[1]))
        info["variant"] = self.variant
        return IdentityConditioning(cond=cond, null=null, info=MappingProxyType(info))

    @classmethod
    def load(
        cls,
        sdxl: StableDiffusionXLPipeline,
        spec: AdapterSpec,
        *,
        path: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
    ) -> PortraitAdapter:
        checkpoint = checkpoint_path(spec, path)
        state = read_ip_adapter_checkpoint(checkpoint)
        kind = projection_kind(state["image_proj"], state["ip_adapter"])
        if kind not in VARIANTS:
            label = {"faceid": "a FaceID checkpoint (with LoRA)", "faceid-plus": "a FaceID-Plus checkpoint"}.get(
                kind, "not a FaceID-Portrait checkpoint")
            raise InputError(f"'{checkpoint}' is {label}, which the {spec.name} adapter cannot use")
        if kind == "mlp":
            dim, tokens = mlp_shape(state["image_proj"])
        else:
            dim, tokens = resampler_input_dim(state["image_proj"]), int(state["image_proj"]["latents"].shape[1])
        projection = load_projection(sdxl, state, checkpoint)
        return cls(spec, projection, checkpoint, VARIANTS[kind], dim, tokens)
