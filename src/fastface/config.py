"""One generation configuration for every front end, checked before any model loads.

:class:`GenerationConfig` is what the CLI (``fastface generate``), evaluation runs, the benchmark
and the demo build and hand to the engine; :meth:`GenerationConfig.validate` checks every name and
number against the registries and :class:`Limits` without loading a model. The single-value checks
(``check_steps`` …) are the ones :class:`~fastface.pipeline.FastFacePipeline` itself runs on each
call, so the Python API and the CLI refuse the same values with the same message.

Messages name the option as the library does (``steps``, ``num_images``); the CLI flag is the same
word with dashes (``--steps``, ``--num-images``).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, InputError
from .presets import DEFAULT_IP_SCALE, DEFAULT_LORA_SCALE, DEFAULT_METHOD

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .adapters import AdapterSpec
    from .backbones import BackboneSpec
    from .guidance import GuidanceConfig
    from .presets import MethodConfig

MAX_SEED = 2**63  # seeds are int64 for torch generators: 0 <= seed < 2**63
SDXL_SIZE_MULTIPLE = 32  # the ×8 VAE and three UNet resolutions: latents divisible by 4
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
FROM_METHOD: Any = ...  # the attention manipulation of the method preset (``attention`` unset)


@dataclass(frozen=True)
class Limits:
    """Upper bounds a call refuses up front (raise them for big machines).

    CLI: ``--limits steps=500,size=8192,images=256``; Python: ``Limits(max_steps=500, ...)``.
    """

    max_steps: int = 200
    max_size: int = 4096  # height and width, pixels
    max_images: int = 64  # images of one call (prompts × images per prompt)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limit {f.name} must be a positive integer, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Limits:
        """``"steps=500,size=8192,images=256"`` (any subset) -> Limits."""
        values: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            if not sep or key.strip() not in _LIMIT_KEYS:
                raise ConfigError(f"limits: expected KEY=N with KEY one of {', '.join(_LIMIT_KEYS)}; got {item!r}")
            try:
                values[_LIMIT_KEYS[key.strip()]] = int(raw)
            except ValueError:
                raise ConfigError(f"limits: {key.strip()} must be an integer, got {raw.strip()!r}") from None
        return cls(**values)


DEFAULT_LIMITS = Limits()
_LIMIT_KEYS = MappingProxyType({"steps": "max_steps", "size": "max_size", "images": "max_images"})


# ---------------------------------------------------------------------------------------------
# Single-value checks, shared by GenerationConfig.validate and FastFacePipeline.__call__


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _raise_hint(key: str) -> str:
    return f"raise the limit with --limits {key}=N (Python: Limits(max_{key}=N))"


def check_steps(steps: object, limits: Limits = DEFAULT_LIMITS) -> int:
    if not _is_int(steps) or int(steps) < 1:  # type: ignore[call-overload]
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if int(steps) > limits.max_steps:  # type: ignore[call-overload]
        raise ConfigError(f"steps must be at most {limits.max_steps}, got {steps}; {_raise_hint('steps')}")
    return int(steps)  # type: ignore[call-overload]


def check_size(name: str, value: object, multiple: int, limits: Limits = DEFAULT_LIMITS) -> int:
    """``height``/``width``: a positive multiple of ``multiple``, at most ``limits.max_size``."""
    if not _is_int(value) or int(value) < multiple or int(value) % multiple:  # type: ignore[call-overload]
        raise ConfigError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    if int(value) > limits.max_size:  # type: ignore[call-overload]
        raise ConfigError(f"{name} must be at most {limits.max_size}, got {value}; {_raise_hint('size')}")
    return int(value)  # type: ignore[call-overload]


def check_num_images(per_prompt: object, num_prompts: int = 1, limits: Limits = DEFAULT_LIMITS) -> int:
    if not _is_int(per_prompt) or int(per_prompt) < 1:  # type: ignore[call-overload]
        raise ConfigError(f"num_images must be a positive integer, got {per_prompt!r}")
    total = int(per_prompt) * num_prompts  # type: ignore[call-overload]
    if total > limits.max_images:
        what = f"{num_prompts} prompts × {per_prompt} images = {total}" if num_prompts > 1 else str(total)
        raise ConfigError(f"at most {limits.max_images} images per call, got {what}; {_raise_hint('images')}")
    return int(per_prompt)  # type: ignore[call-overload]


def check_number(value: object, name: str, minimum: float | None = None) -> float:
    """A finite real number (not a bool), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and float(value) < minimum:
        raise ConfigError(f"{name} must be >= {minimum:g}, got {value!r}")
    return float(value)


def check_seeds(seed: object, count: int) -> list[int]:
    """Per-image seeds: ``seed + i`` for an integer, or one integer per image; 0 <= seed < 2**63."""
    if _is_int(seed):
        seeds = [int(seed) + i for i in range(count)]  # type: ignore[call-overload]
    elif isinstance(seed, Sequence) and not isinstance(seed, str) and all(_is_int(s) for s in seed):
        if len(seed) != count:
            raise ConfigError(f"{len(seed)} seeds given for {count} images")
        seeds = [int(s) for s in seed]
    else:
        raise ConfigError(f"seed must be an integer or a list of integers, got {seed!r}")
    for value in seeds:
        if not 0 <= value < MAX_SEED:
            raise ConfigError(f"seeds must be in [0, 2**63), got {value}")
    return seeds


def check_text(value: object, name: str) -> str:
    """A string that is valid Unicode text (no lone surrogate, which no tokenizer can encode)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{name} is not valid Unicode text (a lone surrogate {value[exc.start]!r} at position {exc.start})"
        ) from None
    return value


def check_prompts(value: object, name: str = "prompt") -> list[str]:
    """One prompt or a non-empty list of prompts."""
    if isinstance(value, str):
        return [check_text(value, name)]
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return [check_text(v, name) for v in value]
    raise ConfigError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def check_device(device: object) -> torch.device:
    """``"auto"``/None (the best available), cpu, cuda, cuda:N, mps, or a torch.device; usable here."""
    import torch

    if device is None or device == "auto":
        from .backbones import default_device

        return default_device()
    if isinstance(device, torch.device):
        result = device
    elif isinstance(device, str) and DEVICE_PATTERN.match(device.strip()):
        result = torch.device(device.strip())
    else:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if result.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!s} asked for, but torch sees no CUDA device")
        if result.index is not None and result.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!s} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif result.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {device!s} asked for, but torch sees no MPS device")
    elif result.type != "cpu":
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return result


def check_dtype(dtype: object, device: torch.device | None = None) -> torch.dtype | None:
    """None/"auto" (None: the device's default), a name in DTYPES, or a torch floating dtype."""
    import torch

    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        return getattr(torch, dtype)
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def size_multiple(backbone: str) -> int:
    """What height and width must be a multiple of, for a backbone (before it loads)."""
    if backbone == "tiny":
        from .tiny import TINY_SIZE_MULTIPLE

        return TINY_SIZE_MULTIPLE
    return SDXL_SIZE_MULTIPLE


# ---------------------------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True)
class Resolved:
    """A validated configuration with its registry entries and defaults filled in."""

    config: GenerationConfig
    backbone: BackboneSpec
    adapter: AdapterSpec | None
    method: MethodConfig
    guidance: GuidanceConfig
    steps: int
    height: int
    width: int
    loras: tuple[tuple[str, float], ...]
    face_backend: str | None

    def as_dict(self) -> dict[str, Any]:
        """The resolved parts by name (what ``commands.resolve_config`` has always returned)."""
        return {
            "backbone": self.backbone,
            "adapter": self.adapter,
            "method": self.method,
            "guidance": self.guidance,
            "steps": self.steps,
            "loras": list(self.loras),
            "face_backend": self.face_backend,
        }


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that defines one generation (a CLI command, an evaluation run, a benchmark variant).

    ``prompts`` may be empty for a configuration that is only loaded (the prompts come per call).
    ``seed``: the first image's seed (image i uses seed + i) or one seed per image. ``alpha``,
    ``beta``, ``rescale``, ``rescale_on``, ``decomposition`` override the method's guidance;
    ``attention`` its attention manipulation (None: off; unset: the preset's). ``adapter_options``:
    the adapter's own per-call options (name -> value; e.g. a pose photo), given to its ``encode``. ``loras``: extra
    style LoRAs as (path, weight). ``device``/``dtype``: "auto" or a name. Memory options: ``vae``,
    ``vae_tiling``, ``cpu_offload``; ``fuse_loras`` merges the LoRAs into the UNet once; ``compile``
    compiles the fused UNet and the VAE decode (:meth:`FastFacePipeline.compile`; needs fused LoRAs,
    excludes CPU offload). ``sampler``: a distilled backbone's sampling over ``base_model``, a
    checkpoint with the distillation merged in.
    """

    prompts: tuple[str, ...] = ()
    negative_prompt: str | None = None
    backbone: str = "hyper-4"
    adapter: str | None = "faceid"
    method: str = DEFAULT_METHOD
    steps: int | None = None
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    seed: int | tuple[int, ...] = 0
    ip_scale: float = DEFAULT_IP_SCALE
    lora_scale: float = DEFAULT_LORA_SCALE
    alpha: Any = None
    beta: Any = None
    rescale: float | None = None
    rescale_on: str | None = None
    decomposition: str | None = None
    attention: Any = FROM_METHOD
    identity_mode: str = "mean"
    adapter_options: tuple[tuple[str, Any], ...] = ()
    face_backend: str | None = None
    base_model: str | None = None
    sampler: str | None = None
    scheduler: str | None = None  # backbones.SCHEDULERS name: an adapter's own sampler (PuLID)
    cfg_scale: float | None = None  # the backbone's stock CFG scale, replaced
    adapter_path: str | None = None
    image_encoder: str | None = None
    loras: tuple[tuple[str, float], ...] = ()
    device: str = "auto"
    dtype: str = "auto"
    vae: str | None = None
    vae_tiling: bool = False
    cpu_offload: bool = False
    fuse_loras: bool = True
    compile: bool = False
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        # Lists become tuples so that the configuration stays hashable and immutable.
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))
        elif isinstance(self.prompts, list):
            object.__setattr__(self, "prompts", tuple(self.prompts))
        if isinstance(self.seed, list):
            object.__setattr__(self, "seed", tuple(self.seed))
        if isinstance(self.loras, list):
            object.__setattr__(self, "loras", tuple(tuple(x) for x in self.loras))
        if self.adapter == "none":
            object.__setattr__(self, "adapter", None)
        if isinstance(self.adapter_options, Mapping):
            object.__setattr__(self, "adapter_options", tuple(sorted(self.adapter_options.items())))

    def replace(self, **changes: Any) -> GenerationConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.attention is FROM_METHOD:
            out["attention"] = "method"
        elif self.attention is not None:
            out["attention"] = self.attention.to_dict()
        return out

    def validate(self) -> Resolved:
        """Check every name and number; no model loads. Raises ConfigError/InputError (one line)."""
        from .adapters import spec_for_backbone
        from .attention import AttentionManipulation
        from .backbones import backbone_spec, with_scheduler
        from .guidance import plan_steps
        from .presets import get_method

        if not isinstance(self.limits, Limits):
            raise ConfigError(f"limits must be a Limits, got {type(self.limits).__name__}")
        if self.compile and self.cpu_offload:
            raise ConfigError("compile and cpu_offload cannot be combined")
        if self.compile and not self.fuse_loras:
            # Compiled graphs hold the fused weights: compiling needs the one fixed LoRA weighting.
            raise ConfigError("compile needs fused LoRAs (drop --no-fuse)")
        backbone = with_scheduler(backbone_spec(self.backbone, self.sampler, self.base_model), self.scheduler,
                                  self.cfg_scale)
        adapter = spec_for_backbone(self.adapter, backbone.name) if self.adapter is not None else None
        method = get_method(self.method)
        if self.prompts:
            check_prompts(list(self.prompts))
        if self.negative_prompt is not None:
            check_text(self.negative_prompt, "negative_prompt")
        steps = check_steps(self.steps if self.steps is not None else backbone.steps, self.limits)
        multiple = size_multiple(backbone.name)
        height = check_size("height", self.height if self.height is not None else backbone.resolution,
                            multiple, self.limits)
        width = check_size("width", self.width if self.width is not None else backbone.resolution,
                           multiple, self.limits)
        check_num_images(self.num_images, max(1, len(self.prompts)), self.limits)
        count = max(1, len(self.prompts)) * self.num_images
        if not self.prompts and isinstance(self.seed, Sequence):
            count = len(self.seed)  # the prompts come with each call
        check_seeds(self.seed, count)
        check_number(self.ip_scale, "ip_scale", minimum=0.0)
        check_number(self.lora_scale, "lora_scale")
        if self.attention is not FROM_METHOD and self.attention is not None and not isinstance(
            self.attention, AttentionManipulation
        ):
            raise ConfigError(f"attention must be an AttentionManipulation or None, got {type(self.attention).__name__}")
        if self.identity_mode not in ("mean", "concat"):
            raise ConfigError(f"identity_mode must be one of mean, concat; got {self.identity_mode!r}")
        device = self.device if self.device is not None else "auto"
        if not (isinstance(device, str) and DEVICE_PATTERN.match(device)):
            raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
        check_dtype(self.dtype)
        if self.adapter_options:
            if adapter is None:
                raise ConfigError("adapter_options given, but no adapter is used")
            adapter.check_options(dict(self.adapter_options))
        for path, weight in self.loras:
            check_number(weight, f"weight of LoRA {path!r}")

        guidance = self.guidance(backbone.cfg_scale)
        # Schedules are checked against the step count now, before any model loads.
        plan_steps(guidance, steps)
        face_backend = (self.face_backend or adapter.face_backend) if adapter is not None else None
        return Resolved(self, backbone, adapter, method, guidance, steps, height, width, tuple(self.loras),
                        face_backend)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`FastFacePipeline.from_pretrained` for this configuration."""
        return {
            "backbone": self.backbone,
            "adapter": self.adapter,
            "base_model": self.base_model,
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "cfg_scale": self.cfg_scale,
            "adapter_path": self.adapter_path,
            "image_encoder": self.image_encoder,
            "loras": list(self.loras),
            "device": None if self.device == "auto" else self.device,
            "dtype": self.dtype,
            "vae": self.vae,
            "vae_tiling": self.vae_tiling,
            "cpu_offload": self.cpu_offload,
        }

    def guidance(self, cfg_scale: float) -> GuidanceConfig:
        """The method's guidance (stock CFG at ``cfg_scale`` where it has none) with this config's overrides."""
        from .guidance import GuidanceConfig
        from .presets import get_method, plain_cfg

        method = get_method(self.method)
        guidance = method.guidance if method.guidance is not None else plain_cfg(cfg_scale)
        overrides = {key: getattr(self, key) for key in _GUIDANCE_FIELDS if getattr(self, key) is not None}
        if not overrides:
            return guidance
        values = {k: v for k, v in guidance.to_dict().items() if k in _GUIDANCE_FIELDS}
        return GuidanceConfig(**(values | overrides))

    def with_guidance(self, guidance: GuidanceConfig) -> GenerationConfig:
        """This configuration with every guidance field taken from ``guidance``."""
        values = guidance.to_dict()
        return replace(self, **{key: _hashable(values[key]) for key in _GUIDANCE_FIELDS})

    def call_kwargs(self, cfg_scale: float) -> dict[str, Any]:
        """Keyword arguments of a :class:`FastFacePipeline` call (prompt and face excepted)."""
        return {
            "method": self.method,
            "guidance": self.guidance(cfg_scale),
            "attention": self.attention,
            "negative_prompt": self.negative_prompt,
            "num_images_per_prompt": self.num_images,
            "seed": list(self.seed) if isinstance(self.seed, tuple) else self.seed,
            "steps": self.steps,
            "height": self.height,
            "width": self.width,
            "ip_scale": self.ip_scale,
            "lora_scale": self.lora_scale,
            "identity_mode": self.identity_mode,
            "adapter_options": dict(self.adapter_options),
            "limits": self.limits,
        }


_GUIDANCE_FIELDS = ("alpha", "beta", "rescale", "rescale_on", "decomposition")


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def from_mapping(values: Mapping[str, Any]) -> GenerationConfig:
    """A configuration from a mapping of field names (unknown names refused)."""
    known = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown generation option(s): {', '.join(unknown)}")
    return GenerationConfig(**dict(values))
