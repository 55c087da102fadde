"""What a generated image records about how it was made: configuration, costs, versions, licences."""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import Any

from . import __version__
from .errors import ConfigError
from .guidance import branch_conditions, unet_evaluations


def versions() -> dict[str, str]:
    """Versions of FastFace and the libraries that decide the pixels."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    # importlib.metadata scans the installed distributions (milliseconds): once per process.
    found = {"fastface": __version__}
    for package in ("torch", "diffusers", "transformers", "peft"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return tuple(found.items())


def face_licence(backend: str) -> str | None:
    """Licence of a face backend's models, read from the faces registry without building it."""
    try:
        from .faces import BACKENDS

        target, options = BACKENDS[backend]
        module_name, class_name = target.split(":")
        if "pack" in options:
            from .faces.model_packs import get_pack

            return get_pack(options["pack"]).licence
        licence = getattr(getattr(importlib.import_module(module_name), class_name), "licence", None)
        return licence if isinstance(licence, str) else None
    except (KeyError, ImportError, AttributeError, ValueError, ConfigError):
        return None


def licences(
    backbone: Sequence[str], adapter: Sequence[str] | None, vae: Any, identity_info: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The licence of every checkpoint in the combination: backbone, adapter, VAE, face model."""
    licence: dict[str, Any] = {"backbone": list(backbone)}
    if adapter is not None:
        licence["adapter"] = list(adapter)
    if vae is not None:
        licence["vae"] = vae
    if identity_info is not None:
        backend = str(identity_info.get("backend"))
        licence["face_model"] = face_licence(backend) or f"see the '{backend}' face backend's licence"
    return licence


def per_image(shared: Mapping[str, Any], prompts: Sequence[str], negative_prompts: Sequence[str | None],
              seeds: Sequence[int], per_prompt: int) -> list[dict[str, Any]]:
    """One metadata dict per image: its prompt, seed and index, then the call's shared fields."""
    result = []
    for index, seed in enumerate(seeds):
        row = index // per_prompt
        result.append(
            {
                "prompt": prompts[row],
                "negative_prompt": negative_prompts[row],
                "seed": seed,
                "index": index,
                **copy.deepcopy(dict(shared)),
            }
        )
    return result


def call_metadata(
    pipe: Any, request: Any, embeds: Any, per_prompt: int, seeds: Sequence[int],
    conditioning: Any, timings: Mapping[str, float],
) -> list[dict[str, Any]]:
    """Metadata of each image of one pipeline call (``request``: the call's checked options)."""
    has_identity = conditioning is not None
    extra: dict[str, int] = {}
    if pipe.adapter is not None and has_identity:
        # Extra model evaluations per image (e.g. InstantID's ControlNet), summed over steps.
        for plan in request.plans:
            conditions = branch_conditions(plan.branches, has_identity)[0]
            for kind, n in pipe.adapter.extra_evaluations(conditions, 1).items():
                extra[kind] = extra.get(kind, 0) + n
    shared = {
        "backbone": pipe.backbone.name,
        "backbone_config": pipe.backbone.to_dict(),
        "adapter": None if pipe.adapter is None else pipe.adapter.spec.name,
        "adapter_config": None if pipe.adapter is None else pipe.adapter.describe(),
        "method": request.method,
        "guidance": request.guidance.to_dict(),
        "attention": None if request.attention is None else request.attention.to_dict(),
        "schedule": [
            {"step": p.step, "alpha": p.alpha, "beta": p.beta, "rescale": p.rescale, "branches": list(p.branches)}
            for p in request.plans
        ],
        "steps": len(request.plans),
        "height": request.height,
        "width": request.width,
        "ip_scale": request.ip_scale if has_identity else None,
        "lora_scale": request.lora_scale if has_identity else None,
        "lora_weights": pipe.lora_weights,
        "loras_fused": pipe.fused_loras is not None,
        "identity": None if conditioning is None else dict(conditioning.info),
        "unet_evaluations": unet_evaluations(request.plans, has_identity),
        "extra_evaluations": extra,
        # InstantID's IdentityNet runs once per UNet sample-evaluation (every branch): its own count
        "controlnet_evaluations": extra.get("controlnet", 0),
        "timings_ms": {k: round(v, 3) for k, v in timings.items()},
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "memory": pipe.memory_options(),
        "compiled": pipe.compile_report(),
        "versions": versions(),
        "licence": licences(
            pipe.backbone.licence,
            None if pipe.adapter is None else pipe.adapter.licences(),
            None if pipe.vae_choice is None else pipe.vae_choice.licence,
            None if conditioning is None else conditioning.info,
        ),
    }
    return per_image(shared, embeds.prompts, embeds.negative_prompts, seeds, per_prompt)
