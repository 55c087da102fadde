"""PuLID for SDXL (v1 and v1.1): an identity attention added to every cross-attention output.

PuLID (Guo et al. 2024, ``ToTheBeginning/PuLID``; checkpoints ``guozinan/PuLID``) differs from the
IP-Adapter family in where the identity enters. Its identity condition is

    [antelopev2 raw embedding (512) ‖ normalised EVA02-CLIP-L-14-336 class embedding (768)]

plus five EVA-CLIP hidden states, all read from the photo's face aligned to the FFHQ 512² template,
turned grey and cut out of its background by BiSeNet face parsing. An ID encoder
(:mod:`fastface.models.pulid_encoders`: v1 ``IDEncoder``, 10 tokens; v1.1 ``IDFormer``, 32 tokens)
maps it to identity tokens, and every ``attn2`` layer adds to its text attention output (before
the output projection) an attention over those tokens followed by ``num_zero`` zero tokens, scaled
by the id scale λ and joined plainly or through an orthogonal projection
(:mod:`fastface.models.pulid_attention`). Weights: ``id_adapter.*`` (the encoder) and
``id_adapter_attn_layers.{n}.id_to_k/id_to_v`` (n = the layer's position among all attention
processors).

METHOD §7: ∅ is the encoder applied to all-zero inputs (zero condition, zero hidden states), as
the official ``get_id_embedding`` computes its "uncond" tokens; AM acts on the identity softmax
over the real tokens (not the padding), before the orthogonal projection.

Modes of the official code (``app.py`` / ``app_v1_1.py``), as adapter settings:

- ``pulid`` (v1 "fidelity", the official default): 8 zero tokens, orthogonal projection v2;
- ``pulid-style`` (v1 "extremely style"): 16 zero tokens, orthogonal projection v1;
- ``pulid-v1.1``: 20 zero tokens, orthogonal projection v2 (its app's defaults).

Per call, ``adapter_options={"num_zero": N, "ortho": "off" | "v1" | "v2"}`` overrides the mode (the
official v1.1 app's "num zero" slider); they travel in the conditioning's ``extras`` to
:meth:`PuLIDAdapter.attention_kwargs`.

Where FastFace departs, on purpose: the face keypoints come from FastFace's face backend (the
official code detects them again with facexlib's RetinaFace), the encoders run in float32 on the
pipeline's device (as the official code: it never casts them), and several photos are encoded as
the official multi-photo input of v1.1 (jointly) or, for v1, per photo then concatenated
(``concat``, the official "id mix") or averaged token-wise (``mean``, an extension). A zero text
output (FastFace's null text is all-zero embeddings) has a zero orthogonal projection instead of
the official 0/0.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, InputError, MissingWeightsError
from ..hub import resolve_file
from .base import (
    AdapterSpec,
    IdentityAdapter,
    IdentityConditioning,
    RequiredFile,
    check_mode,
    identity_info,
    tiny_variant,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ..attention import AttentionManipulation
    from ..faces.types import Identity

PULID_REPO = "guozinan/PuLID"
EVA_CLIP_REPO = "QuanSun/EVA-CLIP"
EVA_CLIP_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
PARSING_FILE = "parsing_bisenet.pth"
PARSING_RELEASE = "https://github.com/xinntao/facexlib/releases/download/v0.2.0"  # not on the hub
PARSING_URL = f"{PARSING_RELEASE}/{PARSING_FILE}"
_IMPLEMENTATION = "fastface.adapters.pulid:PuLIDAdapter"
ORTHO_MODES = ("off", "v1", "v2")  # = fastface.models.pulid_attention.ORTHO_MODES (no torch import here)
_LICENCES = (
    "PuLID code and weights (guozinan/PuLID): Apache-2.0",
    "antelopev2 face models (InsightFace): non-commercial research use only",
    "EVA02-CLIP (QuanSun/EVA-CLIP): MIT",
    "BiSeNet face parsing weights (facexlib): MIT",
)
_EXTRA_FILES = (
    RequiredFile(EVA_CLIP_REPO, EVA_CLIP_FILE, "image encoder", local_name=EVA_CLIP_FILE),
    RequiredFile(PARSING_RELEASE, PARSING_FILE, "face parsing"),
)


def check_pulid_options(options: Mapping[str, Any]) -> None:
    """``num_zero``: an integer in [0, 1024]; ``ortho``: one of :data:`ORTHO_MODES`."""
    if "num_zero" in options:
        num_zero = options["num_zero"]
        if isinstance(num_zero, bool) or not isinstance(num_zero, int) or not 0 <= num_zero <= 1024:
            raise ConfigError(f"num_zero must be an integer in [0, 1024], got {num_zero!r}")
    if "ortho" in options and options["ortho"] not in ORTHO_MODES:
        raise ConfigError(f"ortho must be one of {', '.join(ORTHO_MODES)}, got {options['ortho']!r}")


def _spec(name: str, weight: str, kind: str, tokens: int, num_zero: int, ortho: str, description: str) -> AdapterSpec:
    return AdapterSpec(
        name=name, repo=PULID_REPO, weight_name=weight, kind=kind, embedding_dim=512, face_backend="antelopev2",
        licence=_LICENCES, implementation=_IMPLEMENTATION, num_tokens=tokens, description=description,
        presets_tuned=False, extra_files=_EXTRA_FILES,
        options=MappingProxyType({"num_zero": num_zero, "ortho": ortho}), option_values=check_pulid_options,
    )


SPECS = (
    _spec("pulid", "pulid_v1.bin", "pulid-v1", 10, 8, "v2",
          "PuLID v1 SDXL, fidelity mode: 10 tokens, 8 zero tokens, orthogonal projection v2"),
    _spec("pulid-style", "pulid_v1.bin", "pulid-v1", 10, 16, "v1",
          "PuLID v1 SDXL, extremely-style mode: 10 tokens, 16 zero tokens, orthogonal projection v1"),
    _spec("pulid-v1.1", "pulid_v1.1.safetensors", "pulid-v1.1", 32, 20, "v2",
          "PuLID v1.1 SDXL: 32 tokens (IDFormer), 20 zero tokens, orthogonal projection v2"),
)


@dataclass(frozen=True)
class PuLIDContext:
    """What the identity attention needs in one UNet call (travels in ``cross_attention_kwargs``).

    ``tokens`` (B, S, C): each row's identity tokens (I or ∅), without the padding; ``scale``: the id
    scale λ; ``step``: the loop index; ``num_zero``/``ortho``/``ortho_tokens``: PuLID's mode.
    """

    tokens: torch.Tensor
    scale: float
    step: int
    attention: AttentionManipulation | None = None
    num_zero: int = 0
    ortho: str = "off"
    ortho_tokens: int = 5
    tokens_per_photo: int | None = None


def pulid_processor_class():
    """The attn2 processor class (built on first use: this module imports no torch at import time)."""
    from functools import partial

    from torch import nn

    from ..models.pulid_attention import add_identity, identity_attention, ortho_v2_mass, pad_tokens
    from ..processors import cross_attention

    class PuLIDAttnProcessor(nn.Module):
        """diffusers' scaled-dot-product cross-attention plus PuLID's identity attention.

        The text attention, output projection and residual are computed as diffusers'
        ``AttnProcessor2_0`` (and PuLID's ``IDAttnProcessor2_0``) do (:func:`fastface.processors.cross_attention`).
        Without a context (the UNet called outside FastFace) it is plain cross-attention.
        """

        def __init__(self, hidden_size: int, cross_attention_dim: int, part: str) -> None:
            super().__init__()
            self.id_to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.id_to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False)
            self.part = part

        def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                     ip_hidden_states: PuLIDContext | None = None) -> torch.Tensor:
            context = ip_hidden_states
            branch = None
            if context is not None and context.scale != 0:
                branch = partial(self._add_identity, attn, context=context)
            return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, branch)

        def _add_identity(self, attn: Any, hidden_states: torch.Tensor, query: torch.Tensor, batch_size: int,
                          head_dim: int, *, context: PuLIDContext) -> torch.Tensor:
            tokens = context.tokens
            if tokens.shape[0] != batch_size:
                tokens = tokens.expand(batch_size, -1, -1)
            # float32 projections of float32-cast tokens, then the UNet's dtype: the official
            # processors are created in float32 beside a float16 UNet and cast their output.
            padded = pad_tokens(tokens, context.num_zero).to(self.id_to_k.weight.dtype)
            id_key = self.id_to_k(padded).to(query.dtype).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            id_value = self.id_to_v(padded).to(query.dtype).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            identity = identity_attention(query, id_key, id_value, tokens.shape[1], context.attention,
                                          part=self.part, step=context.step,
                                          tokens_per_photo=context.tokens_per_photo)
            identity = identity.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            mass = ortho_v2_mass(query, id_key, context.ortho_tokens) if context.ortho == "v2" else None
            return add_identity(hidden_states, identity, context.scale, context.ortho, mass)

    return PuLIDAttnProcessor


def _read_state(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged, truncated or foreign files
        raise InputError(f"cannot read '{path}': {type(exc).__name__}") from exc
    if not isinstance(state, dict):
        raise InputError(f"'{path}' holds no state dict")
    return state


class PuLIDAdapter(IdentityAdapter):
    """PuLID v1 / v1.1 loaded into one SDXL pipeline: its encoder, EVA-CLIP, face parsing, id layers."""

    def __init__(self, spec: AdapterSpec, checkpoint: Path, encoder: torch.nn.Module, eva: torch.nn.Module,
                 parser: torch.nn.Module, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 files: Mapping[str, Path]) -> None:
        super().__init__(spec, checkpoint)
        self.encoder, self.eva, self.parser = encoder, eva, parser
        self.layers = dict(layers)
        self.files = dict(files)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def tiny_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        from .. import tiny_pulid

        weight = tiny_pulid.PULID_V1_FILE if spec.kind == "pulid-v1" else tiny_pulid.PULID_V11_FILE
        return tiny_variant(spec, weight_name=weight, embedding_dim=tiny_pulid.TINY_ANTELOPE_DIM, face_backend="dlib")

    @classmethod
    def _files(cls, spec: AdapterSpec, path: str | os.PathLike | None,
               image_encoder: str | os.PathLike | None) -> dict[str, Path]:
        if path is None and spec.repo == "tiny":
            from ..tiny_pulid import tiny_pulid_dir

            path = tiny_pulid_dir()
        hint = f"download '{spec.weight_name}' from '{spec.repo}' and pass adapter_path=<file or folder>"
        checkpoint = resolve_file(path if path is not None else spec.repo, spec.weight_name,
                                  what=f"{spec.name} adapter", hint=hint)
        beside = checkpoint.parent
        if image_encoder is not None:
            eva = resolve_file(image_encoder, EVA_CLIP_FILE, what="EVA02-CLIP image encoder")
        elif (beside / EVA_CLIP_FILE).is_file():
            eva = beside / EVA_CLIP_FILE
        else:
            eva = resolve_file(EVA_CLIP_REPO, EVA_CLIP_FILE, what="EVA02-CLIP image encoder",
                               hint=f"download '{EVA_CLIP_FILE}' from '{EVA_CLIP_REPO}', put it beside the PuLID "
                               "checkpoint or pass image_encoder=<file>")
        parsing = beside / PARSING_FILE
        if not parsing.is_file():
            raise MissingWeightsError(
                f"{spec.name} adapter: face parsing weights '{PARSING_FILE}' not found beside '{checkpoint}'; "
                f"download {PARSING_URL} into '{beside}'"
            )
        return {"checkpoint": checkpoint, "image_encoder": eva, "face_parsing": parsing}

    @classmethod
    def load(cls, sdxl: StableDiffusionXLPipeline, spec: AdapterSpec, *, path: str | os.PathLike | None = None,
             image_encoder: str | os.PathLike | None = None) -> PuLIDAdapter:
        """Read the checkpoint, EVA-CLIP and the parsing net; keep the id layers for :meth:`install`."""
        from ..models.eva_clip import EVAVisionTower
        from ..models.face_parsing import BiSeNet
        from ..models.pulid_encoders import IDFormer, load_id_encoder

        files = cls._files(spec, path, image_encoder)
        checkpoint = files["checkpoint"]
        state = _read_state(checkpoint)
        encoder_state = {k: v for k, v in state.items() if k.startswith("id_adapter.")}
        try:
            encoder = load_id_encoder(encoder_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise InputError(f"'{checkpoint}' is not a PuLID checkpoint ({str(exc)[:200]})") from exc
        if (spec.kind == "pulid-v1.1") != isinstance(encoder, IDFormer):
            found = "v1.1 (IDFormer)" if isinstance(encoder, IDFormer) else "v1 (IDEncoder)"
            raise InputError(f"'{checkpoint}' is a PuLID {found} checkpoint, which the {spec.name} adapter cannot use")
        layers: dict[str, tuple[Any, Any]] = {}
        unet = sdxl.unet
        for index, name in enumerate(unet.attn_processors):
            if not name.endswith("attn2.processor"):
                continue
            k = state.get(f"id_adapter_attn_layers.{index}.id_to_k.weight")
            v = state.get(f"id_adapter_attn_layers.{index}.id_to_v.weight")
            module = unet.get_submodule(name.removesuffix(".processor"))
            expected = (module.to_q.out_features, module.to_k.in_features)
            if k is None or v is None or tuple(k.shape) != expected or tuple(v.shape) != expected:
                raise InputError(f"'{checkpoint}' does not fit this backbone's UNet: no {expected} id layer "
                                 f"{index} for '{name}'")
            layers[name] = (k, v)
        try:
            eva = EVAVisionTower.from_state_dict(_read_state(files["image_encoder"]))
            parser = BiSeNet.from_state_dict(_read_state(files["face_parsing"]))
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"PuLID's EVA-CLIP or face parsing weights do not load: {str(exc)[:200]}") from exc
        return cls(spec, checkpoint, encoder.eval(), eva, parser, layers, files)

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder, self.eva, self.parser]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        # float32 whatever the UNet's dtype, as the official pipeline runs them.
        for module in self.modules():
            module.to(device=device)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update({k: str(v) for k, v in self.files.items()})
        info.update({"num_zero": self.spec.options["num_zero"], "ortho": self.spec.options["ortho"]})
        return info

    @property
    def embedding_dim(self) -> int:
        """The face embedding width the checkpoint expects: its condition width less EVA-CLIP's."""
        first = self.encoder.id_embedding_mapping[0] if hasattr(self.encoder, "id_embedding_mapping") else self.encoder.body[0]
        return int(first.in_features) - int(self.eva.embed_dim)

    @property
    def tokens_per_photo(self) -> int:
        return int(self.encoder.num_tokens)

    # -- processors ----------------------------------------------------------------------------------

    def install(self, unet: Any) -> dict[str, Any]:
        import torch

        from ..processors import part_of

        previous = dict(unet.attn_processors)
        cls = pulid_processor_class()
        replaced = dict(previous)
        for name, (k, v) in self.layers.items():
            processor = cls(k.shape[0], k.shape[1], part_of(name))
            processor.id_to_k.weight.data = k.to(unet.device, torch.float32)
            processor.id_to_v.weight.data = v.to(unet.device, torch.float32)
            replaced[name] = processor
        unet.set_attn_processor(replaced)
        return previous

    def uninstall(self, sdxl: StableDiffusionXLPipeline, previous: Mapping[str, Any]) -> None:
        sdxl.unet.set_attn_processor(dict(previous))

    def attention_kwargs(self, tokens: torch.Tensor, *, scale: float, step: int, attention: Any,
                         am_kernel: Any = None, conditioning: IdentityConditioning | None = None,
                         contexts: Any = None) -> dict[str, Any]:
        # PuLID's own processors (models/pulid_attention.py) take no CallContexts: ``contexts`` is None.
        from ..processors import CONTEXT_KEY

        settings = self.settings(conditioning)
        context = PuLIDContext(tokens=tokens, scale=scale, step=step, attention=attention,
                               num_zero=settings["num_zero"], ortho=settings["ortho"],
                               tokens_per_photo=self.tokens_per_photo)
        return {CONTEXT_KEY: context}

    def settings(self, conditioning: IdentityConditioning | None = None) -> dict[str, Any]:
        """The zero-token count and orthogonal projection of a call: its encode options, else the spec's."""
        extras = conditioning.extras if conditioning is not None else {}
        return {key: extras.get(key, default) for key, default in self.spec.options.items()}

    # -- identity ------------------------------------------------------------------------------------

    def _aligned_faces(self, identity: Identity) -> list[np.ndarray]:
        """The 512² FFHQ-aligned face of every photo, from the photo itself (re-read) and its keypoints."""
        from ..faces.io import load_image
        from ..models.pulid_face import align_face_512

        if not identity.keypoints or len(identity.keypoints) != identity.num_photos:
            raise InputError(f"the {self.spec.name} adapter reads the face photo itself (EVA-CLIP on the aligned "
                             "face): pass face photos, or an Identity from fastface.faces.build_identity, not bare "
                             "embeddings")
        faces = []
        for source, keypoints in zip(identity.sources, identity.keypoints):
            path = Path(source.strip("'"))
            if not path.is_file():
                raise InputError(f"the {self.spec.name} adapter needs to read the photo {source} again; it is not "
                                 "a file (pass photos as paths)")
            faces.append(align_face_512(load_image(path), keypoints))
        return faces

    def _raw_embeddings(self, identity: Identity) -> np.ndarray:
        """The recogniser's un-normalised embeddings (PuLID's input), where the face module kept them."""
        raw = getattr(identity, "raw_embeddings", None)
        if raw is None and identity.backend in ("antelopev2", "arcface", "buffalo_l", "auraface"):
            warnings.warn(
                f"the {identity.backend} embedding reached PuLID L2-normalised (the face module kept no raw "
                "embedding); PuLID was trained on raw antelopev2 embeddings (norm about 20-30)",
                UserWarning, stacklevel=3,
            )
        return np.asarray(raw if raw is not None else identity.embeddings, dtype=np.float32)

    def encode(self, identity: Identity, mode: str = "mean", **options: Any) -> IdentityConditioning:
        """Tokens for ``identity`` and for ∅ = the encoder on all-zero inputs (see the module docstring).

        ``options``: ``num_zero`` (zero tokens after the identity tokens, >= 0) and ``ortho`` ("off",
        "v1", "v2") for the calls using this conditioning; defaults: the adapter's mode (spec options).
        """
        import torch

        from ..models.pulid_encoders import IDFormer
        from ..models.pulid_face import eva_pixels

        check_mode(mode)
        self.spec.check_options(options)
        settings = {**self.spec.options, **options}
        num_zero, ortho = settings["num_zero"], settings["ortho"]
        self.check_identity(identity)
        device = next(self.encoder.parameters()).device
        faces = self._aligned_faces(identity)
        raw = torch.from_numpy(self._raw_embeddings(identity)).to(device)
        with torch.no_grad():
            conds, hiddens = [], []
            for i, face in enumerate(faces):
                cls_embed, hidden = self.eva(eva_pixels(face, self.parser, self.eva.image_size))
                cls_embed = cls_embed / cls_embed.norm(p=2, dim=1, keepdim=True)
                conds.append(torch.cat([raw[i:i + 1], cls_embed], dim=-1))
                hiddens.append(hidden)
            zero_cond = torch.zeros_like(conds[0])
            zero_hidden = [torch.zeros_like(h) for h in hiddens[0]]
            null = self.encoder(zero_cond, zero_hidden)
            if isinstance(self.encoder, IDFormer):
                # v1.1's multi-photo input: conditions side by side, hidden states along the token axis
                cond = self.encoder(torch.stack(conds, dim=1) if len(conds) > 1 else conds[0],
                                    [torch.cat(layer, dim=1) for layer in zip(*hiddens)])
            else:
                per_photo = torch.cat([self.encoder(c, h) for c, h in zip(conds, hiddens)])
                if mode == "concat":
                    cond = per_photo.reshape(1, -1, per_photo.shape[-1])
                    null = null.repeat(1, len(faces), 1)
                else:
                    cond = per_photo.mean(dim=0, keepdim=True)
        info = identity_info(self, identity, mode, int(cond.shape[1]))
        info.update({"num_zero": num_zero, "ortho": ortho,
                     "raw_embedding": getattr(identity, "raw_embeddings", None) is not None})
        return IdentityConditioning(cond=cond.float(), null=null.float(), info=MappingProxyType(info),
                                    extras=MappingProxyType({"num_zero": num_zero, "ortho": ortho}))
