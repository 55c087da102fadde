"""The identity-adapter seam: what every adapter provides to the engine (METHOD §7).

An adapter is one class (a subclass of :class:`IdentityAdapter`) in one file of this package, and
one or more :class:`AdapterSpec` entries (checkpoint, licence, defaults) that the registry in
``fastface/adapters/__init__.py`` collects. The engine knows nothing else about it:

- :meth:`IdentityAdapter.load` puts the checkpoint into a diffusers SDXL pipeline (decoupled
  cross-attention weights, processors, its own LoRA if any, extra models such as a ControlNet);
- :meth:`IdentityAdapter.encode` turns an :class:`~fastface.faces.types.Identity` into an
  :class:`IdentityConditioning`: tokens for the identity I and for the null identity ∅, plus any
  extras it needs later (e.g. a keypoint image);
- :meth:`IdentityAdapter.attention_kwargs` says how the per-sample identity tokens of one batched
  UNet call reach its attention processors (``cross_attention_kwargs``);
- :meth:`IdentityAdapter.branch_extras` may add UNet keyword arguments to each batched call, for
  example ControlNet residuals computed with each branch's own identity tokens (METHOD §7: ∅
  keeps structure controls such as keypoints), and :meth:`IdentityAdapter.extra_evaluations`
  counts what that costs (ControlNet evaluations) for the metadata.

Nothing is stored on a module between calls: everything per call travels in the arguments.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputError
from ..hub import read_weights, resolve_file, resolve_folder

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline

    from ..faces.types import Identity

# PEFT adapter name of an identity adapter's own LoRA (FaceID's), kept active beside the backbone's.
ID_LORA_ADAPTER = "fastface_id"
IDENTITY_MODES = ("mean", "concat")


@dataclass(frozen=True)
class RequiredFile:
    """One file (or folder, ``filename`` None) an adapter needs: for ``doctor`` and downloads."""

    repo: str
    filename: str | None
    role: str  # "checkpoint", "image encoder", "controlnet", "face model", ...
    patterns: tuple[str, ...] = ()  # files of a folder download
    # Where the adapter also finds it beside a local checkpoint (relative to the checkpoint's
    # folder; None: only from ``repo``): such a file is not needed from the hub when it lies there.
    local_name: str | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """One registered identity adapter: its checkpoint, what it expects, licences, implementation.

    ``implementation`` is ``"module:Class"`` of the :class:`IdentityAdapter` subclass, imported only
    when the adapter is loaded (listing adapters imports no model code).
    """

    name: str
    repo: str
    weight_name: str
    kind: str  # checkpoint family, told apart from the checkpoint's keys by the implementation
    embedding_dim: int | None  # face embedding size it needs (None: no face embedding)
    face_backend: str | None  # default face backend producing that embedding
    licence: tuple[str, ...]
    implementation: str
    image_encoder: str | None = None
    shortcut_scale: float = 1.0  # FaceID-Plus v2: tokens = id_tokens + s * resampler(...)
    num_tokens: int = 4  # identity tokens per reference photo
    description: str = ""
    presets_tuned: bool = True  # False: the method presets were tuned on another adapter
    extra_files: tuple[RequiredFile, ...] = ()  # beyond the checkpoint and the image encoder
    # Per-call options the adapter's encode() accepts, with their defaults, and a check of their
    # values (raises ConfigError; None: any value): both run before any model loads.
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    option_values: Callable[[Mapping[str, Any]], None] | None = None

    def adapter_class(self) -> type[IdentityAdapter]:
        module_name, _, class_name = self.implementation.partition(":")
        module = importlib.import_module(module_name, package=__package__)
        cls = getattr(module, class_name)
        if not (isinstance(cls, type) and issubclass(cls, IdentityAdapter)):
            raise TypeError(f"{self.implementation} is not an IdentityAdapter")
        return cls

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse unknown per-call options and out-of-range values, before anything loads."""
        check_options(self.name, options, tuple(self.options))
        if self.option_values is not None:
            self.option_values(options)

    def required_files(self) -> list[RequiredFile]:
        """Every file the adapter needs (checkpoint, image encoder, extras), hub names."""
        files = [RequiredFile(self.repo, self.weight_name, "checkpoint")]
        if self.image_encoder:
            files.append(
                RequiredFile(self.image_encoder, None, "image encoder", ("config.json", "preprocessor_config.json",
                                                                         "model.safetensors"))
            )
        return files + list(self.extra_files)

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
            "presets_tuned": self.presets_tuned,
            "files": [f"{f.repo}/{f.filename}" if f.filename else f.repo for f in self.required_files()],
        }


@dataclass(frozen=True)
class IdentityConditioning:
    """One identity, encoded: ``cond`` tokens for I and ``null`` tokens for ∅, each (1, S, C).

    ``extras`` holds whatever else the adapter's :meth:`IdentityAdapter.branch_extras` needs (e.g.
    InstantID's keypoint image); ``info`` describes where it came from (adapter, backend, photos,
    mode). Reusable across calls of the pipeline that computed it.
    """

    cond: torch.Tensor
    null: torch.Tensor
    info: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def num_tokens(self) -> int:
        return int(self.cond.shape[1])


# The name the engine and its callers have used since the first release.
IdentityTokens = IdentityConditioning


@dataclass(frozen=True)
class UNetCall:
    """One step's batched UNet call as :meth:`IdentityAdapter.branch_extras` sees it.

    The batch is branch-major: chunk j (rows ``j*count … (j+1)*count-1``) is the branch condition
    ``conditions[j]`` = (with text, with identity). ``identity_tokens`` holds each row's identity
    tokens (I or ∅ per its chunk), ``encoder_hidden_states``/``added_cond_kwargs`` each row's text.
    """

    step: int
    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Mapping[str, torch.Tensor]
    identity_tokens: torch.Tensor
    conditions: tuple[tuple[bool, bool], ...]
    count: int
    conditioning: IdentityConditioning


class IdentityAdapter(ABC):
    """An identity adapter loaded into one SDXL pipeline (see the module docstring for the contract)."""

    # True for adapters whose branch_extras adds UNet inputs (e.g. a ControlNet): the loop then
    # calls it at every step; otherwise the loop does not even build the UNetCall.
    uses_branch_extras: bool = False

    def __init__(self, spec: AdapterSpec, checkpoint: Path) -> None:
        self.spec = spec
        self.checkpoint = checkpoint

    # -- what subclasses provide -------------------------------------------------------------

    @classmethod
    @abstractmethod
    def load(
        cls,
        sdxl: StableDiffusionXLPipeline,
        spec: AdapterSpec,
        *,
        path: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
    ) -> IdentityAdapter:
        """Read the checkpoint (``path`` or the spec's hub file) and install it into ``sdxl``.

        Afterwards the UNet's ``attn2`` layers carry the adapter's processors; no state that
        depends on a call is kept anywhere.
        """

    @abstractmethod
    def encode(self, identity: Identity, mode: str = "mean", **options: Any) -> IdentityConditioning:
        """Tokens for ``identity`` and for the null identity; ``mode``: "mean" or "concat" photos.

        ``options``: adapter-specific per-call options (e.g. a pose photo, a ControlNet scale),
        from ``FastFacePipeline(..., adapter_options=...)``; refuse unknown ones with
        :func:`check_options`.
        """

    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """Models the adapter owns outside the UNet (projections, encoders): moved with :meth:`to`."""

    # -- defaults subclasses may override ------------------------------------------------------

    @classmethod
    def tiny_spec(cls, spec: AdapterSpec) -> AdapterSpec:
        """The spec of this adapter's tiny random-weight checkpoint (for the ``tiny`` backbone)."""
        raise ConfigError(f"adapter {spec.name!r} has no tiny test checkpoint")

    @property
    def tokens_per_photo(self) -> int:
        """Identity tokens one reference photo gives (S = tokens_per_photo · photos in concat mode)."""
        return self.spec.num_tokens

    @property
    def embedding_dim(self) -> int | None:
        """Size of the face embedding :meth:`encode` expects (None: it needs none)."""
        return self.spec.embedding_dim

    @property
    def lora_name(self) -> str | None:
        """PEFT adapter name of the adapter's own LoRA in the UNet, or None."""
        return None

    def licences(self) -> tuple[str, ...]:
        return tuple(self.spec.licence)

    def describe(self) -> dict[str, Any]:
        info = self.spec.to_dict()
        info["checkpoint"] = str(self.checkpoint)
        info["embedding_dim"] = self.embedding_dim
        info["tokens_per_photo"] = self.tokens_per_photo
        return info

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        for module in self.modules():
            module.to(device=device, dtype=dtype)

    def install(self, unet: Any) -> dict[str, Any]:
        """Put FastFace's identity processors on the UNet; returns the previous ones."""
        from ..processors import install

        return install(unet)

    def uninstall(self, sdxl: StableDiffusionXLPipeline, previous: Mapping[str, Any]) -> None:
        """Undo :meth:`install` and :meth:`load` (the adapter's LoRA is removed by the engine)."""
        from ..processors import uninstall

        uninstall(sdxl.unet, previous)
        sdxl.unload_ip_adapter()

    def attention_kwargs(
        self,
        tokens: torch.Tensor,
        *,
        scale: float,
        step: int,
        attention: Any,
        am_kernel: Any = None,
        conditioning: IdentityConditioning | None = None,
        contexts: Any = None,
    ) -> dict[str, Any]:
        """``cross_attention_kwargs`` of one batched UNet call: per-row identity tokens (B, S, C).

        ``conditioning`` is the call's encoded identity (its ``extras`` may carry per-call settings
        of the adapter's processors, e.g. PuLID's zero-token count). ``contexts``: the engine's
        :class:`~fastface.processors.CallContexts` of the call (what is fixed for the whole call:
        identity K/V projected once, tensor scales, fused-kernel parts), when the adapter's layers
        are FastFace IP-Adapter processors; None: a plain per-step context.
        """
        from ..processors import CONTEXT_KEY, IPContext

        if contexts is not None:
            return {CONTEXT_KEY: contexts.context(tokens, step)}
        context = IPContext(
            tokens=tokens, scale=scale, step=step, attention=attention, am_kernel=am_kernel,
            tokens_per_photo=self.tokens_per_photo,
        )
        return {CONTEXT_KEY: context}

    def prepare_call(self, conditioning: IdentityConditioning, *, height: int, width: int) -> IdentityConditioning:
        """The conditioning of one call at its output size (once per call, before the loop).

        Adapters with size-dependent extras (InstantID's keypoint image, resized to the output)
        prepare them here, so that :meth:`branch_extras` only reads them at every step.
        """
        return conditioning

    def branch_extras(self, call: UNetCall) -> dict[str, Any]:
        """Extra UNet keyword arguments for one batched call (e.g. ControlNet residuals); none here.

        Called only when :attr:`uses_branch_extras` is True.
        """
        return {}

    def extra_evaluations(self, conditions: Sequence[tuple[bool, bool]], count: int) -> dict[str, int]:
        """Model evaluations :meth:`branch_extras` adds to one call, by kind (e.g. ``{"controlnet": 3}``)."""
        return {}

    def check_identity(self, identity: Identity) -> None:
        """Refuse an identity this adapter cannot encode, with a clear message."""
        expected = self.embedding_dim
        if expected is not None and identity.dim != expected:
            backend = f" (use the '{self.spec.face_backend}' face backend)" if self.spec.face_backend else ""
            raise InputError(
                f"the {self.spec.name} adapter expects {expected}-d embeddings, got {identity.dim}-d{backend}"
            )


# ---------------------------------------------------------------------------------------------
# Helpers shared by adapters


def check_options(adapter: str, options: Mapping[str, Any], allowed: Sequence[str] = ()) -> None:
    """Refuse adapter options this adapter does not know (one line naming the known ones)."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = f"; it knows: {', '.join(allowed)}" if allowed else "; it takes none"
        raise ConfigError(f"unknown option(s) for the {adapter} adapter: {', '.join(unknown)}{known}")


def check_mode(mode: str) -> None:
    if mode not in IDENTITY_MODES:
        raise ConfigError(f"identity_mode must be one of {', '.join(IDENTITY_MODES)}; got {mode!r}")


def identity_info(adapter: IdentityAdapter, identity: Identity, mode: str, num_tokens: int) -> dict[str, Any]:
    """The ``info`` of an :class:`IdentityConditioning` (what the metadata records)."""
    return {
        "adapter": adapter.spec.name,
        "backend": identity.backend,
        "model": identity.model,
        "dim": identity.dim,
        "num_photos": identity.num_photos,
        "sources": list(identity.sources),
        "outliers": list(identity.outliers),
        "mode": mode,
        "num_tokens": num_tokens,
    }


def read_ip_adapter_checkpoint(path: Path) -> dict[str, dict[str, Any]]:
    """An IP-Adapter checkpoint (``.bin`` or ``.safetensors``) as ``{"image_proj": …, "ip_adapter": …}``."""
    # hub.read_weights checks the file before reading: a damaged or foreign file is one clear line.
    state = read_weights(path, what="adapter checkpoint")
    if path.suffix.lower() == ".safetensors":
        flat, state = state, {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            group, _, rest = key.partition(".")
            if group in state:
                state[group][rest] = value
    if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
        raise InputError(f"'{path}' is not an IP-Adapter checkpoint (no 'image_proj'/'ip_adapter' keys)")
    return state


def checkpoint_path(spec: AdapterSpec, path: str | os.PathLike | None) -> Path:
    """The checkpoint file: ``path``, the tiny model's, or the hub file (MissingWeightsError if absent)."""
    if path is None and spec.repo == "tiny":
        from ..tiny import tiny_model_dir

        return tiny_model_dir() / spec.weight_name
    return resolve_file(
        path if path is not None else spec.repo,
        spec.weight_name,
        what=f"{spec.name} adapter",
        hint=f"download '{spec.weight_name}' from '{spec.repo}' on a connected machine and pass "
        "adapter_path=<file>",
    )


def image_encoder_path(spec: AdapterSpec, path: str | os.PathLike | None) -> Path:
    """The CLIP image encoder folder: ``path``, the tiny model's, or the hub folder."""
    if path is None and spec.image_encoder == "tiny":
        from ..tiny import tiny_model_dir

        return tiny_model_dir() / "image_encoder"
    repo = str(path) if path is not None else spec.image_encoder
    if repo is None:
        raise ConfigError(f"the {spec.name} adapter uses no image encoder")
    return resolve_folder(
        repo,
        what=f"{spec.name} image encoder",
        hint=f"download '{repo}' (config.json, preprocessor_config.json, model.safetensors) on a "
        "connected machine and pass image_encoder=<folder>",
        allow_patterns=["config.json", "preprocessor_config.json", "model.safetensors"],
    )


def tiny_variant(spec: AdapterSpec, **changes: Any) -> AdapterSpec:
    """``spec`` pointing at the tiny checkpoints (repo "tiny", test licence), with ``changes``."""
    base = {
        "repo": "tiny",
        "licence": ("tiny random test weights (no restriction)",),
        "image_encoder": "tiny" if spec.image_encoder else None,
        "description": f"tiny random {spec.name} for tests",
        "extra_files": (),
    }
    return replace(spec, **(base | changes))
