"""Decoupled classifier-free guidance (METHOD.md §2): schedules, branch plan, combination, rescale.

Pure tensor code (torch only). Branch names, one UNet prediction each::

    null = ε(x_t; ∅, ∅)    text = ε(x_t; T, ∅)    id = ε(x_t; ∅, I)    full = ε(x_t; T, I)

Decompositions (α_k, β_k per step k)::

    identity-first  ε̂ = ε∅ + α(εI − ε∅) + β(εTI − εI)  = (1−α)ε∅ + (α−β)εI + β εTI
    text-first      ε̂ = ε∅ + α(εT − ε∅) + β(εTI − εT)  = (1−α)ε∅ + (α−β)εT + β εTI
    independent     ε̂ = ε∅ + α(εT − ε∅) + β(εI − ε∅)   = (1−α−β)ε∅ + α εT + β εI

followed by the rescale toward the spread of the decomposition's two non-null branches.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from torch import Tensor

from .errors import ConfigError

BRANCHES = ("null", "text", "id", "full")
# What each branch conditions on, (text, identity) (METHOD §7): False text = the negative prompt
# or SDXL's zero null text; False identity = the adapter's null identity ∅.
BRANCH_CONDITIONS: Mapping[str, tuple[bool, bool]] = MappingProxyType({
    "null": (False, False),
    "text": (True, False),
    "id": (False, True),
    "full": (True, True),
})
DECOMPOSITIONS = ("identity-first", "text-first", "independent")
RESCALE_ON = ("all", "guided")
ALPHA_PEAK = 1.5
BETA_PEAK = 3.0

# The two non-null branches of each decomposition: their σ drives the rescale.
RESCALE_REFERENCES = {
    "identity-first": ("id", "full"),
    "text-first": ("text", "full"),
    "independent": ("text", "id"),
}

Schedule = float | tuple[float, ...] | None


# ---------------------------------------------------------------------------------------------
# Schedules


def default_schedule(peak: float, num_steps: int) -> list[float]:
    """First and last step 1.0, inner steps ``peak``; with N ≤ 2 every step is 1.0 (no guidance)."""
    _check_num_steps(num_steps)
    if num_steps <= 2:
        return [1.0] * num_steps
    return [1.0] + [float(peak)] * (num_steps - 2) + [1.0]


def resolve_schedule(
    value: float | str | Sequence[float] | None, num_steps: int, *, peak: float, name: str
) -> list[float]:
    """Per-step values from ``None`` (default rule), a constant, a sequence or a "1,1.5,1.5,1" string."""
    _check_num_steps(num_steps)
    value = normalise_schedule(value, name)
    if value is None:
        return default_schedule(peak, num_steps)
    if isinstance(value, float):
        return [value] * num_steps
    if len(value) != num_steps:
        raise ConfigError(f"{name} schedule has {len(value)} values but {num_steps} steps are run")
    return list(value)


def normalise_schedule(value: float | str | Sequence[float] | None, name: str) -> Schedule:
    """``None``, a float, or a tuple of floats; strings are parsed as one number or a comma list."""
    if value is None:
        return None
    if isinstance(value, str):
        return _parse_schedule_string(value, name)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return _finite(value, name)
    if isinstance(value, Sequence) and len(value) > 0:
        return tuple(_finite(v, name) for v in value)
    raise ConfigError(f"{name} schedule must be a number or a non-empty list of numbers, got {value!r}")


def _parse_schedule_string(text: str, name: str) -> Schedule:
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(
            f"{name} schedule {text!r} is not a number or a comma-separated list of numbers"
        ) from None
    checked = tuple(_finite(v, name) for v in values)
    return checked[0] if len(checked) == 1 else checked


def _finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} schedule values must be numbers, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} schedule values must be finite, got {number}")
    return number


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"the number of steps must be a positive integer, got {num_steps!r}")


# ---------------------------------------------------------------------------------------------
# Configuration and branch plan


@dataclass(frozen=True)
class GuidanceConfig:
    """Decoupled-CFG settings; ``alpha``/``beta`` are None (default rule), a constant or per-step values."""

    alpha: Schedule = None
    beta: Schedule = None
    rescale: float = 0.75
    rescale_on: str = "all"
    decomposition: str = "identity-first"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", normalise_schedule(self.alpha, "alpha"))
        object.__setattr__(self, "beta", normalise_schedule(self.beta, "beta"))
        if isinstance(self.rescale, bool) or not isinstance(self.rescale, numbers.Real):
            raise ConfigError(f"rescale must be a number in [0, 1], got {self.rescale!r}")
        if not 0.0 <= float(self.rescale) <= 1.0:
            raise ConfigError(f"rescale must be in [0, 1], got {self.rescale}")
        object.__setattr__(self, "rescale", float(self.rescale))
        if self.rescale_on not in RESCALE_ON:
            raise ConfigError(f"rescale_on must be one of {', '.join(RESCALE_ON)}; got {self.rescale_on!r}")
        if self.decomposition not in DECOMPOSITIONS:
            raise ConfigError(
                f"decomposition must be one of {', '.join(DECOMPOSITIONS)}; got {self.decomposition!r}"
            )

    def to_dict(self) -> dict:
        def plain(value: Schedule) -> float | list[float] | None:
            return list(value) if isinstance(value, tuple) else value

        return {
            "alpha": plain(self.alpha),
            "beta": plain(self.beta),
            "rescale": self.rescale,
            "rescale_on": self.rescale_on,
            "decomposition": self.decomposition,
        }


@dataclass(frozen=True)
class StepPlan:
    """What step ``step`` computes: its α, β, rescale φ (0 = off) and the branches to evaluate."""

    step: int
    alpha: float
    beta: float
    rescale: float
    branches: tuple[str, ...]


def branch_coefficients(decomposition: str, alpha: float, beta: float) -> dict[str, float]:
    """Coefficient of each branch in ε̂ before rescale (see the module docstring)."""
    if decomposition == "identity-first":
        return {"null": 1.0 - alpha, "id": alpha - beta, "full": beta}
    if decomposition == "text-first":
        return {"null": 1.0 - alpha, "text": alpha - beta, "full": beta}
    if decomposition == "independent":
        return {"null": 1.0 - alpha - beta, "text": alpha, "id": beta}
    raise ConfigError(f"decomposition must be one of {', '.join(DECOMPOSITIONS)}; got {decomposition!r}")


def needed_branches(decomposition: str, alpha: float, beta: float, rescale: float) -> tuple[str, ...]:
    """Branches with a non-zero coefficient, plus the rescale references when φ > 0 (canonical order)."""
    coefficients = branch_coefficients(decomposition, alpha, beta)
    needed = {name for name, c in coefficients.items() if c != 0}
    if rescale > 0:
        needed.update(RESCALE_REFERENCES[decomposition])
    return tuple(name for name in BRANCHES if name in needed)


def branch_conditions(
    branches: Sequence[str], has_identity: bool = True
) -> tuple[tuple[tuple[bool, bool], ...], dict[str, int]]:
    """The distinct (text, identity) conditions ``branches`` need, in order, and each branch's index.

    Without an identity condition (no adapter) "id" is "null" and "full" is "text": such
    duplicates are one condition, evaluated once.
    """
    conditions: list[tuple[bool, bool]] = []
    index: dict[str, int] = {}
    for branch in branches:
        with_text, with_id = BRANCH_CONDITIONS[branch]
        key = (with_text, with_id and has_identity)
        if key not in conditions:
            conditions.append(key)
        index[branch] = conditions.index(key)
    return tuple(conditions), index


def unet_evaluations(plans: Sequence[StepPlan], has_identity: bool = True, images: int = 1) -> int:
    """UNet evaluations of a call: distinct conditions per step, times the images."""
    return images * sum(len(branch_conditions(plan.branches, has_identity)[0]) for plan in plans)


def plan_steps(config: GuidanceConfig, num_steps: int) -> list[StepPlan]:
    """The exact per-step branch plan; the needed branches of a step run as one batched UNet call."""
    alphas = resolve_schedule(config.alpha, num_steps, peak=ALPHA_PEAK, name="alpha")
    betas = resolve_schedule(config.beta, num_steps, peak=BETA_PEAK, name="beta")
    plans = []
    for step, (alpha, beta) in enumerate(zip(alphas, betas)):
        guided = (alpha, beta) != (1.0, 1.0)
        rescale = config.rescale if config.rescale_on == "all" or guided else 0.0
        branches = needed_branches(config.decomposition, alpha, beta, rescale)
        plans.append(StepPlan(step, alpha, beta, rescale, branches))
    return plans


def count_evaluations(plans: Sequence[StepPlan]) -> int:
    """UNet sample-evaluations per image for a whole plan."""
    return sum(len(plan.branches) for plan in plans)


# ---------------------------------------------------------------------------------------------
# Combination


def rescale_guidance(pred: Tensor, ref_a: Tensor, ref_b: Tensor, phi: float | Tensor) -> Tensor:
    """ε̂ ← ε̂ · (φ · (σ(a) + σ(b)) / (2σ(ε̂)) + (1 − φ)), σ the unbiased std of each sample."""
    ratio = (_sample_std(ref_a) + _sample_std(ref_b)) / (2 * _sample_std(pred))
    phi = _per_sample(phi, pred)
    return pred * (phi * _per_sample(ratio, pred) + (1 - phi))


def _sample_std(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).std(dim=1)


def _per_sample(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A float as is; a 0-d tensor as is; a (B,) tensor viewed to broadcast over non-batch axes."""
    if not isinstance(value, Tensor) or value.ndim == 0:
        return value
    if value.ndim == 1 and value.shape[0] == like.shape[0]:
        return value.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))
    raise ConfigError(
        f"per-sample guidance values must have shape ({like.shape[0]},), got {tuple(value.shape)}"
    )


def _differs(a: float | Tensor, b: float | Tensor) -> bool:
    # Comparing a tensor's value would need a host-device sync: a tensor counts as different.
    return isinstance(a, Tensor) or isinstance(b, Tensor) or a != b


def _nested_guidance(
    base: Tensor | None, middle: Tensor | None, top: Tensor, alpha: float | Tensor, beta: float | Tensor
) -> Tensor:
    """base + α(middle − base) + β(top − middle); a branch given as None has coefficient 0.

    base None means α = 1, middle None means α = β; α = β gives exactly stock CFG
    ``base + β(top − base)``, α = β = 1 gives ``top`` itself.
    """
    if base is None and middle is None:
        return top
    if middle is None:
        return base + beta * (top - base)
    if base is None:
        return middle + beta * (top - middle)
    return base + alpha * (middle - base) + beta * (top - middle)


def decoupled_guidance(
    uncond: Tensor | None,
    id_only: Tensor | None,
    full: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    rescale: float = 0.0,
) -> Tensor:
    """Identity-first DCG (METHOD §2): ε̂ = ε∅ + α(εI − ε∅) + β(εTI − εI), then the rescale.

    ``uncond`` (ε∅) is needed iff α ≠ 1, ``id_only`` (εI) iff α ≠ β or ``rescale`` > 0; either may be
    None where it is not needed. ``alpha``/``beta`` are floats, 0-d tensors or per-sample (B,)
    tensors; with tensors every branch whose coefficient could be non-zero is required, since
    reading a device value would synchronise.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ConfigError(f"rescale must be in [0, 1], got {rescale}")
    if uncond is None and _differs(alpha, 1.0):
        raise ConfigError(f"decoupled_guidance: alpha={_show(alpha)} needs the uncond prediction, got None")
    if id_only is None and (_differs(alpha, beta) or rescale > 0):
        raise ConfigError(
            f"decoupled_guidance: alpha={_show(alpha)}, beta={_show(beta)}, rescale={rescale} "
            "needs the id_only prediction, got None"
        )
    base = uncond if _differs(alpha, 1.0) else None
    middle = id_only if _differs(alpha, beta) else None
    guided = _nested_guidance(base, middle, full, _per_sample(alpha, full), _per_sample(beta, full))
    if rescale > 0:
        guided = rescale_guidance(guided, id_only, full, rescale)
    return guided


def _show(value: float | Tensor) -> str:
    return "<tensor>" if isinstance(value, Tensor) else f"{value:g}"


def combine(preds: Mapping[str, Tensor], plan: StepPlan, decomposition: str) -> Tensor:
    """ε̂ of one step from the predictions of ``plan.branches`` only (others in ``preds`` are ignored)."""
    coefficients = branch_coefficients(decomposition, plan.alpha, plan.beta)
    active = {name: c for name, c in coefficients.items() if c != 0}
    available = _plan_predictions(preds, plan, decomposition, active)
    if "full" in active:  # a nested decomposition: keep the stock-CFG arithmetic where it applies
        middle = "id" if decomposition == "identity-first" else "text"
        guided = _nested_guidance(
            available.get("null") if "null" in active else None,
            available.get(middle) if middle in active else None,
            available["full"],
            plan.alpha,
            plan.beta,
        )
    else:
        guided = _weighted_sum(available, active)
    if plan.rescale > 0:
        ref_a, ref_b = RESCALE_REFERENCES[decomposition]
        guided = rescale_guidance(guided, available[ref_a], available[ref_b], plan.rescale)
    return guided


def _plan_predictions(
    preds: Mapping[str, Tensor], plan: StepPlan, decomposition: str, active: Mapping[str, float]
) -> dict[str, Tensor]:
    needed = set(active) | (set(RESCALE_REFERENCES[decomposition]) if plan.rescale > 0 else set())
    missing = [name for name in BRANCHES if name in needed and name not in plan.branches]
    if missing:
        raise ConfigError(f"step {plan.step} plan lacks branch(es) {', '.join(missing)} for {decomposition}")
    absent = [name for name in plan.branches if name in needed and name not in preds]
    if absent:
        raise ConfigError(f"step {plan.step}: no prediction for branch(es) {', '.join(absent)}")
    return {name: preds[name] for name in plan.branches if name in needed}


def _weighted_sum(preds: Mapping[str, Tensor], coefficients: Mapping[str, float]) -> Tensor:
    terms = [c * preds[name] for name, c in coefficients.items()]
    return sum(terms[1:], terms[0])
