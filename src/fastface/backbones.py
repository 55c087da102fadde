"""SDXL backbones: the registry of METHOD §6 (+ ``tiny``), scheduler set-up and loading.

A backbone is a base SDXL pipeline, optionally with a distillation LoRA or a replacement UNet,
and the scheduler, step count, resolution and CFG scale its authors use. Every hub name is only a
default: ``base_model`` may be a local diffusers folder or a single ``.safetensors`` file, and the
distillation pieces come from the hub cache or fail with :class:`~fastface.errors.MissingWeightsError`
saying what is missing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, InputError, MissingWeightsError
from .hub import resolve_file, resolve_folder

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from diffusers import StableDiffusionXLPipeline

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_LICENCE = "CreativeML Open RAIL++-M (SDXL base 1.0)"

# Adapter names loaded into the UNet by FastFace (PEFT adapter names).
DISTILL_ADAPTER = "fastface_distill"
STYLE_ADAPTER = "fastface_style_{}"

TINY = "tiny"


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: where its weights live and how its authors sample it."""

    name: str
    base: str  # hub id of the base pipeline ("tiny": the local tiny model)
    scheduler: str  # diffusers scheduler class name
    steps: int
    resolution: int
    cfg_scale: float  # stock CFG scale when FastFace's guidance is off (method "none"/backbone CFG)
    licence: tuple[str, ...]
    lora: tuple[str, str] | None = None  # (repo, file) of a distillation LoRA
    unet: tuple[str, str] | None = None  # (repo, file) of a replacement UNet state dict
    scheduler_kwargs: Mapping[str, Any] = field(default_factory=_frozen)
    timesteps: tuple[int, ...] | None = None  # custom timesteps (DMD2)
    step_kwargs: Mapping[str, Any] = field(default_factory=_frozen)  # extra scheduler.step kwargs
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base,
            "lora": list(self.lora) if self.lora else None,
            "unet": list(self.unet) if self.unet else None,
            "scheduler": self.scheduler,
            "scheduler_kwargs": dict(self.scheduler_kwargs),
            "timesteps": list(self.timesteps) if self.timesteps else None,
            "step_kwargs": dict(self.step_kwargs),
            "steps": self.steps,
            "resolution": self.resolution,
            "cfg_scale": self.cfg_scale,
            "licence": list(self.licence),
        }


_TRAILING = _frozen({"timestep_spacing": "trailing"})
_HYPER_LICENCE = "Hyper-SD LoRA: see the ByteDance/Hyper-SD model card"


def _hyper(steps: int) -> BackboneSpec:
    file = "Hyper-SDXL-1step-lora.safetensors" if steps == 1 else f"Hyper-SDXL-{steps}steps-lora.safetensors"
    return BackboneSpec(
        name=f"hyper-{steps}",
        base=SDXL_BASE,
        lora=("ByteDance/Hyper-SD", file),
        scheduler="DDIMScheduler",
        scheduler_kwargs=_TRAILING,
        steps=steps,
        resolution=1024,
        cfg_scale=1.0,
        licence=(SDXL_LICENCE, _HYPER_LICENCE),
        description=f"SDXL + Hyper-SD {steps}-step LoRA, DDIM trailing",
    )


def _lightning(steps: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"lightning-{steps}",
        base=SDXL_BASE,
        unet=("ByteDance/SDXL-Lightning", f"sdxl_lightning_{steps}step_unet.safetensors"),
        scheduler="EulerDiscreteScheduler",
        scheduler_kwargs=_TRAILING,
        steps=steps,
        resolution=1024,
        cfg_scale=1.0,
        licence=(SDXL_LICENCE, "SDXL-Lightning: CreativeML Open RAIL++-M"),
        description=f"SDXL-Lightning {steps}-step UNet, Euler trailing",
    )


BACKBONES: Mapping[str, BackboneSpec] = MappingProxyType(
    {
        "sdxl": BackboneSpec(
            name="sdxl",
            base=SDXL_BASE,
            scheduler="EulerDiscreteScheduler",
            steps=30,
            resolution=1024,
            cfg_scale=5.0,
            licence=(SDXL_LICENCE,),
            description="SDXL base 1.0 (baseline), Euler, CFG 5",
        ),
        **{spec.name: spec for spec in (_hyper(1), _hyper(2), _hyper(4), _hyper(8))},
        "lcm": BackboneSpec(
            name="lcm",
            base=SDXL_BASE,
            lora=("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors"),
            scheduler="LCMScheduler",
            steps=4,
            resolution=1024,
            cfg_scale=1.5,
            licence=(SDXL_LICENCE, "LCM-LoRA SDXL: CreativeML Open RAIL++-M"),
            description="SDXL + LCM-LoRA, LCM scheduler",
        ),
        **{spec.name: spec for spec in (_lightning(2), _lightning(4), _lightning(8))},
        "turbo": BackboneSpec(
            name="turbo",
            base="stabilityai/sdxl-turbo",
            scheduler="EulerAncestralDiscreteScheduler",
            scheduler_kwargs=_TRAILING,
            steps=4,
            resolution=512,
            cfg_scale=1.0,
            licence=("SDXL-Turbo: Stability AI Non-Commercial Research Community License (non-commercial)",),
            description="SDXL-Turbo, Euler ancestral, 512 px",
        ),
        "dmd2": BackboneSpec(
            name="dmd2",
            base=SDXL_BASE,
            unet=("tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin"),
            scheduler="LCMScheduler",
            timesteps=(999, 749, 499, 249),
            steps=4,
            resolution=1024,
            cfg_scale=1.0,
            licence=(SDXL_LICENCE, "DMD2: CC BY-NC 4.0 (non-commercial)"),
            description="DMD2 4-step UNet, LCM scheduler at timesteps 999/749/499/249",
        ),
        "tcd": BackboneSpec(
            name="tcd",
            base=SDXL_BASE,
            lora=("h1t/TCD-SDXL-LoRA", "pytorch_lora_weights.safetensors"),
            scheduler="TCDScheduler",
            step_kwargs=_frozen({"eta": 0.3}),
            steps=4,
            resolution=1024,
            cfg_scale=1.0,
            licence=(SDXL_LICENCE, "TCD-SDXL-LoRA: see the h1t/TCD-SDXL-LoRA model card"),
            description="SDXL + TCD LoRA, TCD scheduler (gamma 0.3)",
        ),
        TINY: BackboneSpec(
            name=TINY,
            base=TINY,
            lora=(TINY, "tiny-distill-lora.safetensors"),
            scheduler="EulerDiscreteScheduler",
            scheduler_kwargs=_TRAILING,
            steps=4,
            resolution=64,
            cfg_scale=1.0,
            licence=("tiny random test weights (no restriction)",),
            description="tiny random-weight SDXL + a tiny 'distillation' LoRA, for tests",
        ),
    }
)


def get_backbone(name: str) -> BackboneSpec:
    """The registered backbone ``name`` (ConfigError listing the names otherwise)."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


# Samplers an adapter's authors use instead of the backbone's own (``with_scheduler``): name ->
# (scheduler class in diffusers or fastface.schedulers, its options).
SCHEDULERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType({
    # PuLID v1's recipe (pulid/pipeline.py): DPM-Solver++(2M), trailing timesteps
    "dpm++2m-trailing": ("DPMSolverMultistepScheduler", _TRAILING),
    # PuLID v1.1's sampler for non-Lightning SDXL (k-diffusion sample_dpmpp_2m, Karras sigmas)
    "dpm++2m-karras-k": ("KarrasDPMSolverPP2MScheduler", _frozen()),
})


def with_scheduler(spec: BackboneSpec, scheduler: str | None = None, cfg_scale: float | None = None) -> BackboneSpec:
    """``spec`` sampled with another scheduler of :data:`SCHEDULERS` and/or another stock CFG scale."""
    changes: dict[str, Any] = {}
    if scheduler is not None and scheduler != "default":
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {scheduler!r}; choose one of: default, {', '.join(SCHEDULERS)}")
        cls_name, kwargs = SCHEDULERS[scheduler]
        changes.update(scheduler=cls_name, scheduler_kwargs=kwargs, timesteps=None, step_kwargs=_frozen(),
                       description=f"{spec.description} (scheduler {scheduler})".strip())
    if cfg_scale is not None:
        if not (isinstance(cfg_scale, (int, float)) and not isinstance(cfg_scale, bool) and 0 < cfg_scale < 100):
            raise ConfigError(f"cfg_scale must be a number in (0, 100), got {cfg_scale!r}")
        changes["cfg_scale"] = float(cfg_scale)
    return replace(spec, **changes) if changes else spec


def make_scheduler(spec: BackboneSpec, base_config: Mapping[str, Any]) -> Any:
    """A fresh scheduler of the backbone's class from the base pipeline's scheduler config."""
    import diffusers

    cls = getattr(diffusers, spec.scheduler, None)
    if cls is None:
        from . import schedulers

        cls = getattr(schedulers, spec.scheduler)
    return cls.from_config(dict(base_config), **dict(spec.scheduler_kwargs))


def _tiny_path(filename: str | None = None) -> Path:
    from .tiny import tiny_model_dir

    root = tiny_model_dir()
    return root / filename if filename else root / "backbone"


def _half(dtype: torch.dtype) -> bool:
    import torch

    return dtype in (torch.float16, torch.bfloat16)


def _base_folder(repo: str, dtype: torch.dtype) -> tuple[Path, str | None]:
    """Local folder of a diffusers pipeline and the weight variant to read from it."""
    half = _half(dtype)
    local = Path(repo).expanduser()
    if local.is_dir():
        variant = "fp16" if half and any(local.glob("unet/*.fp16.safetensors")) else None
        return local, variant
    # Only the files of one precision: the hub repositories hold several copies of every model.
    patterns = ["*.json", "*.txt", "*model.fp16.safetensors" if half else "*model.safetensors"]
    folder = resolve_folder(
        repo,
        what="base model",
        hint=f"download '{repo}' on a connected machine (huggingface-cli download {repo}) "
        "or pass base_model=<local diffusers folder or .safetensors file>",
        allow_patterns=patterns,
    )
    variant = "fp16" if half and any(folder.glob("unet/*.fp16.safetensors")) else None
    return folder, variant


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """diffusers renamed ``torch_dtype`` to ``dtype``; use whichever this version reads without warning."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _from_single_file(path: Path, spec: BackboneSpec, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    from diffusers import StableDiffusionXLPipeline

    # from_single_file needs the diffusers configs of the architecture; take them from the
    # backbone's own base folder (local tiny model or the hub cache) so it works offline.
    config = _tiny_path() if spec.base == TINY else _config_folder(spec.base)
    try:
        return StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), **_dtype_kwarg(dtype))
    except Exception as exc:  # diffusers raises many kinds for a file it cannot map to SDXL
        first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise InputError(f"base model: could not read '{path}' as a single-file SDXL checkpoint ({first_line})") from exc


def _config_folder(repo: str) -> Path:
    return resolve_folder(
        repo,
        what="base model configuration (needed to read a single-file checkpoint)",
        hint=f"download the configs once: huggingface-cli download {repo} --include '*.json' '*.txt'",
        allow_patterns=["*.json", "*.txt"],
    )


def _load_unet_weights(pipe: StableDiffusionXLPipeline, spec: BackboneSpec) -> None:
    import torch

    repo, filename = spec.unet
    path = resolve_file(
        repo,
        filename,
        what=f"{spec.name} UNet",
        hint=f"download '{filename}' from '{repo}' on a connected machine and put it in the hub cache",
    )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    # Load in place into the base UNet (same architecture): no second full-size UNet in memory.
    pipe.unet.load_state_dict(state, strict=True)


def _normalise_loras(loras: Sequence[Any]) -> list[tuple[str, float]]:
    result = []
    for item in loras:
        if isinstance(item, (str, os.PathLike)):
            result.append((str(item), 1.0))
        elif isinstance(item, Sequence) and len(item) == 2:
            path, weight = item
            try:
                result.append((str(path), float(weight)))
            except (TypeError, ValueError):
                raise ConfigError(f"LoRA weight must be a number, got {weight!r} for {path}") from None
        else:
            raise ConfigError(f"a LoRA is a path or a (path, weight) pair, got {item!r}")
    return result


def load_backbone(
    name: str,
    base_model: str | os.PathLike | None = None,
    loras: Sequence[Any] = (),
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    spec: BackboneSpec | None = None,
) -> StableDiffusionXLPipeline:
    """Load backbone ``name`` as a diffusers ``StableDiffusionXLPipeline``.

    ``base_model`` replaces the base (hub id, local diffusers folder or single ``.safetensors``
    file). The distillation LoRA is loaded as PEFT adapter ``fastface_distill`` and style
    ``loras`` (path or (path, weight)) as ``fastface_style_<i>``; all are left unfused and active
    (see :func:`active_lora_weights`) so that an adapter LoRA loaded later keeps them.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    spec = spec if spec is not None else get_backbone(name)  # ``spec``: e.g. with_scheduler(...) of ``name``
    _normalise_loras(loras)  # fail on a bad argument before loading anything
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    base = str(base_model) if base_model is not None else spec.base
    if base == TINY:
        base = str(_tiny_path())
    base_path = Path(base).expanduser()
    if base_path.suffix in (".safetensors", ".ckpt") and base_path.is_file():
        pipe = _from_single_file(base_path, spec, dtype)
    elif base_path.suffix in (".safetensors", ".ckpt"):
        raise MissingWeightsError(f"base model: file '{base}' does not exist")
    else:
        folder, variant = _base_folder(base, dtype)
        try:
            pipe = StableDiffusionXLPipeline.from_pretrained(folder, variant=variant, **_dtype_kwarg(dtype))
        except (OSError, ValueError) as exc:
            raise MissingWeightsError(
                f"base model: '{folder}' is not a complete diffusers SDXL folder ({type(exc).__name__})"
            ) from exc
    if spec.unet is not None:
        _load_unet_weights(pipe, spec)
    if spec.lora is not None:
        repo, filename = spec.lora
        path = _tiny_path(filename) if repo == TINY else resolve_file(
            repo,
            filename,
            what=f"{spec.name} distillation LoRA",
            hint=f"download '{filename}' from '{repo}' on a connected machine and put it in the hub cache",
        )
        pipe.load_lora_weights(str(path), adapter_name=DISTILL_ADAPTER)
    for index, (path, _) in enumerate(_normalise_loras(loras)):
        file = resolve_file(path, None, what=f"style LoRA {index}")
        with warnings.catch_warnings():
            # PEFT warns whenever a second adapter joins a model; several adapters is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            pipe.load_lora_weights(str(file), adapter_name=STYLE_ADAPTER.format(index))
    weights = backbone_lora_weights(spec, loras)
    if weights:
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    pipe.scheduler = make_scheduler(spec, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe


# --------------------------------------------------------------------------- replacement VAEs


@dataclass(frozen=True)
class VaeSpec:
    """A named replacement for the backbone's own VAE (same SDXL latent space)."""

    name: str
    repo: str
    licence: str
    description: str
    fp16_safe: bool  # decodes in float16 without overflow: never cast up to float32


VAES: Mapping[str, VaeSpec] = MappingProxyType(
    {
        "fp16-fix": VaeSpec(
            name="fp16-fix",
            repo="madebyollin/sdxl-vae-fp16-fix",
            licence="SDXL-VAE-FP16-Fix: MIT (madebyollin/sdxl-vae-fp16-fix)",
            description="the SDXL VAE fine-tuned to decode in float16 (no float32 copy, ~same images)",
            fp16_safe=True,
        ),
        "tiny": VaeSpec(
            name="tiny",
            repo="madebyollin/taesdxl",
            licence="TAESDXL: MIT (madebyollin/taesdxl)",
            description="tiny SDXL autoencoder (AutoencoderTiny): a fast, approximate preview decoder",
            fp16_safe=True,
        ),
    }
)
VAE_DEFAULT = "default"
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
_VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


@dataclass(frozen=True)
class VaeChoice:
    """Where a replacement VAE lives and which diffusers class reads it (nothing loaded yet)."""

    name: str  # "fp16-fix", "tiny", or the folder / hub id as given
    source: str  # hub id or local path the files come from
    folder: Path
    class_name: str  # one of VAE_CLASSES
    licence: str
    fp16_safe: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "class": self.class_name}


def resolve_vae(vae: str | os.PathLike) -> VaeChoice:
    """Find a replacement VAE: ``fp16-fix``, ``tiny``, a local diffusers VAE folder or a hub id.

    Only the configuration is read (so a wrong choice fails before the backbone loads); the class
    (AutoencoderKL or AutoencoderTiny) comes from the folder's ``config.json``. A full pipeline
    folder is accepted too: its ``vae/`` subfolder is used.
    """
    import json

    if not isinstance(vae, (str, os.PathLike)):
        raise ConfigError(f"vae must be a name ({', '.join(VAES)}), a folder or a hub id; got {vae!r}")
    name = os.fspath(vae)
    spec = VAES.get(name)
    source = spec.repo if spec is not None else name
    local = Path(source).expanduser()
    if spec is None and not local.exists() and name.count("/") != 1:
        raise ConfigError(
            f"vae must be {VAE_DEFAULT}, {', '.join(VAES)}, a diffusers VAE folder or a hub id; "
            f"'{name}' is none of these"
        )
    folder = resolve_folder(
        source,
        what=f"VAE '{name}'",
        hint=f"download it on a connected machine (huggingface-cli download {source}) "
        "or pass vae=<local diffusers VAE folder> (--vae PATH)",
        allow_patterns=_VAE_FILES,
    )
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingWeightsError(f"VAE '{name}': '{folder}' has no config.json (not a diffusers VAE folder)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"VAE '{name}': cannot read '{config_path}' ({exc})") from exc
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if class_name not in VAE_CLASSES:
        raise InputError(
            f"VAE '{name}': '{config_path}' describes {class_name!r}; expected one of {', '.join(VAE_CLASSES)}"
        )
    return VaeChoice(
        name=name,
        source=source if spec is not None else str(local if local.exists() else source),
        folder=folder,
        class_name=class_name,
        licence=spec.licence if spec is not None else f"see the licence of the VAE '{source}'",
        fp16_safe=spec.fp16_safe if spec is not None else class_name == "AutoencoderTiny",
    )


def vae_scale_factor(vae: Any) -> int:
    """How many pixels one latent covers along each side, from the VAE's configuration."""
    config = vae.config
    if hasattr(config, "block_out_channels"):
        return 2 ** (len(config.block_out_channels) - 1)
    # AutoencoderTiny: every decoder block but the last upsamples.
    return int(config.upsampling_scaling_factor) ** (len(config.num_decoder_blocks) - 1)


def load_vae(choice: VaeChoice, dtype: torch.dtype) -> Any:
    """The VAE of ``choice`` on the CPU in ``dtype`` (eval mode)."""
    import diffusers

    cls = getattr(diffusers, choice.class_name)
    try:
        vae = cls.from_pretrained(choice.folder, **_dtype_kwarg(dtype))
    except (OSError, ValueError, RuntimeError) as exc:
        first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise MissingWeightsError(f"VAE '{choice.name}': cannot load '{choice.folder}' ({first_line})") from exc
    if choice.fp16_safe and getattr(vae.config, "force_upcast", False):
        # Its weights were fine-tuned for float16; an upcast would only cost memory.
        vae.register_to_config(force_upcast=False)
    return vae.eval()


def backbone_lora_weights(spec: BackboneSpec, loras: Sequence[Any] = ()) -> dict[str, float]:
    """PEFT adapter name -> weight for the LoRAs :func:`load_backbone` loads (all stay active)."""
    weights = {DISTILL_ADAPTER: 1.0} if spec.lora is not None else {}
    for index, (_, weight) in enumerate(_normalise_loras(loras)):
        weights[STYLE_ADAPTER.format(index)] = weight
    return weights


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    import torch

    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
