"""FastFacePipeline: identity-preserving generation on (distilled) SDXL backbones.

The engine owns a diffusers ``StableDiffusionXLPipeline`` (``.sdxl``) and runs its own denoising
loop, the SDXL loop of diffusers with one change: at step k it evaluates only the branches that
``guidance.plan_steps(...)[k]`` needs (null / text / id / full), all of them and all images as ONE
batched UNet call, then combines them per image with ``guidance.combine`` (METHOD §2).

The identity adapter is an :class:`~fastface.adapters.IdentityAdapter` (``fastface/adapters/``);
the engine only orchestrates: ``__call__`` runs numbered stages (check, encode identity, encode
prompt, set up sampling, denoise, decode, describe), the UNet inputs of every step come from
``steps.assemble_step_inputs``, the loop from ``sampling``, LoRA bookkeeping from ``lora`` and the
metadata from ``metadata``.

Per-call data (identity tokens per sample, adapter scale, step index, attention manipulation)
travel to the attention processors in ``cross_attention_kwargs``; nothing is stored on a module
between calls, the scheduler is a fresh copy per call, and everything the loop needs is built
before it starts, so the loop makes no host-device synchronisation. Calls on one pipeline are
serialised by a per-pipeline lock (two threads may share a pipeline; they take turns).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metadata as meta
from . import sampling
from .adapters import IdentityAdapter, IdentityConditioning, IdentityTokens
from .attention import AttentionManipulation
from .backbones import (
    BackboneSpec,
    VaeChoice,
    backbone_lora_weights,
)
from .compiled import CompileMixin
from .config import (
    DEFAULT_LIMITS,
    FROM_METHOD,
    GenerationConfig,
    Limits,
    check_num_images,
    check_number,
    check_prompts,
    check_seeds,
    check_size,
    check_steps,
    check_text,
)
from .errors import ConfigError, InputError
from .faces.types import Identity
from .guidance import BRANCHES, GuidanceConfig, StepPlan, plan_steps
from .loading import LoadingMixin, replace_vae
from .lora import LoraMixin, LoraState
from .memory import MemoryOptionsMixin
from .placement import Placement, PlacementMixin
from .presets import DEFAULT_IP_SCALE, DEFAULT_LORA_SCALE, DEFAULT_METHOD, get_method, plain_cfg
from .processors import CallContexts, installed, make_am_kernel
from .steps import StepInputs, assemble_step_inputs, image_rows, sdxl_time_ids
from .timing import StageClock

_OUTPUT_TYPES = ("pil", "latent", "np")
_FROM_METHOD = FROM_METHOD  # sentinel: "take the attention manipulation of the method preset"


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


class FastFacePipeline(LoadingMixin, PlacementMixin, CompileMixin, MemoryOptionsMixin, LoraMixin):
    """Identity-preserving text-to-image on an SDXL backbone with an identity adapter (or none)."""

    def __init__(
        self,
        sdxl: Any,
        backbone: BackboneSpec,
        adapter: IdentityAdapter | None = None,
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
        self._loras = LoraState(sdxl, backbone_lora_weights(backbone, loras))
        # Fused: exact (1e-5), float-free for the compiled path, and on the CPU (bf16, SDXL shapes,
        # benchmarks/am_kernels.py) 2.0-2.4x faster than the lean kernel; see benchmarks/RESULTS.md.
        self._am_kernel_name = "fused"
        self._am_kernel = make_am_kernel(self._am_kernel_name)
        self._previous_processors = adapter.install(sdxl.unet) if adapter is not None else None
        # FastFace IP-Adapter layers by name, read once (unet.attn_processors walks the UNet); empty
        # for adapters with their own processors (PuLID), which then get no CallContexts.
        self._ip_processors = installed(sdxl.unet) if adapter is not None else {}
        # One call at a time per pipeline: a call sets LoRA weights and offload hooks on shared
        # modules, so overlapping calls would mix their states. Re-entrant for fuse_loras.
        self._lock = threading.RLock()
        self._upcast_vae()
        # Device and dtype, read once here (and by .to / enable_model_cpu_offload): diffusers'
        # unet.device / unet.dtype walk every module of the UNet each time they are asked.
        self._placement = Placement.of(sdxl)
        self._compiled = None  # the compiled UNet / VAE decode (see compile()); None: eager
        self._compile_options: dict[str, Any] | None = None


    @property
    def am_kernel(self) -> str:
        """How scale-power AM is computed: "fused" (default), "lean", "reference" or "compiled" (see processors)."""
        return self._am_kernel_name

    def set_am_kernel(self, kind: str) -> None:
        """Choose the scale-power AM implementation (same results; "compiled" needs torch.compile's backend)."""
        self._am_kernel = make_am_kernel(kind)
        self._am_kernel_name = kind

    def unload(self) -> None:
        """Restore the UNet's previous attention processors and drop the adapter and its LoRA."""
        with self._lock:
            self._loras.check_removable(self._adapter_lora)
            if self._previous_processors is not None and self.adapter is not None:
                self.adapter.uninstall(self.sdxl, self._previous_processors)
                self._previous_processors = None
            self._loras.drop_adapter_lora(self._adapter_lora)
            self.adapter = None

    # -- reusable encodings ----------------------------------------------------------------------

    def encode_prompt(
        self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None
    ) -> PromptEmbeds:
        """Text conditions for ``prompt`` (one row per prompt); reusable across calls."""
        prompts = check_prompts(prompt, "prompt")
        negatives: list[str | None]
        if negative_prompt is None:
            negatives = [None] * len(prompts)
        else:
            negatives = list(check_prompts(negative_prompt, "negative_prompt"))
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ConfigError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        cond, pooled, null, null_pooled = sampling.encode_text(
            self.sdxl, prompts, None if negative_prompt is None else negatives, self.device
        )
        dtype = self.dtype
        return PromptEmbeds(
            tuple(prompts), tuple(negatives), cond.to(dtype), pooled.to(dtype), null.to(dtype), null_pooled.to(dtype)
        )

    def encode_identity(
        self, face: Any, *, mode: str = "mean", backend: str | None = None, **options: Any
    ) -> IdentityConditioning:
        """Identity conditioning (tokens for I and ∅, adapter extras) for ``face``; reusable across calls.

        ``face``: an :class:`Identity`, an embedding array/tensor (D,) or (n, D), a ``.npy`` /
        ``.safetensors`` embedding file, or face photo path(s) (analysed with ``backend``, by default
        the adapter's face backend). ``options``: the adapter's own options (e.g. a pose photo).
        """
        if self.adapter is None:
            raise ConfigError("this pipeline has no identity adapter (adapter=None)")
        identity = as_identity(face, backend or self.adapter.spec.face_backend or "dlib")
        return self.adapter.encode(identity, mode=mode, **options)

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

    @classmethod
    def from_config(cls, config: GenerationConfig) -> FastFacePipeline:
        """Load the pipeline a :class:`~fastface.config.GenerationConfig` describes (validated first)."""
        config.validate()
        pipe = cls.from_pretrained(**config.pipeline_kwargs())
        # Offloaded weights move between devices, so they stay unfused there.
        if config.fuse_loras and not config.cpu_offload:
            pipe.fuse_loras(config.lora_scale)
        if config.compile:  # after fusing: the graphs hold the fused weights
            pipe.compile(lora_scale=config.lora_scale)
        return pipe

    def generate(self, config: GenerationConfig, face: Any = None, **overrides: Any) -> GenerationResult:
        """One call with the prompts and options of ``config`` (``overrides``: e.g. progress, callback)."""
        if not config.prompts and "prompt_embeds" not in overrides:
            raise ConfigError("the configuration has no prompt")
        kwargs = config.call_kwargs(self.backbone.cfg_scale) | overrides
        return self(list(config.prompts) or None, face, **kwargs)

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
        ip_scale: float = DEFAULT_IP_SCALE,
        lora_scale: float = DEFAULT_LORA_SCALE,
        guidance: GuidanceConfig | None = None,
        attention: AttentionManipulation | None | Any = _FROM_METHOD,
        output_type: str = "pil",
        progress: bool = True,
        prompt_embeds: PromptEmbeds | None = None,
        identity_tokens: IdentityConditioning | None = None,
        identity_mode: str = "mean",
        callback: Callable[[int, torch.Tensor], None] | None = None,
        limits: Limits = DEFAULT_LIMITS,
        adapter_options: Mapping[str, Any] | None = None,
    ) -> GenerationResult:
        """Generate ``len(prompts) × num_images_per_prompt`` images of ``face``.

        Image i uses seed ``seed + i`` (or ``seed[i]``) and equals that seed generated alone.
        ``method`` names a preset (``fastface``, ``fastface-softmask``, ``dcg``, ``am``, ``none``);
        ``guidance``/``attention`` override its parts (``attention=None`` switches AM off).
        ``callback(k, latents)`` runs after each step k. ``adapter_options`` go to the adapter's
        ``encode`` (e.g. InstantID's pose photo). Values are checked as
        :meth:`GenerationConfig.validate` checks them (``limits``: the upper bounds). Calls on one
        pipeline from several threads run one after the other.
        """
        with self._lock:
            clock = StageClock(self.device)
            # 1. check the request (no model runs before every value is known to be usable)
            request = _check_request(
                self, prompt, method, guidance, attention, steps, height, width, output_type, ip_scale,
                lora_scale, num_images_per_prompt, negative_prompt, limits,
            )
            num_prompts = len(prompt_embeds) if prompt_embeds is not None else len(check_prompts(prompt or "", "prompt"))
            num_images = check_num_images(num_images_per_prompt, num_prompts, limits) * num_prompts
            seeds = check_seeds(seed, num_images)
            clock.mark("identity")
            # 2. identity conditioning: once per call (or reused from the caller)
            conditioning = self._identity_conditioning(face, identity_tokens, identity_mode, adapter_options or {})
            if conditioning is not None:
                # size-dependent extras (InstantID's keypoint image at the output size), once per call
                conditioning = self.adapter.prepare_call(conditioning, height=request.height, width=request.width)
            clock.mark("prompt")
            # 3. text conditions
            embeds = self._prompt_embeds(prompt, negative_prompt, prompt_embeds)
            clock.mark("setup")
            # 4. sampling set-up: LoRAs, scheduler, noise, every step's UNet inputs
            run = _set_up(self, request, embeds, num_images_per_prompt, conditioning, seeds, clock)
            clock.mark("loop")
            # 5. denoising loop
            latents = sampling.denoise(
                self.sdxl.unet if self._compiled is None else self._compiled.unet, run.scheduler, run.latents, run.timesteps, run.timesteps_host, run.inputs,
                run.attention_kwargs, request.guidance.decomposition, kwargs_for_step=run.step_kwargs,
                cond=run.timestep_cond, adapter=self.adapter, conditioning=conditioning, callback=callback,
                progress=progress, desc=f"fastface {self.backbone.name}",
            )
            clock.mark("decode")
            # 6. decode
            images = sampling.decode(self.sdxl, latents, output_type, self._decoder())
            if self._offload_device is not None:
                self.sdxl.maybe_free_model_hooks()  # the VAE (or UNet) leaves the GPU, as in diffusers
            clock.mark("end")
            # 7. describe
            timings = clock.durations_ms({
                "identity": ("identity", "prompt"), "prompt": ("prompt", "setup"), "setup": ("setup", "loop"),
                "identity_kv": ("identity_kv", "identity_kv_end"),  # device work inside "setup"
                "denoise": ("loop", "decode"),
                "decode": ("decode", "end"), "total": ("start", "end"),
            })
            metadata = meta.call_metadata(self, request, embeds, num_images_per_prompt, seeds, conditioning, timings)
            return GenerationResult(images=images, latents=latents, metadata=metadata)

    def decode(self, latents: torch.Tensor, output_type: str = "pil") -> list[Any]:
        """Decode final latents (n, 4, h/8, w/8) with the pipeline's VAE to PIL images or arrays ("np")."""
        if output_type not in ("pil", "np"):
            raise ConfigError(f"output_type must be 'pil' or 'np' to decode; got {output_type!r}")
        return sampling.decode(self.sdxl, latents.to(self.device), output_type, self._decoder())

    def _decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        # The compiled decode, unless the VAE was replaced after compile()
        compiled = self._compiled
        return compiled.decode if compiled is not None and compiled.vae is self.sdxl.vae else None

    # -- stages ------------------------------------------------------------------------------------

    def size_multiple(self) -> int:
        """What height and width must be a multiple of: the VAE scale × the UNet's downsampling."""
        unet = self.sdxl.unet
        return self.sdxl.vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)

    def _identity_conditioning(
        self, face: Any, given: IdentityConditioning | None, mode: str, options: Mapping[str, Any]
    ) -> IdentityConditioning | None:
        if self.adapter is None:
            if face is not None or given is not None:
                raise ConfigError("this pipeline has no identity adapter (adapter=None): pass no face")
            return None
        if given is None and isinstance(face, IdentityConditioning):
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
        return self.encode_identity(face, mode=mode, **options)

    def _prompt_embeds(self, prompt: Any, negative_prompt: Any, given: PromptEmbeds | None) -> PromptEmbeds:
        if given is None:
            if prompt is None:
                raise ConfigError("give a prompt (or prompt_embeds from encode_prompt)")
            return self.encode_prompt(prompt, negative_prompt)
        if prompt is not None and list(given.prompts) != check_prompts(prompt, "prompt"):
            raise ConfigError("prompt and prompt_embeds disagree: pass one of them")
        return given

@dataclass(frozen=True)
class _Request:
    """A call's checked options: method, guidance, AM, step plans, size, scales."""

    method: str
    guidance: GuidanceConfig
    attention: AttentionManipulation | None
    plans: list[StepPlan]
    height: int
    width: int
    ip_scale: float
    lora_scale: float


@dataclass(frozen=True)
class _Run:
    """Everything the loop needs, built before it starts."""

    scheduler: Any
    latents: torch.Tensor
    timesteps: torch.Tensor
    timesteps_host: list[Any]
    inputs: list[StepInputs]
    attention_kwargs: list[dict[str, Any] | None]
    step_kwargs: dict[str, Any]
    timestep_cond: torch.Tensor | None


def _check_request(
    pipe: FastFacePipeline, prompt: Any, method: str, guidance: GuidanceConfig | None, attention: Any, steps: int | None,
    height: int | None, width: int | None, output_type: str, ip_scale: float, lora_scale: float,
    num_images_per_prompt: int, negative_prompt: Any, limits: Limits,
) -> _Request:
    if not isinstance(limits, Limits):
        raise ConfigError(f"limits must be a Limits, got {type(limits).__name__}")
    cfg, am = pipe.resolve_method(method, guidance, attention)
    num_steps = check_steps(pipe.backbone.steps if steps is None else steps, limits)
    plans = plan_steps(cfg, num_steps)
    multiple = pipe.size_multiple()
    height = check_size("height", pipe.backbone.resolution if height is None else height, multiple, limits)
    width = check_size("width", pipe.backbone.resolution if width is None else width, multiple, limits)
    if output_type not in _OUTPUT_TYPES:
        raise ConfigError(f"output_type must be one of {', '.join(_OUTPUT_TYPES)}; got {output_type!r}")
    ip_scale = check_number(ip_scale, "ip_scale", minimum=0.0)
    lora_scale = check_number(lora_scale, "lora_scale")
    check_num_images(num_images_per_prompt, 1, limits)
    if prompt is not None:
        check_prompts(prompt, "prompt")
    if isinstance(negative_prompt, str):
        check_text(negative_prompt, "negative_prompt")
    return _Request(method, cfg, am, plans, height, width, ip_scale, lora_scale)


def _set_up(
    pipe: FastFacePipeline, request: _Request, embeds: PromptEmbeds, per_prompt: int,
    conditioning: IdentityConditioning | None, seeds: list[int], clock: StageClock,
) -> _Run:
    device, dtype = pipe.device, pipe.dtype
    pipe._loras.apply(pipe._adapter_lora, request.lora_scale)
    scheduler = sampling.fresh_scheduler(pipe.sdxl)
    timesteps, timesteps_host = sampling.set_timesteps(scheduler, pipe.backbone, len(request.plans), device)
    # Generators on the device: the stochastic schedulers (LCM, TCD, Euler ancestral) draw
    # noise at every step, which from host generators would be a blocking copy per step.
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    latents = sampling.initial_latents(
        pipe.sdxl, scheduler, generators, len(seeds), request.height, request.width, device, dtype
    )
    rows = image_rows(len(embeds), per_prompt, device)
    inputs = assemble_step_inputs(
        request.plans,
        text=embeds.cond.to(device)[rows],
        null_text=embeds.null.to(device)[rows],
        pooled=embeds.pooled.to(device)[rows],
        null_pooled=embeds.null_pooled.to(device)[rows],
        time_ids=sdxl_time_ids(request.height, request.width, device=device, dtype=dtype),
        identity=None if conditioning is None else conditioning.cond.to(device, dtype),
        null_identity=None if conditioning is None else conditioning.null.to(device, dtype),
    )
    contexts = None
    clock.mark("identity_kv")
    if pipe._ip_processors and conditioning is not None:
        # What is fixed for the whole call (identity K/V per token stack, tensor scales, fused parts),
        # built once; under CPU offload the K/V weights reach the GPU only inside the UNet's forward.
        contexts = CallContexts(
            pipe._ip_processors, request.ip_scale, request.attention, kernel=pipe._am_kernel_name,
            am_kernel=pipe._am_kernel, device=device, project=pipe._offload_device is None,
            tokens_per_photo=pipe.adapter.tokens_per_photo,
        )
        contexts.project_stacks([step.identity_tokens for step in inputs if step.identity_tokens is not None])
    clock.mark("identity_kv_end")
    attention_kwargs = [_attention_kwargs(pipe, step, request, conditioning, contexts) for step in inputs]
    run = _Run(
        scheduler, latents, timesteps, timesteps_host, inputs, attention_kwargs,
        sampling.step_kwargs(scheduler, pipe.backbone, generators),
        sampling.timestep_cond(pipe.sdxl, pipe.backbone, len(seeds), device, dtype),
    )
    if pipe._offload_device is not None:
        # Encoders used just now (or by an earlier encode_* call) go back to the CPU, so that
        # the UNet, the largest model, has the GPU to itself during the loop.
        pipe.sdxl.maybe_free_model_hooks()
    return run

def _attention_kwargs(
    pipe: FastFacePipeline, step: StepInputs, request: _Request, conditioning: IdentityConditioning | None,
    contexts: CallContexts | None,
) -> dict[str, Any] | None:
    if pipe.adapter is None or step.identity_tokens is None:
        return None
    return pipe.adapter.attention_kwargs(
        step.identity_tokens, scale=request.ip_scale, step=step.plan.step, attention=request.attention,
        am_kernel=pipe._am_kernel, conditioning=conditioning, contexts=contexts,
    )


def as_identity(face: Any, backend: str) -> Identity:
    """An :class:`Identity` from what a caller may pass as ``face`` (checked: one clear error otherwise)."""
    if isinstance(face, Identity):
        return face
    if isinstance(face, torch.Tensor):
        return Identity.from_embeddings(face.detach().float().cpu().numpy())
    if isinstance(face, np.ndarray) and face.ndim in (1, 2):
        return Identity.from_embeddings(face)
    from . import faces

    if isinstance(face, (str, os.PathLike)) and Path(face).suffix.lower() in (".npy", ".safetensors"):
        return faces.load_embedding(face)
    if face is None:
        raise InputError("no face given: pass a photo, an embedding or an Identity")
    photo = (str, os.PathLike, bytes, np.ndarray)
    if isinstance(face, photo) or hasattr(face, "convert") or (
        isinstance(face, (list, tuple)) and face and all(isinstance(f, photo) or hasattr(f, "convert") for f in face)
    ):
        return faces.build_identity(face, backend=backend)
    raise InputError(
        f"face must be an Identity, an embedding array or tensor, an embedding file or face photo path(s); "
        f"got {type(face).__name__}"
    )


__all__ = [
    "BRANCHES",
    "FastFacePipeline",
    "GenerationResult",
    "IdentityConditioning",
    "IdentityTokens",
    "PromptEmbeds",
    "as_identity",
    "replace_vae",
]
