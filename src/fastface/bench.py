"""``fastface bench``: end-to-end speed of the FastFace variants (``benchmarks/speed.py`` calls this).

For one backbone, adapter, resolution and step count it times, per variant, the four stages of a
generation (identity tokens, prompt encoding, denoising, VAE decode), warm-up excluded, as the
median over repeats, device-synchronised on GPU. Variants:

- ``none``, ``dcg``, ``am``, ``fastface``, ``fastface-softmask``: the method presets;
- ``fastface-guided``: ``fastface`` with ``rescale_on="guided"`` (METHOD §2: 8 instead of 10
  evaluations at 4 steps);
- ``naive``: what the published research code does: all three branches at every step, the
  identity projection re-run inside every UNet call, the adapter LoRA unfused;
- ``fastface-unfused``: ``fastface`` before the LoRAs are fused (the fusion's before/after);
- ``naive-fused``: ``naive`` after the LoRAs are fused (what fusion alone gains);
- ``naive-planned``: ``naive-fused`` evaluating only the branches of the step plan (what branch
  planning alone gains; ``fastface`` then adds the engine's loop: identity tokens and K/V once
  per call, one batched call, host timesteps, no syncs);
- ``sdxl``: the multi-step baseline, 30 steps of stock CFG 5 with the same adapter.

Variants are run round-robin (repeat r of every variant before repeat r + 1) so that a machine
that slows down or speeds up over time biases none of them. The variants that need unfused LoRAs
run first; then the LoRAs are fused (``--no-fuse`` keeps them unfused) and the others run.

The ``fullsize`` backbone is SDXL's real architecture with random weights
(:mod:`fastface.flops`/:mod:`fastface.fullsize`): its numbers are valid for timing only, and the
report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import write_text_atomic
from .errors import ConfigError
from .timing import synchronize

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .pipeline import FastFacePipeline

VARIANTS = (
    "none",
    "dcg",
    "am",
    "fastface",
    "fastface-guided",
    "fastface-softmask",
    "naive",
    "fastface-unfused",
    "naive-fused",
    "naive-planned",
    "sdxl",
)
DEFAULT_VARIANTS = (
    "none", "dcg", "am", "fastface", "fastface-guided", "fastface-softmask", "naive", "fastface-unfused",
    "naive-fused", "naive-planned", "sdxl",
)
# Variants measured while the LoRAs are still unfused.
UNFUSED_VARIANTS = ("naive", "fastface-unfused")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FULLSIZE = "fullsize"
PROMPT = "a portrait photo of a person, studio lighting, detailed face"
STAGES = ("identity", "prompt", "setup", "denoise", "decode", "total")
# Host-only stages of an engine call (the encoders reused): what --host-stages reports.
HOST_STAGES = ("identity", "prompt", "setup", "finish")  # "setup" without the identity K/V projections
SPEED_OPTIONS = ("channels-last", "compile", "graphs", "fp8")
# Variants never re-timed with speed options (they run the published loop, or need unfused LoRAs).
NOT_REPEATED_WITH_OPTIONS = ("naive", "fastface-unfused", "naive-fused", "naive-planned")


@dataclass(frozen=True)
class BenchOptions:
    """Everything one benchmark run depends on."""

    backbone: str = "tiny"
    adapter: str = "faceid"
    resolution: int | None = None
    steps: int | None = None
    repeats: int = 3
    warmup: int = 1
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    images: int = 1
    baseline_steps: int = 30
    baseline_cfg: float = 5.0
    fuse: bool = True
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    host_stages: int = 0
    fp8: bool = False
    channels_last: bool = False
    vae: str = "default"
    vae_tiling: bool = False
    gpu: str | None = None
    sync_check: bool = False
    like: str = "hyper-4"
    am_pairs: int = 0
    am_kernel: str = "fused"
    compare_options: tuple[str, ...] = ()
    vae_compare: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(VARIANTS)}")
        for name in ("repeats", "images", "baseline_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "am_pairs", "host_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            raise ConfigError(f"resolution must be a positive multiple of 64, got {self.resolution}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        bad = [o for o in self.compare_options if o not in SPEED_OPTIONS]
        if bad:
            raise ConfigError(f"unknown speed option(s) {', '.join(bad)}; choose from: {', '.join(SPEED_OPTIONS)}")
        if self.vae not in ("default", "fp16-fix", "tiny"):
            raise ConfigError(f"vae must be default, fp16-fix or tiny; got {self.vae!r}")
        if not math.isfinite(self.baseline_cfg) or self.baseline_cfg <= 0:
            raise ConfigError(f"baseline CFG scale must be a positive number, got {self.baseline_cfg}")


@dataclass
class VariantResult:
    """Timings of one variant: one dict per timed repeat (ms per call), plus what it cost."""

    name: str
    description: str
    steps: int = 0
    evaluations: int = 0
    controlnet_evaluations: int = 0  # InstantID: one IdentityNet evaluation per branch sample
    images: int = 1
    repeats: list[dict[str, float]] = field(default_factory=list)
    peak_memory_mb: float | None = None
    lora_state: str = ""
    error: str | None = None

    def median(self, stage: str) -> float | None:
        values = [r[stage] for r in self.repeats if stage in r]
        return statistics.median(values) if values else None

    def per_image(self, stage: str) -> float | None:
        value = self.median(stage)
        return None if value is None else value / self.images

    def per_step(self) -> float | None:
        value = self.per_image("denoise")
        return None if value is None or not self.steps else value / self.steps

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["ms_per_image"] = {stage: _round(self.per_image(stage)) for stage in STAGES}
        out["denoise_ms_per_step"] = _round(self.per_step())
        out["evaluations_per_image"] = self.evaluations
        out["controlnet_evaluations_per_image"] = self.controlnet_evaluations
        return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------------
# Timing helpers



def reset_peak_memory(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory since the last reset (CUDA), or the process's peak resident set (CPU)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        # Linux reports kilobytes; macOS bytes.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2**20
    except ImportError:  # Windows
        return float("nan")


def psnr(a: Any, b: Any, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 · log10(peak² / mean((a − b)²))`` (inf when equal)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def deviation(a: Any, b: Any, peak: float | None = None) -> dict[str, float]:
    """max |a − b|, mean |a − b| and (with ``peak``) the PSNR between two arrays of equal shape."""
    import numpy as np

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ConfigError(f"cannot compare arrays of shapes {x.shape} and {y.shape}")
    diff = np.abs(x - y)
    out = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    if peak is not None:
        out["psnr_db"] = psnr(x, y, peak)
    return out


# ---------------------------------------------------------------------------------------------
# Building the pipeline


def _torch_dtype(options: BenchOptions, device: torch.device) -> torch.dtype:
    import torch

    if options.dtype is not None:
        return getattr(torch, DTYPES[options.dtype])
    return torch.float16 if device.type == "cuda" else torch.float32


def build_pipeline(options: BenchOptions, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]) -> FastFacePipeline:
    """The pipeline the benchmark runs: ``fullsize`` (random weights) or a registered backbone."""
    if options.backbone == FULLSIZE:
        from .fullsize import build_fullsize_pipeline

        return build_fullsize_pipeline(
            device, dtype, adapter=options.adapter, like=options.like,
            vae="sdxl" if options.vae == "default" else options.vae, log=log
        )
    from .backbones import BACKBONES
    from .pipeline import FastFacePipeline

    if options.backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {options.backbone!r}; choose {FULLSIZE} or one of: {', '.join(BACKBONES)}")
    if options.vae == "tiny":
        raise ConfigError("--vae tiny is available for the fullsize backbone (no tiny-VAE weights are bundled)")
    return FastFacePipeline.from_pretrained(options.backbone, options.adapter, device=device, dtype=dtype)


def apply_speed_options(pipe: FastFacePipeline, options: BenchOptions) -> list[str]:
    """channels-last, torch.compile and VAE tiling on the pipeline's modules; returns what was applied."""
    import torch

    applied = []
    unet = pipe.sdxl.unet
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
        pipe.sdxl.vae.to(memory_format=torch.channels_last)
        applied.append("channels-last")
    if options.vae_tiling:
        pipe.sdxl.vae.enable_tiling()
        applied.append("vae-tiling")
    if options.fp8:
        from .fp8 import quantize_unet_fp8

        count = quantize_unet_fp8(pipe)
        applied.append(f"fp8 ({count} linear layers)")
    if options.compile:
        # The pipeline's compiled path: UNet + VAE decode, fused LoRAs, tensors for per-call numbers.
        mode = options.compile_mode if options.compile_mode is not None else ...
        pipe.compile(mode=mode, backend=options.compile_backend)
        applied.append(f"compile ({options.compile_backend}, {pipe.compile_report()['mode']})")
    return applied


# ---------------------------------------------------------------------------------------------
# The face used for timing


def timing_identity(pipe: FastFacePipeline, seed: int) -> Any:
    """A random identity for any adapter: an embedding of its size (raw = as drawn), a random face
    crop (CLIP adapters) and a face's five keypoints on a 512 x 512 photo (InstantID)."""
    import numpy as np

    from .faces.align import ARCFACE_TEMPLATE
    from .faces.types import Identity

    rng = np.random.default_rng(seed)
    dim = pipe.adapter.embedding_dim or 512
    identity = Identity.from_embeddings(rng.standard_normal(dim).astype(np.float32))
    identity.crops = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]
    identity.keypoints = [(ARCFACE_TEMPLATE * 2.5 + 116).astype(np.float32)]
    identity.image_sizes = [(512, 512)]
    if pipe.adapter.spec.kind.startswith("pulid"):
        # PuLID reads the photo itself (EVA-CLIP on the aligned face): the bundled portrait, with
        # keypoints placed by the FFHQ template (timing does not depend on where the face is).
        from importlib.resources import files

        from .models.pulid_face import FFHQ_TEMPLATE_512

        identity.sources = [str(files("fastface") / "data" / "portrait.jpg")]
        identity.keypoints = [(FFHQ_TEMPLATE_512 * 0.5 + 20).astype(np.float32)]
    return identity


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class VariantSpec:
    """How one variant calls the engine: preset, guidance override, step override, or the naive loop."""

    name: str
    description: str
    method: str | None = None
    guidance: Any = None
    steps: int | None = None
    naive: bool = False
    planned: bool = False


def variant_specs(options: BenchOptions) -> dict[str, VariantSpec]:
    from .guidance import GuidanceConfig
    from .presets import plain_cfg

    return {
        "none": VariantSpec("none", "adapter plugged in, backbone CFG, no DCG/AM", "none"),
        "dcg": VariantSpec("dcg", "decoupled guidance only", "dcg"),
        "am": VariantSpec("am", "attention manipulation only", "am"),
        "fastface": VariantSpec("fastface", "DCG + AM, rescale_on=all (published)", "fastface"),
        "fastface-guided": VariantSpec(
            "fastface-guided", "DCG + AM, rescale_on=guided", "fastface", GuidanceConfig(rescale_on="guided")
        ),
        "fastface-softmask": VariantSpec("fastface-softmask", "DCG + softmask AM", "fastface-softmask"),
        "naive": VariantSpec(
            "naive", "fastface computed as published: 3 branches/step, tokens per UNet call, LoRA unfused",
            "fastface", naive=True,
        ),
        "fastface-unfused": VariantSpec("fastface-unfused", "fastface before LoRA fusion", "fastface"),
        "naive-fused": VariantSpec("naive-fused", "naive with the LoRAs fused", "fastface", naive=True),
        "naive-planned": VariantSpec(
            "naive-planned", "naive, fused, only the step plan's branches", "fastface", naive=True, planned=True
        ),
        "sdxl": VariantSpec(
            "sdxl", f"multi-step baseline: {options.baseline_steps} steps, CFG {options.baseline_cfg:g}, same adapter",
            "none", plain_cfg(options.baseline_cfg), options.baseline_steps,
        ),
    }


def run_engine(pipe: FastFacePipeline, spec: VariantSpec, identity: Any, options: BenchOptions, steps: int,
               height: int, width: int, seed: int) -> tuple[dict[str, float], int, int, Any, list[Any]]:
    """One end-to-end call through :class:`FastFacePipeline`; the engine's synchronised stage timings."""
    from .config import GenerationConfig

    config = GenerationConfig(
        prompts=(PROMPT,) * options.images, backbone=pipe.backbone.name,
        adapter=None if pipe.adapter is None else pipe.adapter.spec.name, method=spec.method or "fastface",
        steps=spec.steps or steps, height=height, width=width, seed=seed,
    )
    if spec.guidance is not None:
        config = config.with_guidance(spec.guidance)
    result = pipe.generate(config, identity, output_type="pil", progress=False)
    meta = result.metadata[0]
    timings = {stage: float(meta["timings_ms"][stage]) for stage in STAGES if stage in meta["timings_ms"]}
    controlnet = int(meta.get("controlnet_evaluations", 0))
    return timings, int(meta["unet_evaluations"]), controlnet, result.latents, result.images


def run_naive(pipe: FastFacePipeline, spec: VariantSpec, identity: Any, options: BenchOptions, steps: int,
              height: int, width: int, seed: int) -> tuple[dict[str, float], int, int, Any, list[Any]]:
    """FastFace as the published research code computes it, for comparison.

    Every step evaluates ε∅, εI and εTI (one batch of 3 per image), whatever the coefficients;
    the identity projection runs again for every UNet call (as diffusers' ``encoder_hid_proj``
    does inside the UNet); the scheduler steps with the device timestep. Same guidance, AM,
    scheduler and seed as ``fastface``.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from .guidance import StepPlan, combine, decoupled_guidance, plan_steps
    from .presets import DEFAULT_IP_SCALE, DEFAULT_LORA_SCALE
    from .steps import assemble_step_inputs, sdxl_time_ids

    if pipe.adapter is None or pipe.adapter.spec.kind != "faceid":
        raise ConfigError("the naive variant is implemented for the faceid adapter")
    device, dtype = pipe.device, pipe.dtype
    sdxl, unet = pipe.sdxl, pipe.sdxl.unet
    cfg, am = pipe.resolve_method(spec.method or "fastface")
    # The same LoRAs active as in an engine call (distillation + adapter at the default weight).
    pipe.activate_loras(DEFAULT_LORA_SCALE)
    # The step plan (naive-planned evaluates only its branches); the published loop evaluates
    # ε∅, εI and εTI at every step, whatever the coefficients.
    planned = plan_steps(cfg, steps)
    plans = [StepPlan(p.step, p.alpha, p.beta, p.rescale, ("null", "id", "full")) for p in planned]
    n = options.images
    start = time.perf_counter()
    embedding = torch.as_tensor(identity.embedding[None], device=device, dtype=dtype).expand(n, -1)
    synchronize(device)
    t_prompt = time.perf_counter()
    embeds = pipe.encode_prompt([PROMPT] * n)
    synchronize(device)
    t_loop = time.perf_counter()
    with torch.no_grad():
        projection = pipe.adapter.projection
        [step_inputs] = assemble_step_inputs(
            plans[:1], text=embeds.cond, null_text=embeds.null, pooled=embeds.pooled, null_pooled=embeds.null_pooled,
            time_ids=sdxl_time_ids(height, width, device=device, dtype=dtype),
            identity=projection(embedding), null_identity=projection(torch.zeros_like(embedding)),
        )
        # The published code projects the raw embeddings inside every UNet call, in batch order.
        id_embeds = torch.cat([embedding if with_id else torch.zeros_like(embedding)
                               for _, with_id in step_inputs.conditions])
        scheduler = type(sdxl.scheduler).from_config(sdxl.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
        shape = (n, unet.config.in_channels, height // sdxl.vae_scale_factor, width // sdxl.vae_scale_factor)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma

        # The rows of each branch (null, id-only, full) in the three-branch stacks above.
        rows = step_inputs.rows
        text, added = step_inputs.encoder_hidden_states, step_inputs.added_cond_kwargs

        def planned_step(k: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            # The published loop, but with only the plan's branches in the batch (branch planning alone).
            branches = [b for b in planned[k].branches if b in rows]
            take = torch.cat([torch.arange(rows[b] * n, rows[b] * n + n, device=device) for b in branches])
            model_input = scheduler.scale_model_input(torch.cat([latents] * len(branches)), t)
            tokens = projection(id_embeds[take])
            out = unet(
                model_input, t, encoder_hidden_states=text[take],
                added_cond_kwargs={key: value[take] for key, value in added.items()},
                cross_attention_kwargs=pipe.adapter.attention_kwargs(
                    tokens, scale=DEFAULT_IP_SCALE, step=k, attention=am),
                return_dict=False,
            )[0]
            preds = dict(zip(branches, out.chunk(len(branches))))
            noise = combine(preds, planned[k], cfg.decomposition)
            return scheduler.step(noise, t, latents, return_dict=False)[0]

        def naive_denoising_loop(latents: torch.Tensor) -> torch.Tensor:
            for k, t in enumerate(scheduler.timesteps):
                if spec.planned:
                    latents = planned_step(k, t, latents)
                    continue
                model_input = scheduler.scale_model_input(torch.cat([latents] * step_inputs.num_chunks), t)
                tokens = projection(id_embeds)
                out = unet(
                    model_input, t, encoder_hidden_states=step_inputs.encoder_hidden_states,
                    added_cond_kwargs=step_inputs.added_cond_kwargs,
                    cross_attention_kwargs=pipe.adapter.attention_kwargs(
                        tokens, scale=DEFAULT_IP_SCALE, step=k, attention=am),
                    return_dict=False,
                )[0]
                chunks = out.chunk(step_inputs.num_chunks)
                uncond, id_only, full = (chunks[step_inputs.rows[b]] for b in ("null", "id", "full"))
                plan = plans[k]
                noise = decoupled_guidance(uncond, id_only, full, plan.alpha, plan.beta, rescale=cfg.rescale)
                latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            return latents

        latents = naive_denoising_loop(latents)
    synchronize(device)
    t_decode = time.perf_counter()
    images = pipe.decode(latents, "pil")
    synchronize(device)
    end = time.perf_counter()
    timings = {
        "identity": (t_prompt - start) * 1000,
        "prompt": (t_loop - t_prompt) * 1000,
        "denoise": (t_decode - t_loop) * 1000,
        "decode": (end - t_decode) * 1000,
        "total": (end - start) * 1000,
    }
    evaluations = sum(len([b for b in p.branches if b in rows]) for p in planned) if spec.planned else 3 * steps
    return timings, evaluations, 0, latents, images


def am_step_overhead(pipe: FastFacePipeline, identity: Any, height: int, width: int, pairs: int,
                     seed: int = 0, kernels: Sequence[str] | None = None) -> dict[str, Any]:
    """What AM adds to one denoising step: the same UNet call timed with and without it.

    The call is a middle step of ``fastface`` (all three branches, one batch of 3). Per round,
    the call without AM and the call with AM computed by each kernel (processors.AM_KERNELS) run
    in a rotating order so that drift of a shared machine cancels; the overhead of a kernel is the
    median over rounds of its time / the time without AM in the same round.
    """
    import torch

    from .presets import DEFAULT_IP_SCALE
    from .processors import CONTEXT_KEY, CallContexts, make_am_kernel

    if kernels is None:
        kernels = ("reference", "lean", "fused", "compiled") if pipe.device.type == "cuda" else ("reference", "lean", "fused")
    _, am = pipe.resolve_method("fastface")
    device, dtype = pipe.device, pipe.dtype
    unet = pipe.sdxl.unet
    tokens = pipe.encode_identity(identity)
    embeds = pipe.encode_prompt(PROMPT)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (3, unet.config.in_channels, height // pipe.sdxl.vae_scale_factor, width // pipe.sdxl.vae_scale_factor)
    sample = torch.randn(shape, generator=generator).to(device, dtype)
    timestep = torch.tensor(500.0, device=device)
    text = torch.cat([embeds.null, embeds.null, embeds.cond])
    added = {
        "text_embeds": torch.cat([embeds.null_pooled, embeds.null_pooled, embeds.pooled]),
        "time_ids": torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype).expand(3, -1),
    }
    ident = torch.cat([tokens.null, tokens.cond, tokens.cond]).to(device, dtype)
    # As the engine builds them: identity K/V projected once (so "off" and every kernel share it).
    processors = pipe._ip_processors
    per_photo = pipe.adapter.tokens_per_photo if pipe.adapter is not None else None
    contexts: dict[str, Any] = {
        "off": {CONTEXT_KEY: CallContexts(processors, DEFAULT_IP_SCALE, None, device=device,
                                          tokens_per_photo=per_photo).context(ident, 1)}
    }
    for kind in kernels:
        builder = CallContexts(processors, DEFAULT_IP_SCALE, am, kernel=kind, am_kernel=make_am_kernel(kind),
                               device=device, tokens_per_photo=per_photo)
        contexts[kind] = {CONTEXT_KEY: builder.context(ident, 1)}

    def timed(name: str) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added,
                 cross_attention_kwargs=contexts[name], return_dict=False)
        synchronize(device)
        return (time.perf_counter() - start) * 1000

    names = list(contexts)
    usable = []
    for name in names:  # warm-up (and compilation)
        try:
            timed(name)
            usable.append(name)
        except Exception as exc:  # e.g. no compiler for torch.compile here
            contexts.pop(name)
            if name == "off":
                raise
            usable_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            contexts[name] = {"error": usable_error}
    times: dict[str, list[float]] = {name: [] for name in usable}
    ratios: dict[str, list[float]] = {name: [] for name in usable if name != "off"}
    for index in range(pairs):
        order = usable[index % len(usable):] + usable[: index % len(usable)]
        round_times = {name: timed(name) for name in order}
        for name in usable:
            times[name].append(round_times[name])
            if name != "off":
                ratios[name].append(round_times[name] / round_times["off"])
    out: dict[str, Any] = {"rounds": pairs, "batch": 3, "without_am_ms": round(statistics.median(times["off"]), 3)}
    for name in kernels:
        if name not in ratios:
            out[name] = contexts[name]
            continue
        out[name] = {
            "with_am_ms": round(statistics.median(times[name]), 3),
            "overhead_percent": round((statistics.median(ratios[name]) - 1.0) * 100, 2),
            "overhead_percent_of_minima": round((min(times[name]) / min(times["off"]) - 1.0) * 100, 2),
        }
    return out


def legacy_placement_view(pipe: FastFacePipeline) -> FastFacePipeline:
    """The same pipeline (same state, same models) with the placement reads of the code before the cache.

    As FastFace did before :mod:`fastface.placement`: ``device``/``dtype`` asked of the UNet at
    every use (diffusers walks its ~1,900 modules), prompts encoded by diffusers'
    ``encode_prompt`` (which asks each text encoder for its execution device, another walk), the
    package versions read at every call. For measuring the host set-up before/after in one run.
    """
    import torch

    from .metadata import _versions
    from .pipeline import FastFacePipeline, PromptEmbeds

    class LegacyPlacement(FastFacePipeline):
        @property
        def device(self) -> torch.device:
            return self._offload_device if self._offload_device is not None else self.sdxl.unet.device

        @property
        def dtype(self) -> torch.dtype:
            return self.sdxl.unet.dtype

        def encode_prompt(self, prompt: Any, negative_prompt: Any = None) -> PromptEmbeds:
            if negative_prompt is not None:  # pragma: no cover - the host-stage table uses no negatives
                return super().encode_prompt(prompt, negative_prompt)
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            with torch.no_grad():
                cond, _, pooled, _ = self.sdxl.encode_prompt(
                    prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
            dtype = self.dtype
            null, null_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
            _versions.__wrapped__()  # the package versions, read again (metadata caches them now)
            return PromptEmbeds(tuple(prompts), (None,) * len(prompts), cond.to(dtype), pooled.to(dtype),
                                null.to(dtype), null_pooled.to(dtype))

    view = LegacyPlacement.__new__(LegacyPlacement)
    view.__dict__ = pipe.__dict__  # one state: a fusion or compile shows in both
    return view


def host_stage_times(pipe: FastFacePipeline, identity: Any, options: BenchOptions, steps: int, height: int,
                     width: int, rounds: int) -> dict[str, Any]:
    """Host time per stage outside the denoising loop, this code vs the placement reads before it, one run.

    Each round calls ``fastface`` once through the pipeline and once through
    :func:`legacy_placement_view` (rotating which goes first) with the prompt and identity
    encodings reused, so the identity and prompt stages hold host work only (the encoders' compute
    is timed separately); ``finish`` is what the call spends after its ``total`` clock stops
    (metadata). ``setup`` excludes the identity K/V projections, device work that the set-up stage
    holds (``identity_kv``, reported beside it). ``encode_prompt`` (the two text encoders, compute
    included) is timed the same way, and each module walk on its own.
    """
    import torch

    from .metadata import _versions

    legacy = legacy_placement_view(pipe)
    views = {"cached": pipe, "legacy": legacy}
    tokens = pipe.encode_identity(identity)
    embeds = pipe.encode_prompt(PROMPT)
    per_view: dict[str, dict[str, list[float]]] = {name: {k: [] for k in (*HOST_STAGES, "host_total", "identity_kv",
                                                                          "encode_prompt")}
                                                  for name in views}
    for index in range(rounds + 1):  # round 0 warms up
        order = list(views) if index % 2 == 0 else list(reversed(list(views)))
        for name in order:
            view = views[name]
            synchronize(pipe.device)
            start = time.perf_counter()
            result = view(None, identity_tokens=tokens, prompt_embeds=embeds, method="fastface", steps=steps,
                          height=height, width=width, seed=options.seed, output_type="pil", progress=False)
            wall = (time.perf_counter() - start) * 1000
            synchronize(pipe.device)
            t0 = time.perf_counter()
            view.encode_prompt(PROMPT)
            synchronize(pipe.device)
            encode_ms = (time.perf_counter() - t0) * 1000
            if index == 0:
                continue
            timings = result.metadata[0]["timings_ms"]
            row = {"identity": timings["identity"], "prompt": timings["prompt"],
                   "setup": timings["setup"] - timings["identity_kv"], "finish": wall - timings["total"]}
            row["host_total"] = sum(row.values())
            row["identity_kv"] = timings["identity_kv"]
            row["encode_prompt"] = encode_ms
            for key, value in row.items():
                per_view[name][key].append(value)
    out: dict[str, Any] = {"rounds": rounds, "method": "fastface", "steps": steps}
    for name, table in per_view.items():
        out[name] = {key: round(statistics.median(values), 3) for key, values in table.items()}
    from diffusers.utils.torch_utils import get_module_execution_device

    def walk_ms(fn: Callable[[], Any], repeats: int = 5) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return round((time.perf_counter() - start) * 1000 / repeats, 3)

    sdxl = pipe.sdxl
    out["walks_ms"] = {
        "unet.dtype": walk_ms(lambda: sdxl.unet.dtype),
        "unet.device": walk_ms(lambda: sdxl.unet.device),
        "vae.dtype": walk_ms(lambda: sdxl.vae.dtype),
        "execution_device(text_encoder)": walk_ms(lambda: get_module_execution_device(sdxl.text_encoder)),
        "execution_device(text_encoder_2)": walk_ms(lambda: get_module_execution_device(sdxl.text_encoder_2)),
        "unet.attn_processors": walk_ms(lambda: sdxl.unet.attn_processors),
        "package versions": walk_ms(_versions.__wrapped__),
        "cached pipe.device + pipe.dtype": walk_ms(lambda: (pipe.device, pipe.dtype)),
    }
    out["unet_modules"] = sum(1 for _ in sdxl.unet.modules())
    del torch
    return out


def vae_decode_comparison(pipe: FastFacePipeline, latents: Any, repeats: int, device: torch.device,
                          log: Callable[[str], None]) -> dict[str, Any]:
    """Decode the same latents with each VAE option of the full-size architecture (random weights).

    ``sdxl`` (upcast to fp32 when the pipeline runs in fp16, as the original VAE needs),
    ``fp16-fix`` (same architecture, no upcast), ``fp16-fix+tiling`` (tiled decode, for small
    GPUs) and ``tiny`` (AutoencoderTiny preview). The pipeline's own VAE is put back afterwards.
    """
    from .fullsize import build_component

    dtype = pipe.dtype
    original = pipe.sdxl.vae

    def kl(upcast: bool, tiling: bool = False) -> Any:
        import torch

        # The original SDXL VAE overflows in float16: the pipeline keeps it in float32 then.
        vae_dtype = torch.float32 if upcast and dtype == torch.float16 else dtype
        vae = build_component("vae", device, vae_dtype, seed=11)
        vae.register_to_config(force_upcast=upcast)
        if tiling:
            vae.enable_tiling()
        return vae

    builders = {
        "sdxl": lambda: kl(True),
        "fp16-fix": lambda: kl(False),
        "fp16-fix+tiling": lambda: kl(False, tiling=True),
        "tiny": lambda: build_component("vae_tiny", device, dtype, seed=12),
    }
    out: dict[str, Any] = {}
    try:
        for name, build in builders.items():
            try:
                pipe.sdxl.register_modules(vae=build())
                pipe.decode(latents, "pil")  # warm-up
                times = []
                reset_peak_memory(device)
                for _ in range(repeats):
                    synchronize(device)
                    start = time.perf_counter()
                    pipe.decode(latents, "pil")
                    synchronize(device)
                    times.append((time.perf_counter() - start) * 1000)
                out[name] = {"decode_ms": round(statistics.median(times), 3),
                             "peak_memory_mb": round(peak_memory_mb(device), 1)}
            except Exception as exc:  # report the others
                out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                log(f"VAE {name} failed: {out[name]['error']}")
    finally:
        pipe.sdxl.register_modules(vae=original)
    return out


# ---------------------------------------------------------------------------------------------
# Host-device synchronisation inside the denoising loop


def find_loop_syncs(fn: Callable[[], Any], loop_functions: Sequence[str] = ("_denoise",)) -> dict[str, Any]:
    """Run ``fn`` with CUDA's sync debug mode and attribute every synchronisation to its caller.

    ``torch.cuda.set_sync_debug_mode("warn")`` reports each synchronising operation as a warning;
    the Python stack at that moment says whether it happened inside the denoising loop (a frame
    of one of ``loop_functions``) or outside it (set-up, timing, decoding). Then a second pass
    with mode ``"error"`` must be unnecessary: the loop is sync-free iff ``in_loop`` is empty.
    """
    import torch

    found: list[list[str]] = []

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings API
        if "called a synchronizing" in str(message):
            stack = traceback.extract_stack()[:-1]
            found.append([f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in stack])

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    in_loop = [s for s in found if any(frame.split(" ")[0] in loop_functions for frame in s)]
    return {
        "total_syncs": len(found),
        "in_loop": len(in_loop),
        "in_loop_sites": sorted({" <- ".join(reversed(s[-4:])) for s in in_loop}),
        "outside_loop_sites": sorted({" <- ".join(reversed(s[-3:])) for s in found if s not in in_loop})[:20],
    }


def error_mode_loop_check(pipe: FastFacePipeline, identity: Any, steps: int, height: int, width: int) -> str:
    """Denoising steps 1…N−1 under ``set_sync_debug_mode("error")`` (set from the step callback).

    The callback after step 0 switches the mode on and the one after the last step off, so the
    set-up before the loop (which may copy to the host on purpose) is outside; step 0 is covered
    by :func:`find_loop_syncs`. Returns "ok" or the error.
    """
    import torch

    def callback(k: int, _latents: Any) -> None:
        torch.cuda.set_sync_debug_mode("error" if k < steps - 1 else "default")

    try:
        pipe(PROMPT, identity, method="fastface", steps=steps, height=height, width=width,
             output_type="latent", progress=False, callback=callback)
        return "ok"
    except RuntimeError as exc:
        return f"sync in loop: {str(exc).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# The run


def machine_description(device: torch.device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    else:
        try:
            with open("/proc/cpuinfo") as handle:
                names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
            if names:
                info["cpu"] = names[0]
        except OSError:
            pass
    return info


def run_benchmark(
    options: BenchOptions,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every requested variant; returns the report (see :func:`format_markdown`).

    ``checkpoint(report)`` receives the report measured so far after the main table, after each
    extra measurement and after each speed-option row, so that a run stopped (a timeout during
    compilation) still leaves what it measured.
    """
    import torch

    from .backbones import default_device

    device = torch.device(options.device) if options.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    dtype = _torch_dtype(options, device)
    random_weights = options.backbone in (FULLSIZE, "tiny")
    if options.backbone == FULLSIZE:
        from .fullsize import RANDOM_WEIGHTS_BANNER

        log(RANDOM_WEIGHTS_BANNER)
    elif options.backbone == "tiny":
        log("RANDOM WEIGHTS: tiny test backbone; valid for counting and relative overhead only.")

    t0 = time.perf_counter()
    pipe = build_pipeline(options, device, dtype, log)
    pipe.set_am_kernel(options.am_kernel)
    load_s = time.perf_counter() - t0
    log(f"pipeline ready in {load_s:.1f} s on {device} ({str(dtype).removeprefix('torch.')})")
    steps = options.steps or pipe.backbone.steps
    height = width = options.resolution or pipe.backbone.resolution
    identity = timing_identity(pipe, options.seed)
    specs = variant_specs(options)
    results: dict[str, VariantResult] = {}
    outputs: dict[str, tuple[Any, list[Any]]] = {}
    compile_reports: dict[str, Any] = {}

    def one_call(row: str, name: str, warm: bool) -> None:
        spec = specs[name]
        run = run_naive if spec.naive else run_engine
        call_steps = spec.steps or steps
        if warm and spec.steps is not None:
            # Warm-up of the long baseline: a few steps run the same kernels as all 30.
            spec = replace(spec, steps=min(spec.steps, 3))
        reset_peak_memory(device)
        timings, evaluations, controlnet, latents, images = run(pipe, spec, identity, options, spec.steps or steps,
                                                                height, width, options.seed)
        if warm:
            return
        result = results[row]
        result.repeats.append({k: round(v, 3) for k, v in timings.items()})
        result.evaluations = evaluations
        result.controlnet_evaluations = controlnet
        result.steps = call_steps
        result.peak_memory_mb = max(result.peak_memory_mb or 0.0, peak_memory_mb(device))
        outputs[row] = (latents, images)

    def run_group(names: list[str], state: str, suffix: str = "") -> None:
        """Warm-up and timed repeats of ``names``, round-robin; rows are named ``name + suffix``."""
        if not names:
            return
        for name in names:
            results[name + suffix] = VariantResult(name + suffix, specs[name].description, images=options.images,
                                                   lora_state=state)
        total = len(names) * (options.warmup + options.repeats)
        bar = _progress(total, options.progress, f"bench {state}{suffix}")
        alive = list(names)
        for round_index in range(options.warmup + options.repeats):
            warm = round_index < options.warmup
            for name in list(alive):
                try:
                    one_call(name + suffix, name, warm)
                except Exception as exc:  # one broken variant must not lose the others
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    results[name + suffix].error = error
                    log(f"variant {name + suffix} failed: {error}")
                    alive.remove(name)
                bar(f"{name}{suffix} {'warm-up' if warm else f'repeat {round_index - options.warmup + 1}'}")

    first = [n for n in options.variants if n in UNFUSED_VARIANTS] if options.fuse else []
    rest = [n for n in options.variants if n not in first]
    run_group(first, "unfused")
    fused = False
    if options.fuse and rest:
        try:
            pipe.fuse_loras()
            fused = True
        except Exception as exc:  # the rest still runs, unfused
            log(f"LoRA fusion failed ({type(exc).__name__}: {exc}); running unfused")
    state = "fused" if fused else "unfused"
    applied = apply_speed_options(pipe, options)
    run_group(rest, state)
    extras: dict[str, Any] = {}

    def report() -> dict[str, Any]:
        out: dict[str, Any] = {
            "banner": _banner(options),
            "random_weights": random_weights,
            "machine": machine_description(device),
            "options": asdict(options),
            "dtype": str(dtype).removeprefix("torch."),
            "height": height,
            "width": width,
            "steps": steps,
            "load_seconds": round(load_s, 2),
            "speed_options": list(applied),
            "results": {name: r.summary() for name, r in results.items()},
            "ratios_vs_none": _ratios(results),
            "am_overhead": _am_overhead(results),
            "rescale_deviation": _rescale_deviation(outputs),
            "floor": _floor(options, device, results, height, width),
        }
        if "paired_unet_call" in extras:
            out["am_overhead"]["paired_unet_call"] = extras["paired_unet_call"]
        for key in ("sync_check", "vae_decode", "host_stages"):
            if key in extras:
                out[key] = extras[key]
        out["compile"] = pipe.compile_report()
        out["compile_reports"] = compile_reports
        out["option_deviation"] = _option_deviation(outputs)
        return out

    def save() -> None:
        if checkpoint is not None:
            checkpoint(report())  # a run stopped later still leaves what is measured so far

    save()
    if options.am_pairs:
        try:
            extras["paired_unet_call"] = am_step_overhead(pipe, identity, height, width, options.am_pairs, options.seed)
        except Exception as exc:  # the rest of the report stands without it
            extras["paired_unet_call"] = {"error": f"{type(exc).__name__}: {exc}"}
        save()
    if options.host_stages:
        try:
            extras["host_stages"] = host_stage_times(pipe, identity, options, steps, height, width, options.host_stages)
        except Exception as exc:  # the rest of the report stands without it
            extras["host_stages"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"host stages failed: {extras['host_stages']['error']}")
        save()
    if options.sync_check:
        extras["sync_check"] = _sync_check(pipe, identity, options, steps, height, width, device)
    if options.vae_compare:
        if options.backbone != FULLSIZE or not outputs:
            extras["vae_decode"] = {"skipped": "needs the fullsize backbone and one successful variant"}
        else:
            latents = next(iter(outputs.values()))[0]
            extras["vae_decode"] = vae_decode_comparison(pipe, latents, options.repeats, device, log)


    if options.compare_options:
        if checkpoint is not None:
            checkpoint(report())  # compiling can take minutes: keep what is measured so far
        # The same process and weights, one option more per stage: the gain of each option.
        suffix = ""
        for label in options.compare_options:
            try:
                _apply_compare_option(pipe, label, options, device)
            except Exception as exc:
                log(f"speed option {label} failed: {type(exc).__name__}: {exc}")
                break
            suffix += f"+{label}"
            applied.append(label)
            for name in [n for n in options.variants if n not in NOT_REPEATED_WITH_OPTIONS]:
                run_group([name], state, suffix)
                if pipe.compile_report() is not None:
                    compile_reports[suffix] = pipe.compile_report()
                if checkpoint is not None:
                    checkpoint(report())
    return report()


def _apply_compare_option(pipe: FastFacePipeline, label: str, options: BenchOptions, device: torch.device) -> None:
    """One more speed option on the running pipeline: compile (no CUDA graphs), graphs, fp8, channels-last."""
    if label == "channels-last":
        apply_speed_options(pipe, BenchOptions(channels_last=True))
    elif label == "compile":
        pipe.compile(mode=options.compile_mode, backend=options.compile_backend)
    elif label == "graphs":
        if device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device")
        pipe.compile(mode="reduce-overhead", backend=options.compile_backend)
    elif label == "fp8":
        from .fp8 import quantize_unet_fp8

        quantize_unet_fp8(pipe)
        report = pipe.compile_report()
        if report is not None:  # a new graph for the new layers, compiled with the same options
            pipe.compile(mode=None if report["mode"] == "default" else report["mode"], backend=report["backend"])


def _option_deviation(outputs: dict[str, tuple[Any, list[Any]]]) -> dict[str, Any]:
    """How far each speed-option row's output is from the same variant's eager row (same seed)."""
    import numpy as np

    out: dict[str, Any] = {}
    for name, (latents, images) in outputs.items():
        if "+" not in name:
            continue
        base = outputs.get(name.split("+", 1)[0])
        if base is None:
            continue
        row: dict[str, Any] = {"latents": deviation(base[0].float().cpu().numpy(), latents.float().cpu().numpy())}
        if images and base[1]:
            a = np.stack([np.asarray(im) for im in base[1]])
            b = np.stack([np.asarray(im) for im in images])
            row["images_uint8"] = deviation(a, b, peak=255.0)
        out[name] = row
    return out


def _progress(total: int, enabled: bool, desc: str) -> Callable[[str], None]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr)

    def advance(postfix: str) -> None:
        bar.set_postfix_str(postfix)
        bar.update()
        if bar.n >= total:
            bar.close()

    return advance


def _banner(options: BenchOptions) -> str:
    if options.backbone == FULLSIZE:
        from .fullsize import RANDOM_WEIGHTS_BANNER

        return RANDOM_WEIGHTS_BANNER
    if options.backbone == "tiny":
        return "RANDOM WEIGHTS: tiny test backbone; absolute times say nothing about SDXL."
    return f"real weights: backbone {options.backbone}, adapter {options.adapter}"


def _ratios(results: dict[str, VariantResult]) -> dict[str, float | None]:
    base = results.get("none")
    reference = base.per_image("total") if base is not None else None
    out: dict[str, float | None] = {}
    for name, result in results.items():
        value = result.per_image("total")
        out[name] = None if not reference or value is None else round(value / reference, 3)
    return out


def _am_overhead(results: dict[str, VariantResult]) -> dict[str, Any]:
    """Denoising time per step with AM over the same configuration without it (same evaluations).

    Rows with speed-option suffixes (``fastface+compile`` vs ``dcg+compile``) are compared too.
    """
    out: dict[str, Any] = {}
    suffixes = sorted({name[len("fastface"):] for name in results if name.startswith("fastface+")})
    pairs = [(f"{a}{suffix}", f"{b}{suffix}") for suffix in ["", *suffixes] for a, b in (("fastface", "dcg"), ("am", "none"))]
    for with_am, without in pairs:
        a, b = results.get(with_am), results.get(without)
        if a is None or b is None or a.per_step() is None or b.per_step() is None:
            continue
        out[f"{with_am}_vs_{without}"] = {
            f"{with_am}_ms_per_step": _round(a.per_step()),
            f"{without}_ms_per_step": _round(b.per_step()),
            "overhead_percent": round((a.per_step() / b.per_step() - 1.0) * 100, 2),
            "same_evaluations": a.evaluations == b.evaluations,
        }
    return out


def _rescale_deviation(outputs: dict[str, tuple[Any, list[Any]]]) -> dict[str, Any] | None:
    """How far rescale_on="guided" moves the output from "all" (same seed)."""
    if "fastface" not in outputs or "fastface-guided" not in outputs:
        return None
    import numpy as np

    (lat_all, img_all), (lat_guided, img_guided) = outputs["fastface"], outputs["fastface-guided"]
    out: dict[str, Any] = {"latents": deviation(lat_all.float().cpu().numpy(), lat_guided.float().cpu().numpy())}
    if img_all and img_guided:
        a = np.stack([np.asarray(im) for im in img_all])
        b = np.stack([np.asarray(im) for im in img_guided])
        out["images_uint8"] = deviation(a, b, peak=255.0)
    return out


def _floor(options: BenchOptions, device: torch.device, results: dict[str, VariantResult], height: int,
           width: int) -> dict[str, Any] | None:
    """Compute-bound floor per image from the real SDXL FLOP counts, and measured / floor."""
    if options.backbone == "tiny":
        return None
    import torch

    from .flops import get_gpu, guess_gpu, sdxl_budget

    budget = sdxl_budget(height, width, vae="vae_tiny" if options.vae == "tiny" else "vae")
    measured_on = None
    if device.type == "cuda":
        measured_on = guess_gpu(torch.cuda.get_device_name(device))
    key = options.gpu or measured_on or "h200"
    gpu = get_gpu(key)
    per_variant = {}
    for name, result in results.items():
        if not result.evaluations:
            continue
        flops = budget.per_image(result.evaluations)
        floor = flops / (gpu.bf16_tflops * 1e12) * 1e3
        total = result.per_image("total")
        row: dict[str, Any] = {"tflop_per_image": round(flops / 1e12, 3), "floor_ms": round(floor, 2)}
        if total:
            row["achieved_tflops"] = round(flops / (total / 1e3) / 1e12, 3)
            row["measured_over_floor"] = round(total / floor, 2) if key == measured_on else None
        per_variant[name] = row
    return {
        "gpu": key,
        "gpu_name": gpu.name,
        "peak_bf16_tflops": gpu.bf16_tflops,
        "measured_on_this_gpu": key == measured_on,
        "budget_tflop": {k: (round(v / 1e12, 4) if isinstance(v, int) and k not in ("height", "width") else v)
                         for k, v in budget.to_dict().items()},
        "per_variant": per_variant,
    }


def _sync_check(pipe: FastFacePipeline, identity: Any, options: BenchOptions, steps: int, height: int, width: int,
                device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "CUDA only (CPU tensors never synchronise)"}
    check: dict[str, Any] = {}
    specs = variant_specs(options)
    for name in ("fastface", "fastface-softmask", "sdxl"):
        spec = specs[name]
        if spec.steps is not None:
            spec = replace(spec, steps=4)
        check[name] = find_loop_syncs(
            lambda s=spec: run_engine(pipe, s, identity, options, s.steps or steps, height, width, options.seed)
        )
    if "naive" in options.variants and pipe.adapter is not None and pipe.adapter.spec.kind == "faceid":
        check["naive"] = find_loop_syncs(
            lambda: run_naive(pipe, specs["naive"], identity, options, steps, height, width, options.seed),
            loop_functions=("naive_denoising_loop",),
        )
    check["error_mode_fastface"] = error_mode_loop_check(pipe, identity, steps, height, width)
    return check


# ---------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: banner, machine, the timing table, AM overhead, rescale deviation, floor."""
    machine = report["machine"]
    where = machine.get("gpu") or machine.get("cpu")
    lines = [
        f"> {report['banner']}",
        "",
        f"Backbone `{report['options']['backbone']}`, adapter `{report['options']['adapter']}`, "
        f"{report['width']}x{report['height']}, {report['steps']} steps, {report['dtype']}, "
        f"{report['options']['repeats']} repeat(s) (median, {report['options']['warmup']} warm-up), "
        f"on {where} ({machine['device']}, torch {machine['torch']}, {machine.get('torch_threads')} threads)"
        + (f"; speed options: {', '.join(report['speed_options'])}" if report["speed_options"] else ""),
        "",
        "| variant | LoRA | steps | UNet evals | ControlNet evals | identity ms | prompt ms | setup ms | denoise ms "
        "| decode ms | total ms/image | vs none | ms/step | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["results"].items():
        ms = row["ms_per_image"]
        if row["error"]:
            lines.append(f"| {name} | {row['lora_state']} | – | – | – | failed: {row['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {row['lora_state']} | {row['steps']} | {row['evaluations']} | "
            f"{row.get('controlnet_evaluations', 0)} | {_fmt(ms['identity'])} | "
            f"{_fmt(ms['prompt'])} | {_fmt(ms.get('setup'))} | {_fmt(ms['denoise'])} | {_fmt(ms['decode'])} | "
            f"{_fmt(ms['total'])} | "
            f"{_fmt(report['ratios_vs_none'].get(name), 2)} | {_fmt(row['denoise_ms_per_step'])} | "
            f"{_fmt(row['peak_memory_mb'], 0)} |"
        )
    if report.get("am_overhead"):
        lines.append("")
        for key, row in report["am_overhead"].items():
            if key == "paired_unet_call":
                if "error" in row:
                    lines.append(f"AM overhead of one UNet call: failed: {row['error']}")
                    continue
                lines.append(f"AM overhead of one UNet call (batch of 3 branches, {row['rounds']} rotating rounds, "
                             f"{row['without_am_ms']:.1f} ms without AM), per AM kernel:")
                for name, cell in row.items():
                    if not isinstance(cell, dict):
                        continue
                    lines.append(
                        f"- {name}: " + (f"failed: {cell['error']}" if "error" in cell else
                                         f"{cell['overhead_percent']:+.2f} % (median of ratios; "
                                         f"{cell['overhead_percent_of_minima']:+.2f} % of minima; "
                                         f"{cell['with_am_ms']:.1f} ms)")
                    )
                continue
            with_am, without = key.split("_vs_")
            lines.append(
                f"AM overhead per denoising step, {with_am} vs {without}: {row['overhead_percent']:+.2f} % "
                f"({row[f'{with_am}_ms_per_step']:.1f} vs {row[f'{without}_ms_per_step']:.1f} ms/step)"
            )
    deviation_report = report.get("rescale_deviation")
    if deviation_report:
        lat = deviation_report["latents"]
        text = f"rescale_on guided vs all (same seed): latents max |Δ| {lat['max_abs']:.4g}, mean |Δ| {lat['mean_abs']:.4g}"
        if "images_uint8" in deviation_report:
            img = deviation_report["images_uint8"]
            text += (f"; decoded images max |Δ| {img['max_abs']:.0f}/255, mean |Δ| {img['mean_abs']:.2f}/255, "
                     f"PSNR {img['psnr_db']:.1f} dB")
        lines += ["", text]
    floor = report.get("floor")
    if floor:
        budget = floor["budget_tflop"]
        lines += [
            "",
            f"Floor on {floor['gpu_name']} (dense bf16 peak {floor['peak_bf16_tflops']:g} TFLOP/s): UNet "
            f"{budget['unet_per_evaluation']:.3f} TFLOP per sample-evaluation (+{budget['identity_branch_per_evaluation']:.4f} "
            f"identity branch), VAE decode {budget['vae_decode']:.3f} TFLOP, text encoders {budget['text_encoders']:.3f} TFLOP.",
            "",
            "| variant | TFLOP/image | floor ms | achieved TFLOP/s | measured / floor |",
            "|---|---|---|---|---|",
        ]
        for name, row in floor["per_variant"].items():
            lines.append(
                f"| {name} | {row['tflop_per_image']:.2f} | {row['floor_ms']:.1f} | {_fmt(row.get('achieved_tflops'), 2)} | "
                f"{_fmt(row.get('measured_over_floor'), 2) if floor['measured_on_this_gpu'] else 'n/a (other device)'} |"
            )
    vae_rows = report.get("vae_decode")
    if vae_rows and "skipped" not in vae_rows:
        lines += ["", "| VAE option | decode ms (same latents) | peak MiB |", "|---|---|---|"]
        for name, row in vae_rows.items():
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error']} | |")
            else:
                lines.append(f"| {name} | {row['decode_ms']:.1f} | {row['peak_memory_mb']:.0f} |")
    host = report.get("host_stages")
    if host and "error" not in host:
        lines += ["", f"Host set-up per call outside the denoising loop ({host['method']}, encodings reused, "
                      f"median of {host['rounds']} rotating rounds; UNet of {host['unet_modules']} modules), ms:", "",
                  "| placement | identity | prompt | setup | finish | host total | identity K/V (device work in "
                  "the set-up stage) | encode_prompt (compute incl.) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, label in (("legacy", "before (walks per use)"), ("cached", "after (read once)")):
            row = host[name]
            lines.append(f"| {label} | {row['identity']:.2f} | {row['prompt']:.2f} | {row['setup']:.2f} | "
                         f"{row['finish']:.2f} | **{row['host_total']:.2f}** | {row.get('identity_kv', 0.0):.1f} | "
                         f"{row['encode_prompt']:.1f} |")
        lines += ["", "One module walk each, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in host["walks_ms"].items())]
    elif host:
        lines += ["", f"Host stages: failed: {host['error']}"]
    compiled = report.get("compile_reports") or {}
    for suffix, row in compiled.items():
        graphs = ", ".join(f"{m} {row[m]['graphs']} graph(s) {row[m]['per_shape']} in {row[m]['compile_seconds']:.0f} s"
                           for m in ("unet", "vae"))
        unexpected = {m: row[m]["unexpected"] for m in ("unet", "vae") if row[m]["unexpected"]}
        lines.append(f"Compiled{suffix}: backend {row['backend']}, mode {row['mode']}: {graphs}; "
                     + (f"UNEXPECTED recompiles {unexpected}" if unexpected else "no unexpected recompile"))
    for name, row in (report.get("option_deviation") or {}).items():
        text = f"{name} vs eager (same seed): latents max |Δ| {row['latents']['max_abs']:.3g}"
        if "images_uint8" in row:
            text += f"; images max |Δ| {row['images_uint8']['max_abs']:.0f}/255, PSNR {row['images_uint8']['psnr_db']:.1f} dB"
        lines.append(text)
    sync = report.get("sync_check")
    if sync:
        lines += ["", "Host-device syncs inside the denoising loop (CUDA sync debug mode):"]
        for name, row in sync.items():
            if isinstance(row, dict) and "in_loop" in row:
                lines.append(f"- {name}: {row['in_loop']} in the loop ({row['total_syncs']} in the whole call)")
            else:
                lines.append(f"- {name}: {row}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="tiny",
                        help="backbone name, or 'fullsize' (SDXL architecture, random weights)")
    parser.add_argument("--adapter", default="faceid", help="identity adapter")
    parser.add_argument("--like", default="hyper-4",
                        help="fullsize only: the backbone whose scheduler, steps and LoRA it mimics")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (backbone default)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (backbone default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per variant")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=1, help="images per call (batch)")
    parser.add_argument("--baseline-steps", type=int, default=30)
    parser.add_argument("--baseline-cfg", type=float, default=5.0)
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep every LoRA unfused")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (after fusion)")
    parser.add_argument("--compile-mode", default=None,
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--vae", default="default", choices=("default", "fp16-fix", "tiny"),
                        help="fullsize: the SDXL VAE, its fp16-safe variant, or the tiny preview autoencoder")
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--gpu", default=None, help="GPU of the floor table (default: the device's, else h200)")
    parser.add_argument("--sync-check", action="store_true", help="CUDA: look for host-device syncs in the loop")
    parser.add_argument("--am-pairs", type=int, default=0, metavar="N",
                        help="also time N paired UNet calls with/without AM (the AM overhead per step)")
    parser.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                        help="torch.compile backend (eager/aot_eager: graph capture without code generation)")
    parser.add_argument("--fp8", action="store_true", help="FP8 linear layers in the fused UNet (CUDA, Hopper+)")
    parser.add_argument("--host-stages", type=int, default=0, metavar="N",
                        help="also time the host set-up per stage, cached vs legacy placement, N rounds")
    parser.add_argument("--am-kernel", default="fused", choices=("reference", "lean", "compiled", "fused"),
                        help="implementation of scale-power AM used in the table")
    parser.add_argument("--compare-options", default="", metavar="LIST",
                        help=f"after the table, re-time none/fastface adding each of these in turn: {','.join(SPEED_OPTIONS)}")
    parser.add_argument("--vae-compare", action="store_true",
                        help="time the decode of the same latents with each VAE option (fullsize)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the report here")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write the markdown table here")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    variants = tuple(v.strip() for v in str(args.variants).split(",") if v.strip())
    return BenchOptions(
        backbone=args.backbone, adapter=args.adapter, resolution=args.resolution, steps=args.steps,
        repeats=args.repeats, warmup=args.warmup, variants=variants, device=args.device, dtype=args.dtype,
        seed=args.seed, images=args.images, baseline_steps=args.baseline_steps, baseline_cfg=args.baseline_cfg,
        fuse=args.fuse, compile=args.compile, compile_mode=args.compile_mode, compile_backend=args.compile_backend,
        host_stages=args.host_stages, fp8=args.fp8, channels_last=args.channels_last, vae=args.vae,
        vae_tiling=args.vae_tiling, gpu=args.gpu, sync_check=args.sync_check, like=args.like,
        am_pairs=args.am_pairs, am_kernel=args.am_kernel, compare_options=tuple(o.strip() for o in args.compare_options.split(",") if o.strip()), vae_compare=args.vae_compare,
        progress=args.progress,
    )


def run_command(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if options.gpu is not None:
        from .flops import get_gpu

        get_gpu(options.gpu)  # a bad name fails before any model is built

    def save(report: dict[str, Any]) -> str:
        markdown = format_markdown(report)
        if args.json_path:
            _write(Path(args.json_path), json.dumps(_json_ready(report), indent=2, allow_nan=False) + "\n")
        if args.markdown:
            _write(Path(args.markdown), markdown)
        return markdown

    report = run_benchmark(options, log=lambda line: print(line, flush=True), checkpoint=save)
    print(save(report), flush=True)
    return 0


def _json_ready(value: Any) -> Any:
    """Strict JSON: non-finite floats become strings, unknown objects their ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="time the FastFace variants end to end (see benchmarks/RESULTS.md)")
    add_arguments(parser)
    parser.set_defaults(func=run_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``benchmarks/speed.py``: the same parser and errors as ``fastface bench``."""
    from .cli import main as cli_main

    return cli_main(["bench", *(argv if argv is not None else sys.argv[1:])])
