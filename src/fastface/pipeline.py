"""FastFacePipeline: identity-preserving generation on (distilled) SDXL backbones.

The engine owns a diffusers ``StableDiffusionXLPipeline`` (``.sdxl``) and runs its own denoising
loop, the SDXL loop of diffusers with one change: at step k it evaluates only the branches that
``guidance.plan_steps(...)[k]`` needs (null / text / id / full), all of them and all images as ONE
batched UNet call, then combines them per image with ``guidance.combine`` (METHOD §2).

Per-call data (identity tokens per sample, adapter scale, step index, attention manipulation)
travel to the attention processors in ``cross_attention_kwargs``; nothing is stored on a module
between calls, the scheduler is a fresh copy per call, and everything the loop needs is built
before it starts, so the loop makes no host-device synchronisation.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import ID_LORA_ADAPTER, IdentityTokens, LoadedAdapter, load_adapter
from .attention import AttentionManipulation
from .backbones import (
    VAE_DEFAULT,
    BackboneSpec,
    VaeChoice,
    backbone_lora_weights,
    default_device,
    default_dtype,
    get_backbone,
    load_backbone,
    load_vae,
    resolve_vae,
    vae_scale_factor,
)
from .errors import ConfigError, InputError
from .faces.types import Identity
from .guidance import BRANCHES, GuidanceConfig, StepPlan, plan_steps
from .guidance import combine as combine_branches
from .placement import Placement, encode_sdxl_text, module_dtype
from .presets import DEFAULT_METHOD, get_method, plain_cfg
from .processors import CONTEXT_KEY, CallContexts, install, installed, make_am_kernel, uninstall
from .timing import synchronize

# Which conditions each branch uses: (text, identity).
_BRANCH_CONDITIONS = {"null": (False, False), "text": (True, False), "id": (False, True), "full": (True, True)}
_OUTPUT_TYPES = ("pil", "latent", "np")
_FROM_METHOD = ...  # sentinel: "take the attention manipulation of the method preset"


@dataclass(frozen=True)
class PromptEmbeds:
    """Encoded prompts, one row per prompt: T (``cond``/``pooled``) and ∅ (``null``/``null_pooled``).

    ∅ is all zeros (SDXL's null text) unless a negative prompt was given.
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str | None, ...]
    cond: torch.Tensor  # (P, L, C)
    pooled: torch.Tensor  # (P, C_pooled)
    null: torch.Tensor
    null_pooled: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class GenerationResult:
    """Images (PIL, or arrays for ``output_type="np"``; empty for "latent"), final latents, metadata."""

    images: list[Any]
    latents: torch.Tensor
    metadata: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _StepInputs:
    """Everything one step's UNet call needs, built before the loop."""

    plan: StepPlan
    rows: Mapping[str, int]  # branch -> chunk index in the UNet output
    num_chunks: int
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Mapping[str, torch.Tensor]
    cross_attention_kwargs: Mapping[str, Any] | None


def _versions() -> dict[str, str]:
    versions = {"fastface": __version__}
    for package in ("torch", "diffusers", "transformers", "peft"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _face_licence(backend: str) -> str | None:
    """Licence of a face backend's models, read from the faces registry without building it."""
    try:
        from .faces import BACKENDS

        target, options = BACKENDS[backend]
        module_name, class_name = target.split(":")
        if "pack" in options:
            from .faces.model_packs import get_pack

            return get_pack(options["pack"]).licence
        import importlib

        licence = getattr(getattr(importlib.import_module(module_name), class_name), "licence", None)
        return licence if isinstance(licence, str) else None
    except (KeyError, ImportError, AttributeError, ValueError, ConfigError):
        return None


def _as_list(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{what} must be a string or a non-empty list of strings, got {value!r}")


def replace_vae(sdxl: Any, vae: Any, name: str = "replacement") -> None:
    """Put ``vae`` in place of ``sdxl``'s VAE, after checking that it reads the same latents.

    The SDXL pipeline derives its pixel/latent scale from the VAE it was built with; a replacement
    (AutoencoderTiny has no ``block_out_channels`` to derive it from) must match that scale and
    the UNet's latent channels.
    """
    channels = sdxl.unet.config.in_channels
    if vae.config.latent_channels != channels:
        raise InputError(
            f"VAE '{name}' has {vae.config.latent_channels} latent channels; this backbone's UNet uses {channels}"
        )
    scale = vae_scale_factor(vae)
    if scale != sdxl.vae_scale_factor:
        raise InputError(f"VAE '{name}' maps 1 latent to {scale} px; this backbone needs {sdxl.vae_scale_factor}")
    sdxl.register_modules(vae=vae)


class FastFacePipeline:
    """Identity-preserving text-to-image on an SDXL backbone with an IP-Adapter FaceID adapter."""

    def __init__(
        self,
        sdxl: Any,
        backbone: BackboneSpec,
        adapter: LoadedAdapter | None = None,
        loras: Sequence[Any] = (),
        *,
        vae: VaeChoice | None = None,
    ) -> None:
        """Wrap a loaded SDXL pipeline; ``vae`` describes a replacement VAE already in ``sdxl``."""
        self.sdxl = sdxl
        self.backbone = backbone
        self.adapter = adapter
        self._vae_choice = vae
        # The accelerator the offloaded models run on (None: no CPU offload).
        self._offload_device: torch.device | None = None
        self._lora_weights = backbone_lora_weights(backbone, loras)
        self._applied_loras: dict[str, float] | None = None
        # Weights the LoRAs were merged into the UNet with (None: unfused, set per call).
        self._fused_loras: dict[str, float] | None = None
        # Fused: exact (1e-5), float-free for the compiled path, and on the CPU (bf16, SDXL shapes,
        # benchmarks/am_kernels.py) 2.0-2.4x faster than the lean kernel; see benchmarks/RESULTS.md.
        self._am_kernel_name = "fused"
        self._am_kernel = make_am_kernel(self._am_kernel_name)
        self._previous_processors = install(sdxl.unet) if adapter is not None else None
        # By layer name, read once (unet.attn_processors walks the UNet).
        self._ip_processors = installed(sdxl.unet) if adapter is not None else {}
        self._upcast_vae()
        # Device and dtype, read once here (and by .to / enable_model_cpu_offload): diffusers'
        # unet.device / unet.dtype walk every module of the UNet each time they are asked.
        self._placement = Placement.of(sdxl)
        self._version_cache: dict[str, str] | None = None
        # The compiled UNet / VAE decode (see compile()); None: eager.
        self._compiled: Any = None
        self._compile_options: dict[str, Any] | None = None

    def _upcast_vae(self) -> None:
        vae = self.sdxl.vae
        # AutoencoderTiny and the fp16-fix VAE say force_upcast=False (or nothing): they stay in float16.
        if module_dtype(vae) == torch.float16 and getattr(vae.config, "force_upcast", False):
            # The SDXL VAE overflows in float16. diffusers casts it up and back down around every
            # decode; keeping it in float32 once costs ~160 MB and leaves no cast inside calls.
            vae.to(torch.float32)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        backbone: str = "hyper-4",
        adapter: str | None = "faceid",
        *,
        base_model: str | os.PathLike | None = None,
        adapter_path: str | os.PathLike | None = None,
        image_encoder: str | os.PathLike | None = None,
        loras: Sequence[Any] = (),
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        vae: str | os.PathLike | None = None,
        vae_tiling: bool = False,
        cpu_offload: bool = False,
        compile: bool = False,
    ) -> FastFacePipeline:
        """Load a backbone (METHOD §6 name or ``tiny``) and an adapter (``faceid``, ``faceid-plusv2``, None).

        ``base_model``/``adapter_path``/``image_encoder`` replace the hub defaults with local paths;
        ``loras`` are extra style LoRAs, paths or (path, weight) pairs.

        Memory options (for small GPUs): ``vae`` replaces the backbone's VAE with ``"fp16-fix"``
        (madebyollin/sdxl-vae-fp16-fix: decodes in float16, no float32 copy), ``"tiny"``
        (madebyollin/taesdxl, AutoencoderTiny: a fast preview decoder) or a local diffusers VAE
        folder / hub id (AutoencoderKL or AutoencoderTiny, read from its config); None or
        ``"default"`` keeps the backbone's. ``vae_tiling`` decodes in overlapping tiles (peak
        memory independent of the image size; no effect on images smaller than one tile).
        ``cpu_offload`` keeps every model on the CPU and moves each to ``device`` (a CUDA device)
        only while it runs (diffusers' model CPU offload): slower, far less GPU memory.
        ``compile`` fuses the LoRAs and compiles the UNet and VAE decode (see :meth:`compile`).
        """
        if compile and cpu_offload:
            raise ConfigError("compile and cpu_offload cannot be combined")
        spec = get_backbone(backbone)
        if adapter is not None:
            from .adapters import get_adapter

            get_adapter(adapter)  # fail on a bad name before loading gigabytes
        device = torch.device(device) if device is not None else default_device()
        if cpu_offload and device.type != "cuda":
            raise ConfigError(f"cpu_offload needs a CUDA device (the pipeline's device is {device})")
        dtype = dtype or default_dtype(device)
        # Resolved before the backbone loads: a missing VAE costs a second, not a model load.
        vae_choice = None if vae is None or vae == VAE_DEFAULT else resolve_vae(vae)
        # Offloaded models are loaded on the CPU: the whole pipeline need never fit on the GPU.
        load_device = torch.device("cpu") if cpu_offload else device
        sdxl = load_backbone(spec.name, base_model=base_model, loras=loras, device=load_device, dtype=dtype)
        if vae_choice is not None:
            replace_vae(sdxl, load_vae(vae_choice, dtype), vae_choice.name)
            sdxl.vae.to(load_device)
        loaded = None
        if adapter is not None:
            loaded = load_adapter(sdxl, adapter, backbone=spec.name, path=adapter_path, image_encoder=image_encoder)
            sdxl.to(load_device)
            loaded.projection.to(device=device, dtype=dtype)
        pipe = cls(sdxl, spec, loaded, loras, vae=vae_choice)
        pipe.set_vae_tiling(vae_tiling)
        if cpu_offload:
            pipe.enable_model_cpu_offload(device)
        if compile:
            pipe.compile()
        return pipe

    @property
    def device(self) -> torch.device:
        """Where the models run: the UNet's device, or the accelerator of CPU offload (diffusers'
        ``_execution_device``: the offloaded weights themselves rest on the CPU)."""
        return self._placement.device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FastFacePipeline:
        """Move (and/or cast) every model of the pipeline; returns the pipeline.

        Use this rather than ``pipe.sdxl.to``: the pipeline reads its device and dtype once, here.
        """
        if self._offload_device is not None:
            raise ConfigError("the pipeline uses model CPU offload: its models move by themselves")
        target = torch.device(device) if device is not None else None
        self.sdxl.to(device=target, dtype=dtype)
        if self.adapter is not None:
            self.adapter.projection.to(device=target, dtype=dtype)
        self._upcast_vae()
        self._placement = Placement.of(self.sdxl)
        if self._compile_options is not None:  # compiled code is specialised to a device: start again
            self._compiled = self._make_compiled(**self._compile_options)
        return self

    # -- the compiled path ---------------------------------------------------------------------------

    @property
    def compiled(self) -> bool:
        """Whether the UNet and the VAE decode run compiled (see :meth:`compile`)."""
        return self._compiled is not None

    def compile(self, *, mode: str | None = ..., backend: str = "inductor", strict: bool = False,
                lora_scale: float = 1.0) -> None:
        """Compile the UNet and the VAE decode (``torch.compile``) for every later call.

        The LoRAs are fused first (at ``lora_scale`` for the adapter's, unless already fused) and
        scale-power AM switches to the fused kernel, whose numbers reach the graph as tensors: the
        adapter scale and AM scale can change between calls without recompiling. ``mode``: default
        ``"reduce-overhead"`` (CUDA graphs) on CUDA, inductor's default elsewhere; ``backend``
        "aot_eager"/"eager" compile without code generation. A compile beyond the expected set (one
        graph per batch-of-1 and one for every other batch, per resolution) warns, or raises with
        ``strict``; see :mod:`fastface.compiled` and :meth:`compile_report`.
        """
        from .compiled import default_mode

        if self._offload_device is not None:
            raise ConfigError("compile and cpu_offload cannot be combined")
        if self._fused_loras is None:
            self.fuse_loras(lora_scale)
        self.set_am_kernel("fused")
        options = {"mode": default_mode(self.device) if mode is ... else mode, "backend": backend, "strict": strict}
        self._compiled = self._make_compiled(**options)
        self._compile_options = options

    def _make_compiled(self, **options: Any) -> Any:
        from .compiled import CompiledModels

        return CompiledModels(self.sdxl.unet, self.sdxl.vae, **options)

    def compile_report(self) -> dict[str, Any] | None:
        """Backend, mode and every graph compiled so far per model (None when not compiled)."""
        return None if self._compiled is None else self._compiled.describe()

    # -- memory options ------------------------------------------------------------------------------

    @property
    def cpu_offload(self) -> bool:
        """Whether model CPU offload is on (see :meth:`enable_model_cpu_offload`)."""
        return self._offload_device is not None

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Keep the models on the CPU and move each to ``device`` (CUDA) only while it runs.

        diffusers' model CPU offload: one whole model at a time on the GPU (text encoders, image
        encoder, UNet, VAE in that order), so the GPU holds the largest model, not all of them. The
        adapter's small identity projection stays on the GPU.
        """
        target = torch.device(device) if device is not None else default_device()
        if target.type != "cuda":
            raise ConfigError(f"cpu_offload needs a CUDA device (got {target})")
        if self._compiled is not None:
            raise ConfigError("compile and cpu_offload cannot be combined")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        self.sdxl.enable_model_cpu_offload(device=target)
        if self.adapter is not None:
            self.adapter.projection.to(target)
        self._offload_device = target
        self._placement = Placement(target, self._placement.dtype)

    @property
    def vae_tiling(self) -> bool:
        """Whether the VAE decodes in tiles."""
        return bool(getattr(self.sdxl.vae, "use_tiling", False))

    def set_vae_tiling(self, enabled: bool = True) -> None:
        """Decode in overlapping tiles (constant memory for large images) or in one piece."""
        vae = self.sdxl.vae
        if enabled:
            vae.enable_tiling()
        elif hasattr(vae, "use_tiling"):
            vae.disable_tiling()

    def memory_options(self) -> dict[str, Any]:
        """The memory options in effect: VAE (name, source, class), tiling, CPU offload."""
        choice = self._vae_choice
        return {
            "vae": VAE_DEFAULT if choice is None else choice.name,
            "vae_source": None if choice is None else choice.source,
            "vae_class": type(self.sdxl.vae).__name__,
            "vae_tiling": self.vae_tiling,
            "cpu_offload": self.cpu_offload,
        }

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in."""
        return self._placement.dtype

    @property
    def lora_weights(self) -> dict[str, float]:
        """Weights of the backbone's LoRAs (distillation, styles) by PEFT adapter name."""
        return dict(self._lora_weights)

    def set_lora_weights(self, weights: Mapping[str, float]) -> None:
        """Change backbone LoRA weights (by adapter name, see :attr:`lora_weights`) for later calls."""
        unknown = set(weights) - set(self._lora_weights)
        if unknown:
            raise ConfigError(
                f"no backbone LoRA named {', '.join(sorted(unknown))}; loaded: {', '.join(self._lora_weights) or 'none'}"
            )
        if self._fused_loras is not None:
            raise ConfigError("the LoRAs are fused into the UNet at fixed weights; load an unfused pipeline to change them")
        self._lora_weights.update({k: float(v) for k, v in weights.items()})

    @property
    def am_kernel(self) -> str:
        """How scale-power AM is computed: "fused" (default), "lean", "reference" or "compiled" (see processors)."""
        return self._am_kernel_name

    def set_am_kernel(self, kind: str) -> None:
        """Choose the scale-power AM implementation (same results; "compiled" needs torch.compile's backend)."""
        self._am_kernel = make_am_kernel(kind)
        self._am_kernel_name = kind

    @property
    def fused_loras(self) -> dict[str, float] | None:
        """The LoRA weights merged into the UNet by :meth:`fuse_loras`, or None when unfused."""
        return None if self._fused_loras is None else dict(self._fused_loras)

    def fuse_loras(self, lora_scale: float = 1.0) -> dict[str, float]:
        """Merge every LoRA (distillation, styles, the adapter's own) into the UNet weights, once.

        For a pipeline whose LoRA weights stay fixed: each linear layer then costs what the base
        layer costs (no LoRA matmuls, no PEFT wrapper). All LoRAs are merged together, after all
        are loaded, at the weights a call would activate (the backbone's, ``lora_scale`` for the
        adapter's), and the LoRA layers are removed: loading another LoRA afterwards therefore
        cannot silently drop a fused one (METHOD §4), there is none left to switch. Later calls
        must use the same ``lora_scale``; :meth:`set_lora_weights` is refused. Returns the fused
        weights by adapter name.
        """
        lora_scale = self._check_number(lora_scale, "lora_scale")
        if self._fused_loras is not None:
            raise ConfigError("the LoRAs are already fused")
        weights = self._active_lora_weights(lora_scale)
        if weights:
            self._apply_loras(lora_scale)
            unet = self.sdxl.unet
            # fuse_lora merges each adapter with its current scaling (= the weights set above).
            unet.fuse_lora(lora_scale=1.0, adapter_names=list(weights))
            unet.unload_lora()
        self._fused_loras = weights
        self._applied_loras = dict(weights)
        return dict(weights)

    def unload(self) -> None:
        """Restore the UNet's previous attention processors and drop the adapter and its LoRA."""
        if self._fused_loras is not None and ID_LORA_ADAPTER in self._fused_loras:
            raise ConfigError("the adapter's LoRA is fused into the UNet and cannot be removed; reload the backbone")
        if self._previous_processors is not None:
            uninstall(self.sdxl.unet, self._previous_processors)
            self.sdxl.unload_ip_adapter()
            self._previous_processors = None
            self._ip_processors = {}
        if self.adapter is not None and ID_LORA_ADAPTER in (getattr(self.sdxl.unet, "peft_config", None) or {}):
            with warnings.catch_warnings():
                # PEFT says which adapter it activates instead; the backbone's are re-set below.
                warnings.filterwarnings("ignore", message=f"Adapter {ID_LORA_ADAPTER} was active")
                self.sdxl.unet.delete_adapters(ID_LORA_ADAPTER)
        self.adapter = None
        self._applied_loras = None
        if self._fused_loras is not None:
            # Merged weights cannot be separated again: the UNet keeps the adapter LoRA's share.
            return
        if self._lora_weights:
            self.sdxl.set_adapters(list(self._lora_weights), adapter_weights=list(self._lora_weights.values()))
            self._applied_loras = dict(self._lora_weights)

    # -- reusable encodings ----------------------------------------------------------------------

    def encode_prompt(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None
    ) -> PromptEmbeds:
        """Text conditions for ``prompt`` (one row per prompt); reusable across calls."""
        prompts = _as_list(prompt, "prompt")
        negatives: list[str | None]
        if negative_prompt is None:
            negatives = [None] * len(prompts)
        else:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        with torch.no_grad():
            cond, pooled = self._encode_text(prompts)
            if negative_prompt is None:
                # METHOD §2: the null text is all-zero token and pooled embeddings.
                null, null_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
            else:
                null, null_pooled = self._encode_text([n or "" for n in negatives])
        dtype = self.dtype
        return PromptEmbeds(
            tuple(prompts), tuple(negatives), cond.to(dtype), pooled.to(dtype), null.to(dtype), null_pooled.to(dtype)
        )

    def _encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # diffusers' encode_prompt, without asking each text encoder where it runs (a module walk).
        return encode_sdxl_text(self.sdxl, prompts, self.device)

    def encode_identity(
        self, face: Any, *, mode: str = "mean", backend: str | None = None
    ) -> IdentityTokens:
        """Identity tokens (and null tokens) for ``face``; reusable across calls.

        ``face``: an :class:`Identity`, an embedding array/tensor (D,) or (n, D), a ``.npy`` /
        ``.safetensors`` embedding file, or face photo path(s) (analysed with ``backend``, by default
        the adapter's face backend).
        """
        if self.adapter is None:
            raise ConfigError("this pipeline has no identity adapter (adapter=None)")
        identity = self._identity(face, backend or self.adapter.spec.face_backend)
        return self.adapter.encode(identity, mode=mode)

    def _identity(self, face: Any, backend: str) -> Identity:
        if isinstance(face, Identity):
            return face
        if isinstance(face, torch.Tensor):
            return Identity.from_embeddings(face.detach().float().cpu().numpy())
        if isinstance(face, np.ndarray) and face.ndim in (1, 2) and face.dtype.kind == "f":
            return Identity.from_embeddings(face)
        from . import faces

        if isinstance(face, (str, os.PathLike)) and Path(face).suffix.lower() in (".npy", ".safetensors"):
            return faces.load_embedding(face)
        if face is None:
            raise InputError("no face given: pass a photo, an embedding or an Identity")
        return faces.build_identity(face, backend=backend)

    # -- generation --------------------------------------------------------------------------------

    def resolve_method(
        self,
        method: str,
        guidance: GuidanceConfig | None = None,
        attention: AttentionManipulation | None | Any = _FROM_METHOD,
    ) -> tuple[GuidanceConfig, AttentionManipulation | None]:
        """The guidance and attention a call runs with: the preset, overridden where given."""
        preset = get_method(method)
        resolved = guidance if guidance is not None else preset.guidance
        if resolved is None:
            resolved = plain_cfg(self.backbone.cfg_scale)
        am = preset.attention if attention is _FROM_METHOD else attention
        if am is not None and not isinstance(am, AttentionManipulation):
            raise ConfigError(f"attention must be an AttentionManipulation or None, got {type(am).__name__}")
        if not isinstance(resolved, GuidanceConfig):
            raise ConfigError(f"guidance must be a GuidanceConfig or None, got {type(resolved).__name__}")
        return resolved, am

    def __call__(
        self,
        prompt: str | Sequence[str] | None,
        face: Any = None,
        *,
        method: str = DEFAULT_METHOD,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] = 0,
        steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        ip_scale: float = 0.8,
        lora_scale: float = 1.0,
        guidance: GuidanceConfig | None = None,
        attention: AttentionManipulation | None | Any = _FROM_METHOD,
        output_type: str = "pil",
        progress: bool = True,
        prompt_embeds: PromptEmbeds | None = None,
        identity_tokens: IdentityTokens | None = None,
        identity_mode: str = "mean",
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> GenerationResult:
        """Generate ``len(prompts) × num_images_per_prompt`` images of ``face``.

        Image i uses seed ``seed + i`` (or ``seed[i]``) and equals that seed generated alone.
        ``method`` names a preset (``fastface``, ``fastface-softmask``, ``dcg``, ``am``, ``none``);
        ``guidance``/``attention`` override its parts (``attention=None`` switches AM off).
        ``callback(k, latents)`` runs after each step k.
        """
        start = time.perf_counter()
        device = self.device
        cfg, am = self.resolve_method(method, guidance, attention)
        num_steps = self._check_steps(steps)
        plans = plan_steps(cfg, num_steps)
        height, width = self._check_size(height, width)
        if output_type not in _OUTPUT_TYPES:
            raise ConfigError(f"output_type must be one of {', '.join(_OUTPUT_TYPES)}; got {output_type!r}")
        ip_scale = self._check_number(ip_scale, "ip_scale")
        lora_scale = self._check_number(lora_scale, "lora_scale")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ConfigError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")

        # Identity tokens: once per call (or reused from the caller).
        synchronize(device)
        t_identity = time.perf_counter()
        tokens = self._identity_tokens(face, identity_tokens, identity_mode)
        synchronize(device)
        t_prompt = time.perf_counter()
        if prompt_embeds is None:
            if prompt is None:
                raise ConfigError("give a prompt (or prompt_embeds from encode_prompt)")
            prompt_embeds = self.encode_prompt(prompt, negative_prompt)
        elif prompt is not None and list(prompt_embeds.prompts) != _as_list(prompt, "prompt"):
            raise ConfigError("prompt and prompt_embeds disagree: pass one of them")
        synchronize(device)
        t_setup = time.perf_counter()

        num_images = len(prompt_embeds) * num_images_per_prompt
        seeds = self._seeds(seed, num_images)
        self._apply_loras(lora_scale)
        scheduler = self._fresh_scheduler()
        timesteps, timesteps_host = self._timesteps(scheduler, num_steps, device)
        # Generators on the device: the stochastic schedulers (LCM, TCD, Euler ancestral) draw
        # noise at every step, which from host generators would be a blocking copy per step.
        generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        latents = self._initial_latents(scheduler, generators, num_images, height, width)
        inputs = self._step_inputs(
            plans, prompt_embeds, num_images_per_prompt, tokens, ip_scale, am, height, width, cfg
        )
        step_kwargs = self._step_kwargs(scheduler, generators)
        timestep_cond = self._timestep_cond(num_images)
        if self._offload_device is not None:
            # Encoders used just now (or by an earlier encode_* call) go back to the CPU, so that
            # the UNet, the largest model, has the GPU to itself during the loop.
            self.sdxl.maybe_free_model_hooks()

        synchronize(device)
        t_loop = time.perf_counter()
        latents = self._denoise(
            scheduler, latents, timesteps, timesteps_host, inputs, step_kwargs, timestep_cond, cfg,
            callback, progress,
        )
        synchronize(device)
        t_decode = time.perf_counter()
        images = self._decode(latents, output_type)
        if self._offload_device is not None:
            self.sdxl.maybe_free_model_hooks()  # the VAE (or UNet) leaves the GPU, as in diffusers
        synchronize(device)
        end = time.perf_counter()

        timings = {
            "identity": (t_prompt - t_identity) * 1000,
            "prompt": (t_setup - t_prompt) * 1000,
            "setup": (t_loop - t_setup) * 1000,
            "denoise": (t_decode - t_loop) * 1000,
            "decode": (end - t_decode) * 1000,
            "total": (end - start) * 1000,
        }
        metadata = self._metadata(
            prompt_embeds, num_images_per_prompt, seeds, method, cfg, am, plans, tokens, height, width,
            ip_scale, lora_scale, timings,
        )
        return GenerationResult(images=images, latents=latents, metadata=metadata)

    # -- argument checks ---------------------------------------------------------------------------

    def _check_steps(self, steps: int | None) -> int:
        if steps is None:
            return self.backbone.steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        return steps

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        height = height or self.backbone.resolution
        width = width or self.backbone.resolution
        unet = self.sdxl.unet
        multiple = self.sdxl.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
                raise ConfigError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
        return height, width

    @staticmethod
    def _check_number(value: float, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return float(value)

    @staticmethod
    def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            return [int(seed) + i for i in range(count)]
        if isinstance(seed, Sequence) and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seed):
            if len(seed) != count:
                raise ConfigError(f"{len(seed)} seeds given for {count} images")
            return [int(s) for s in seed]
        raise ConfigError(f"seed must be an integer or a list of integers, got {seed!r}")

    def _identity_tokens(self, face: Any, given: IdentityTokens | None, mode: str) -> IdentityTokens | None:
        if self.adapter is None:
            if face is not None or given is not None:
                raise ConfigError("this pipeline has no identity adapter (adapter=None): pass no face")
            return None
        if given is None and isinstance(face, IdentityTokens):
            given = face
        if given is not None:
            if given.info.get("adapter") != self.adapter.spec.name:
                raise ConfigError(
                    f"identity tokens were computed for adapter {given.info.get('adapter')!r}, "
                    f"this pipeline uses {self.adapter.spec.name!r}"
                )
            return given
        if face is None:
            raise InputError(f"the {self.adapter.spec.name} adapter needs a face: a photo, an embedding or an Identity")
        return self.encode_identity(face, mode=mode)

    # -- set-up before the loop --------------------------------------------------------------------

    def _active_lora_weights(self, lora_scale: float) -> dict[str, float]:
        weights = dict(self._lora_weights)
        if self.adapter is not None and ID_LORA_ADAPTER in (getattr(self.sdxl.unet, "peft_config", None) or {}):
            weights[ID_LORA_ADAPTER] = lora_scale
        return weights

    def _apply_loras(self, lora_scale: float) -> None:
        """Activate every LoRA at its weight (distillation, styles, the adapter's own)."""
        if self._fused_loras is not None:
            fused_scale = self._fused_loras.get(ID_LORA_ADAPTER)
            if fused_scale is not None and fused_scale != lora_scale:
                raise ConfigError(
                    f"the adapter LoRA is fused at lora_scale={fused_scale:g}; this call asks for {lora_scale:g}"
                )
            return
        weights = self._active_lora_weights(lora_scale)
        if weights and weights != self._applied_loras:
            self.sdxl.set_adapters(list(weights), adapter_weights=list(weights.values()))
            self._applied_loras = weights

    def _fresh_scheduler(self) -> Any:
        # A copy per call: a scheduler keeps its step index and timesteps, which must not leak
        # from one call (perhaps interrupted) into the next, or between pipelines.
        base = self.sdxl.scheduler
        return type(base).from_config(base.config)

    def _timesteps(self, scheduler: Any, num_steps: int, device: torch.device) -> tuple[torch.Tensor, list[Any]]:
        """Timesteps on the device (for the UNet) and on the host (for the scheduler).

        The scheduler's own tables stay on the host: LCM, TCD and DDIM index and compare them with
        the timestep, which with device tensors would synchronise at every step.
        """
        custom = self.backbone.timesteps
        if custom is not None and len(custom) == num_steps:
            scheduler.set_timesteps(device="cpu", timesteps=list(custom))
        else:
            scheduler.set_timesteps(num_steps, device="cpu")
        if getattr(scheduler, "order", 1) != 1 or len(scheduler.timesteps) != num_steps:
            raise ConfigError(f"scheduler {type(scheduler).__name__} is not a one-evaluation-per-step scheduler")
        if hasattr(scheduler, "set_begin_index"):
            # Without a begin index some schedulers look their index up from the timestep value.
            scheduler.set_begin_index(0)
        host = scheduler.timesteps
        return host.to(device), list(host)

    def _initial_latents(
        self, scheduler: Any, generators: list[torch.Generator], count: int, height: int, width: int
    ) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        factor = self.sdxl.vae_scale_factor
        shape = (count, self.sdxl.unet.config.in_channels, height // factor, width // factor)
        # One generator per image: image i depends on its own seed only.
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)
        return noise * scheduler.init_noise_sigma

    def _step_kwargs(self, scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
        import inspect

        accepted = set(inspect.signature(scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "generator" in accepted:
            kwargs["generator"] = generators
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        kwargs.update({k: v for k, v in self.backbone.step_kwargs.items() if k in accepted})
        return kwargs

    def _timestep_cond(self, count: int) -> torch.Tensor | None:
        # UNets distilled with a guidance embedding (LCM-distilled UNets) take w - 1 as input.
        dim = self.sdxl.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.full((count,), self.backbone.cfg_scale - 1.0)
        return self.sdxl.get_guidance_scale_embedding(w, embedding_dim=dim).to(self.device, self.dtype)

    def _step_inputs(
        self,
        plans: list[StepPlan],
        embeds: PromptEmbeds,
        per_prompt: int,
        tokens: IdentityTokens | None,
        ip_scale: float,
        am: AttentionManipulation | None,
        height: int,
        width: int,
        cfg: GuidanceConfig,
    ) -> list[_StepInputs]:
        """UNet inputs of every step: branch-major stacks of (text, identity) conditions."""
        device, dtype = self.device, self.dtype
        # Per image: the prompt row it comes from.
        rows = torch.arange(len(embeds), device=device).repeat_interleave(per_prompt)
        text = {True: embeds.cond.to(device)[rows], False: embeds.null.to(device)[rows]}
        pooled = {True: embeds.pooled.to(device)[rows], False: embeds.null_pooled.to(device)[rows]}
        count = int(rows.shape[0])
        ident = None
        if tokens is not None:
            ident = {
                True: tokens.cond.to(device, dtype).expand(count, -1, -1),
                False: tokens.null.to(device, dtype).expand(count, -1, -1),
            }
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        cache: dict[tuple, tuple] = {}
        contexts = None
        if ident is not None:
            contexts = CallContexts(
                self._ip_processors, ip_scale, am, kernel=self._am_kernel_name, am_kernel=self._am_kernel,
                device=device, project=self._offload_device is None,
            )
        result = []
        for plan in plans:
            # Without an adapter the identity condition does not exist: "id" is "null", "full" is
            # "text"; such duplicates are evaluated once.
            conditions = []
            for branch in plan.branches:
                with_text, with_id = _BRANCH_CONDITIONS[branch]
                key = (with_text, with_id and ident is not None)
                if key not in conditions:
                    conditions.append(key)
            branch_rows = {}
            for branch in plan.branches:
                with_text, with_id = _BRANCH_CONDITIONS[branch]
                branch_rows[branch] = conditions.index((with_text, with_id and ident is not None))
            signature = tuple(conditions)
            if signature not in cache:
                n = len(conditions)
                states = torch.cat([text[t] for t, _ in conditions])
                added = {
                    "text_embeds": torch.cat([pooled[t] for t, _ in conditions]),
                    "time_ids": time_ids.expand(n * count, -1),
                }
                id_tokens = torch.cat([ident[i] for _, i in conditions]) if ident is not None else None
                cache[signature] = (states, added, id_tokens)
            states, added, id_tokens = cache[signature]
            kwargs = None
            if id_tokens is not None and contexts is not None:
                kwargs = {CONTEXT_KEY: contexts.context(id_tokens, plan.step)}
            result.append(_StepInputs(plan, branch_rows, len(conditions), states, added, kwargs))
        return result

    # -- the loop ------------------------------------------------------------------------------------

    def _denoise(
        self,
        scheduler: Any,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        timesteps_host: list[Any],
        inputs: list[_StepInputs],
        step_kwargs: dict[str, Any],
        timestep_cond: torch.Tensor | None,
        cfg: GuidanceConfig,
        callback: Callable[[int, torch.Tensor], None] | None,
        progress: bool,
    ) -> torch.Tensor:
        unet = self.sdxl.unet if self._compiled is None else self._compiled.unet
        bar = tqdm(total=len(inputs), desc=f"fastface {self.backbone.name}", disable=not progress, leave=False)
        try:
            with torch.no_grad():
                for k, step in enumerate(inputs):
                    t = timesteps[k]
                    model_input = scheduler.scale_model_input(latents, timesteps_host[k])
                    if step.num_chunks > 1:
                        model_input = model_input.repeat(step.num_chunks, 1, 1, 1)
                    cond = None if timestep_cond is None else timestep_cond.repeat(step.num_chunks, 1)
                    out = unet(
                        model_input,
                        t,
                        encoder_hidden_states=step.encoder_hidden_states,
                        timestep_cond=cond,
                        cross_attention_kwargs=step.cross_attention_kwargs,
                        added_cond_kwargs=step.added_cond_kwargs,
                        return_dict=False,
                    )[0]
                    chunks = out.chunk(step.num_chunks)
                    preds = {branch: chunks[row] for branch, row in step.rows.items()}
                    noise = combine_branches(preds, step.plan, cfg.decomposition)
                    latents = scheduler.step(noise, timesteps_host[k], latents, **step_kwargs, return_dict=False)[0]
                    if callback is not None:
                        callback(k, latents)
                    bar.update()
        finally:
            bar.close()
        return latents

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Any]:
        """Decode final latents (n, 4, h/8, w/8) with the pipeline's VAE to PIL images or arrays ("np")."""
        if output_type not in ("pil", "np"):
            raise ConfigError(f"output_type must be 'pil' or 'np' to decode; got {output_type!r}")
        return self._decode(latents.to(self.device), output_type)

    def _decode(self, latents: torch.Tensor, output_type: str) -> list[Any]:
        if output_type == "latent":
            return []
        vae = self.sdxl.vae
        with torch.no_grad():
            # As diffusers' SDXL pipeline: the KL VAEs undo their scaling (and per-channel
            # statistics where the config has them); AutoencoderTiny has neither statistics nor
            # upcast, its scaling_factor is 1 and its decoder outputs [-1, 1] like the KL decoder.
            z = latents.to(module_dtype(vae))
            mean = getattr(vae.config, "latents_mean", None)
            std = getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
                std_t = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
                z = z * std_t / vae.config.scaling_factor + mean_t
            else:
                z = z / vae.config.scaling_factor
            if self._compiled is not None and self._compiled.vae is vae:
                image = self._compiled.decode(z)
            else:  # eager, or a VAE put in after compile()
                image = vae.decode(z, return_dict=False)[0]
        watermark = getattr(self.sdxl, "watermark", None)
        if watermark is not None:
            image = watermark.apply_watermark(image)
        return list(self.sdxl.image_processor.postprocess(image, output_type=output_type))

    # -- metadata --------------------------------------------------------------------------------

    def _licences(self, tokens: IdentityTokens | None) -> dict[str, Any]:
        licence: dict[str, Any] = {"backbone": list(self.backbone.licence)}
        if self.adapter is not None:
            licence["adapter"] = list(self.adapter.spec.licence)
        if self._vae_choice is not None:
            licence["vae"] = self._vae_choice.licence
        if tokens is not None:
            backend = str(tokens.info.get("backend"))
            licence["face_model"] = _face_licence(backend) or f"see the '{backend}' face backend's licence"
        return licence

    def _version_info(self) -> dict[str, str]:
        # importlib.metadata scans the installed distributions: once per pipeline, not per call.
        if self._version_cache is None:
            self._version_cache = _versions()
        return dict(self._version_cache)

    def _metadata(
        self,
        embeds: PromptEmbeds,
        per_prompt: int,
        seeds: list[int],
        method: str,
        cfg: GuidanceConfig,
        am: AttentionManipulation | None,
        plans: list[StepPlan],
        tokens: IdentityTokens | None,
        height: int,
        width: int,
        ip_scale: float,
        lora_scale: float,
        timings: dict[str, float],
    ) -> list[dict[str, Any]]:
        has_identity = tokens is not None
        evaluations = sum(
            len({(_BRANCH_CONDITIONS[b][0], _BRANCH_CONDITIONS[b][1] and has_identity) for b in plan.branches})
            for plan in plans
        )
        shared = {
            "backbone": self.backbone.name,
            "backbone_config": self.backbone.to_dict(),
            "adapter": None if self.adapter is None else self.adapter.spec.name,
            "adapter_config": None if self.adapter is None else self.adapter.describe(),
            "method": method,
            "guidance": cfg.to_dict(),
            "attention": None if am is None else am.to_dict(),
            "schedule": [
                {"step": p.step, "alpha": p.alpha, "beta": p.beta, "rescale": p.rescale, "branches": list(p.branches)}
                for p in plans
            ],
            "steps": len(plans),
            "height": height,
            "width": width,
            "ip_scale": ip_scale if has_identity else None,
            "lora_scale": lora_scale if has_identity else None,
            "lora_weights": dict(self._lora_weights),
            "loras_fused": self._fused_loras is not None,
            "identity": None if tokens is None else dict(tokens.info),
            "unet_evaluations": evaluations,
            "timings_ms": {k: round(v, 3) for k, v in timings.items()},
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "memory": self.memory_options(),
            "compiled": self.compile_report(),
            "versions": self._version_info(),
            "licence": self._licences(tokens),
        }
        result = []
        for index, seed in enumerate(seeds):
            row = index // per_prompt
            result.append(
                {
                    "prompt": embeds.prompts[row],
                    "negative_prompt": embeds.negative_prompts[row],
                    "seed": seed,
                    "index": index,
                    **copy.deepcopy(shared),
                }
            )
        return result


__all__ = ["BRANCHES", "FastFacePipeline", "GenerationResult", "IdentityTokens", "PromptEmbeds", "replace_vae"]
