"""The SDXL sampling pieces of the engine: scheduler set-up, initial noise, the loop, decoding.

Adapted from diffusers 0.42.1 ``StableDiffusionXLPipeline.__call__`` (set-up, denoising loop and
VAE decode), with FastFace's changes: one batched UNet call per step over the branches the plan
needs (``steps.StepInputs``), host-side scheduler tables (no device sync in the loop), one
generator per image, and per-branch extras from the identity adapter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .guidance import combine as combine_branches
from .placement import encode_sdxl_text, module_dtype
from .steps import StepInputs

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import IdentityAdapter, IdentityConditioning
    from .backbones import BackboneSpec


def encode_text(
    sdxl: Any, prompts: list[str], negatives: Sequence[str | None] | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T tokens, T pooled, ∅ tokens, ∅ pooled), one row per prompt; ∅ is all zeros without negatives.

    diffusers' ``encode_prompt`` computation (:func:`fastface.placement.encode_sdxl_text`), with the
    device given rather than asked of each text encoder (a walk over its modules).
    """
    with torch.no_grad():
        cond, pooled = encode_sdxl_text(sdxl, prompts, device)
        if negatives is None:
            # METHOD §2: the null text is all-zero token and pooled embeddings.
            return cond, pooled, torch.zeros_like(cond), torch.zeros_like(pooled)
        null, null_pooled = encode_sdxl_text(sdxl, [n or "" for n in negatives], device)
    return cond, pooled, null, null_pooled


def fresh_scheduler(sdxl: Any) -> Any:
    # A copy per call: a scheduler keeps its step index and timesteps, which must not leak
    # from one call (perhaps interrupted) into the next, or between pipelines.
    base = sdxl.scheduler
    return type(base).from_config(base.config)


def set_timesteps(
    scheduler: Any, backbone: BackboneSpec, num_steps: int, device: torch.device
) -> tuple[torch.Tensor, list[Any]]:
    """Timesteps on the device (for the UNet) and on the host (for the scheduler).

    The scheduler's own tables stay on the host: LCM, TCD and DDIM index and compare them with
    the timestep, which with device tensors would synchronise at every step.
    """
    custom = backbone.timesteps
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


def initial_latents(
    sdxl: Any, scheduler: Any, generators: list[torch.Generator], count: int, height: int, width: int,
    device: torch.device, dtype: torch.dtype,
) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    factor = sdxl.vae_scale_factor
    shape = (count, sdxl.unet.config.in_channels, height // factor, width // factor)
    # One generator per image: image i depends on its own seed only.
    noise = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
    return noise * scheduler.init_noise_sigma


def step_kwargs(scheduler: Any, backbone: BackboneSpec, generators: list[torch.Generator]) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "generator" in accepted:
        kwargs["generator"] = generators
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    kwargs.update({k: v for k, v in backbone.step_kwargs.items() if k in accepted})
    return kwargs


def timestep_cond(sdxl: Any, backbone: BackboneSpec, count: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor | None:
    # UNets distilled with a guidance embedding (LCM-distilled UNets) take w - 1 as input.
    dim = sdxl.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.full((count,), backbone.cfg_scale - 1.0)
    return sdxl.get_guidance_scale_embedding(w, embedding_dim=dim).to(device, dtype)


def denoise(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    timesteps_host: list[Any],
    inputs: Sequence[StepInputs],
    attention_kwargs: Sequence[dict[str, Any] | None],
    decomposition: str,
    *,
    kwargs_for_step: dict[str, Any],
    cond: torch.Tensor | None = None,
    adapter: IdentityAdapter | None = None,
    conditioning: IdentityConditioning | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = False,
    desc: str = "fastface",
) -> torch.Tensor:
    """The loop: per step one batched UNet call, branch combination, scheduler step."""
    from .adapters import UNetCall

    with_extras = adapter is not None and adapter.uses_branch_extras and conditioning is not None
    bar = tqdm(total=len(inputs), desc=desc, disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for k, step in enumerate(inputs):
                t = timesteps[k]
                model_input = scheduler.scale_model_input(latents, timesteps_host[k])
                if step.num_chunks > 1:
                    model_input = model_input.repeat(step.num_chunks, 1, 1, 1)
                extras: dict[str, Any] = {}
                if with_extras and step.identity_tokens is not None:
                    extras = adapter.branch_extras(UNetCall(
                        step=step.plan.step, sample=model_input, timestep=t,
                        encoder_hidden_states=step.encoder_hidden_states, added_cond_kwargs=step.added_cond_kwargs,
                        identity_tokens=step.identity_tokens, conditions=step.conditions, count=step.count,
                        conditioning=conditioning,
                    ))
                out = unet(
                    model_input,
                    t,
                    encoder_hidden_states=step.encoder_hidden_states,
                    timestep_cond=None if cond is None else cond.repeat(step.num_chunks, 1),
                    cross_attention_kwargs=attention_kwargs[k],
                    added_cond_kwargs=step.added_cond_kwargs,
                    return_dict=False,
                    **extras,
                )[0]
                chunks = out.chunk(step.num_chunks)
                preds = {branch: chunks[row] for branch, row in step.rows.items()}
                noise = combine_branches(preds, step.plan, decomposition)
                latents = scheduler.step(noise, timesteps_host[k], latents, **kwargs_for_step, return_dict=False)[0]
                if callback is not None:
                    callback(k, latents)
                bar.update()
    finally:
        bar.close()
    return latents


def decode(sdxl: Any, latents: torch.Tensor, output_type: str,
           decoder: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[Any]:
    """Final latents -> PIL images or arrays; [] for "latent".

    ``decoder``: the VAE decode of scaled latents to use instead of ``sdxl.vae.decode`` (the
    compiled one, :class:`fastface.compiled.CompiledModels`).
    """
    if output_type == "latent":
        return []
    vae = sdxl.vae
    with torch.no_grad():
        # As diffusers' SDXL pipeline: the KL VAEs undo their scaling (and per-channel
        # statistics where the config has them); AutoencoderTiny has neither statistics nor
        # upcast, its scaling_factor is 1 and its decoder outputs [-1, 1] like the KL decoder.
        z = latents.to(module_dtype(vae))  # vae.dtype would walk every module of the VAE
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
            z = z * std_t / vae.config.scaling_factor + mean_t
        else:
            z = z / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0] if decoder is None else decoder(z)
    watermark = getattr(sdxl, "watermark", None)
    if watermark is not None:
        image = watermark.apply_watermark(image)
    return list(sdxl.image_processor.postprocess(image, output_type=output_type))
