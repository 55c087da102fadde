"""InstantID: a Resampler over the raw antelopev2 embedding, and the IdentityNet ControlNet.

Checkpoints ``InstantX/InstantID``: ``ip-adapter.bin`` (``image_proj`` = IP-Adapter Resampler,
16 queries over ONE input token, the raw 512-d antelopev2 embedding — InsightFace's
``face.embedding``, not ``normed_embedding``; ``ip_adapter`` = ``to_k_ip``/``to_v_ip``) and
``ControlNetModel/`` (the IdentityNet, a diffusers ``ControlNetModel``).

What the official ``StableDiffusionXLInstantIDPipeline`` does, and this adapter reproduces:

- the identity tokens enter the UNet's decoupled cross-attention (adapter scale λ, 0.8 in the
  published example) **and** are the IdentityNet's cross-attention context: the ControlNet never
  sees the text tokens (its ``text_embeds``/``time_ids`` micro-conditioning is the branch's own);
- the IdentityNet's image is the five keypoints drawn InstantID's way
  (:mod:`fastface.keypoint_image`) on a canvas of the photo's size, resized to the output size
  like diffusers' ControlNet pipelines; its residuals are scaled by the ControlNet scale (0.8);
- null identity ∅ = Resampler(zero embedding), both in the UNet and as the ControlNet context,
  while the keypoint image stays (METHOD §7): so in every guidance branch the ControlNet runs with
  that branch's own identity tokens and text micro-conditioning and the same keypoints.

Pose control: the keypoints may come from another photo than the identity (``pose``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from ..hub import resolve_file
from .base import (
    AdapterSpec,
    IdentityAdapter,
    IdentityConditioning,
    RequiredFile,
    UNetCall,
    check_mode,
    checkpoint_path,
    identity_info,
    read_ip_adapter_checkpoint,
    tiny_variant,
)
from .resampler import load_projection, require_resampler, resampler_input_dim

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ..faces.types import Identity

INSTANTID_REPO = "InstantX/InstantID"
CONTROLNET_SUBFOLDER = "ControlNetModel"
CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def check_controlnet_scale(scale: Any) -> float:
    """The IdentityNet's residual scale: a finite number >= 0 (None: the preset's default)."""
    from ..config import check_number
    from ..presets import DEFAULT_CONTROLNET_SCALE

    return check_number(DEFAULT_CONTROLNET_SCALE if scale is None else scale, "controlnet_scale", minimum=0.0)


def check_instantid_options(options: Mapping[str, Any]) -> None:
    check_controlnet_scale(options.get("controlnet_scale"))


SPECS = (
    AdapterSpec(
        name="instantid",
        repo=INSTANTID_REPO,
        weight_name="ip-adapter.bin",
        kind="instantid",
        embedding_dim=512,
        face_backend="antelopev2",
        num_tokens=16,
        licence=(
            "InstantID code and weights (InstantX/InstantID): Apache-2.0",
            "antelopev2 face models (InsightFace), which InstantID needs: non-commercial research use only",
        ),
        implementation="fastface.adapters.instantid:InstantIDAdapter",
        description="InstantID: Resampler (16 tokens) over the raw antelopev2 embedding + IdentityNet ControlNet "
        "on the 5 face keypoints",
        presets_tuned=False,
        extra_files=(
            RequiredFile(INSTANTID_REPO, CONTROLNET_SUBFOLDER, "controlnet",
                         tuple(f"{CONTROLNET_SUBFOLDER}/{f}" for f in CONTROLNET_FILES),
                         local_name=f"{CONTROLNET_SUBFOLDER}/config.json"),
        ),
        # per-call options: the IdentityNet's residual scale (None: presets.DEFAULT_CONTROLNET_SCALE),
        # and keypoints from another photo
        options=MappingProxyType({"controlnet_scale": None, "pose": None}),
        option_values=check_instantid_options,
    ),
)


def controlnet_folder(spec: AdapterSpec, checkpoint: Path) -> Path:
    """The IdentityNet folder: ``ControlNetModel/`` beside the checkpoint, else the hub's."""
    beside = checkpoint.parent / CONTROLNET_SUBFOLDER
    if (beside / "config.json").is_file():
        return beside
    hint = (f"download '{CONTROLNET_SUBFOLDER}/' ({', '.join(CONTROLNET_FILES)}) from '{spec.repo}' on a "
            f"connected machine and put it beside '{checkpoint.name}' (adapter_path=<that folder>)")
    paths = [resolve_file(spec.repo, name, subfolder=CONTROLNET_SUBFOLDER, what="InstantID IdentityNet", hint=hint)
             for name in CONTROLNET_FILES]
    return paths[0].parent


class InstantIDAdapter(IdentityAdapter):
    """InstantID loaded into one SDXL pipeline: the Resampler and the IdentityNet ControlNet."""

    uses_branch_extras = True  # the IdentityNet runs in every step's batched call


    def __init__(self, spec: AdapterSpec, projection: torch.nn.Module, checkpoint: Path, controlnet: torch.nn.Module,
                 controlnet_path: Path, embedding_dim: int, tokens: int) -> None:
        super().__init__(spec, checkpoint)
        self.projection = projection
        self.controlnet = controlnet
        self.controlnet_path = controlnet_path
        self._embedding_dim = embedding_dim
        self._tokens = tokens

    @classmethod
    def tiny_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        from .. import tiny, tiny_adapters

        return tiny_variant(spec, weight_name=f"{tiny_adapters.INSTANTID_DIR}/{tiny_adapters.INSTANTID_FILE}",
                            embedding_dim=tiny.TINY_EMBEDDING_DIM, face_backend="dlib")

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def tokens_per_photo(self) -> int:
        return self._tokens

    def modules(self) -> list[torch.nn.Module]:
        return [self.projection, self.controlnet]

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["controlnet"] = str(self.controlnet_path)
        return info

    # -- conditioning ------------------------------------------------------------------------------

    def encode(self, identity: Identity, mode: str = "mean", **options: Any) -> IdentityConditioning:
        """Resampler tokens of the raw embedding (∅: of a zero embedding), the keypoint image, the scale.

        Options: ``controlnet_scale`` (default 0.8) and ``pose`` — keypoints from another photo: a
        :class:`~fastface.faces.types.Pose` or a photo (analysed with the adapter's face backend);
        default the identity's first photo.
        """
        import torch

        from ..keypoint_image import draw_keypoints

        check_mode(mode)
        self.spec.check_options(options)
        self.check_identity(identity)
        scale = check_controlnet_scale(options.get("controlnet_scale"))
        pose = options.get("pose")
        if identity.raw_embeddings is None:
            raise InputError(
                "InstantID needs the raw (un-normalised) antelopev2 embedding: pass face photos analysed with the "
                "antelopev2 backend, or raw vectors"
            )
        keypoints, size = _pose_of(identity) if pose is None else _pose_of(self._pose(pose))
        raw = np.asarray(identity.raw_embeddings, dtype=np.float32)
        rows = raw if mode == "concat" else raw.mean(axis=0, keepdims=True)
        param = next(self.projection.parameters())
        # (n, 1, D): the Resampler reads each embedding as one input token.
        embeds = torch.from_numpy(np.ascontiguousarray(rows[:, None, :])).to(param.device, param.dtype)
        with torch.no_grad():
            cond = self.projection(embeds)
            null = self.projection(torch.zeros_like(embeds[:1]))
        count = cond.shape[0]
        cond = cond.reshape(1, -1, cond.shape[-1])
        null = null.repeat(count, 1, 1).reshape(1, -1, null.shape[-1])
        info = identity_info(self, identity, mode, int(cond.shape[1]))
        info["pose"] = "identity" if pose is None else getattr(pose, "source", None) or str(pose)
        info["controlnet_scale"] = scale
        extras = {"keypoint_image": draw_keypoints(keypoints, size), "controlnet_scale": scale}
        return IdentityConditioning(cond=cond, null=null, info=MappingProxyType(info),
                                    extras=MappingProxyType(extras))

    def _pose(self, pose: Any) -> Any:
        from ..faces.types import Pose

        if isinstance(pose, Pose):
            return pose
        from ..faces import pose_from_photo

        return pose_from_photo(pose, self.spec.face_backend or "antelopev2")

    def prepare_call(self, conditioning: IdentityConditioning, *, height: int, width: int) -> IdentityConditioning:
        """Adds the (1, 3, height, width) IdentityNet input, on the ControlNet's device and dtype."""
        from ..keypoint_image import control_tensor

        param = next(self.controlnet.parameters())
        image = control_tensor(conditioning.extras["keypoint_image"], height, width).to(param.device, param.dtype)
        return replace(conditioning, extras=MappingProxyType({**conditioning.extras, "control_image": image}))

    def branch_extras(self, call: UNetCall) -> dict[str, Any]:
        """IdentityNet residuals for every row of the batched call, with that row's identity tokens."""
        control = call.conditioning.extras["control_image"]
        scale = call.conditioning.extras["controlnet_scale"]
        rows = call.sample.shape[0]
        down, mid = self.controlnet(
            call.sample,
            call.timestep,
            encoder_hidden_states=call.identity_tokens,
            controlnet_cond=control.expand(rows, -1, -1, -1),
            conditioning_scale=scale,
            added_cond_kwargs=dict(call.added_cond_kwargs),
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def extra_evaluations(self, conditions: Sequence[tuple[bool, bool]], count: int) -> dict[str, int]:
        return {"controlnet": len(conditions) * count}

    # -- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        sdxl: StableDiffusionXLPipeline,
        spec: AdapterSpec,
        *,
        path: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
    ) -> InstantIDAdapter:
        from diffusers import ControlNetModel

        checkpoint = checkpoint_path(spec, path)
        state = read_ip_adapter_checkpoint(checkpoint)
        require_resampler(state, checkpoint, "an InstantID ip-adapter.bin")
        folder = controlnet_folder(spec, checkpoint)
        unet = sdxl.unet
        try:
            controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=unet.dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"cannot load the IdentityNet ControlNet from '{folder}': {str(exc)[:200]}") from exc
        width = unet.config.cross_attention_dim
        if controlnet.config.cross_attention_dim != width:
            raise InputError(f"the IdentityNet in '{folder}' attends to {controlnet.config.cross_attention_dim}-d "
                             f"tokens but this UNet's identity tokens are {width}-d")
        controlnet.to(unet.device).eval()
        projection = load_projection(sdxl, state, checkpoint)
        tokens = int(state["image_proj"]["latents"].shape[1])
        return cls(spec, projection, checkpoint, controlnet, folder, resampler_input_dim(state["image_proj"]), tokens)


def _pose_of(source: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """(keypoints (5, 2), canvas (width, height)) of a Face-with-size or an Identity's first photo."""
    keypoints = getattr(source, "keypoints", None)
    if isinstance(keypoints, list):  # an Identity: one (5, 2) array per photo
        sizes = getattr(source, "image_sizes", [])
        if not keypoints or not sizes:
            raise InputError("InstantID needs the five face keypoints and the photo size: pass face photos "
                             "(or a pose photo), not bare embeddings")
        return np.asarray(keypoints[0], dtype=np.float32), tuple(sizes[0])
    size = getattr(source, "size", None)
    if keypoints is None or size is None:
        raise InputError("a pose needs five keypoints and its photo's size (width, height)")
    return np.asarray(keypoints, dtype=np.float32), tuple(size)
