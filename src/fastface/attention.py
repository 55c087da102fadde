"""Attention manipulation of the identity branch (METHOD.md §3). Pure tensor code (torch only).

The identity branch of a decoupled cross-attention computes ``P = softmax(Q K_ipᵀ / √d)`` of shape
``(B, heads, L, S)`` (L queries, S identity tokens) and outputs ``P V_ip``. A manipulation replaces
P by P′ (never renormalised) and, for ``softmask``, blends the output with the plain one (AdaIN).

Targeting:

- ``parts``: the UNet parts whose ``attn2`` layers are manipulated (default down and up, not mid),
  each with its own parameters.
- ``steps``: loop indices k = 0 … N−1 (None = every step). Schedules are indexed by k itself, not
  by the position among targeted steps; steps past a schedule's end repeat its last value.
- ``tokens``: indices on the S axis (None, the default = every identity token, whatever S is;
  the published ``[0, 1, 2, 3]`` is the 4-token case). With n reference photos of G tokens each
  (G is the adapter's, passed as ``tokens_per_photo``) the adapter sees S = G·n tokens and the
  indices address that concatenated axis. Only the targeted columns of P are replaced; the others
  stay P. For ``softmask`` the token inversion (step 1/5) applies to the first token of every
  photo's group (j mod G = 0; for one photo, or G unknown: token 0), and only where that column is
  targeted. The AdaIN blends then act on whole rows / outputs.

Every statistic is taken per sample, never across the batch, so a sample's result does not depend
on what else is in the batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

PARTS = ("down", "mid", "up")
MODES = ("scale-power", "softmask")
DEFAULT_PARTS = ("down", "up")
DEFAULT_CAP = 10.0


# ---------------------------------------------------------------------------------------------
# Pure functions


def scale_power(probs: Tensor, scale: float, power: float, cap: float = DEFAULT_CAP) -> Tensor:
    """P′ = min(s · P^p, cap)   (published "AM1")."""
    return torch.clamp(scale * probs.pow(power), max=cap)


def softmask(
    probs: Tensor,
    s: float,
    c: float,
    quantile: float = 0.65,
    cap: float = DEFAULT_CAP,
    inverted: Tensor | None = None,
) -> Tensor:
    """Adaptive soft mask T of ``probs`` (B, h, L, S), METHOD §3.2 steps 1–5.

    With X = P[b, h, :, j] over the queries::

        X ← 1 − X                                   for inverted tokens j (default: j = 0)
        τ = max(quantile_q(X), 1e-6)                over queries, before normalisation
        M = N(sigmoid(s · (N(X) − τ)))
        T = min(c · M, cap)
        T ← max_queries(T) − T                      for inverted tokens j

    N(·) is min–max normalisation with min and max per sample and token, jointly over heads and
    queries: (Y − min) / (max − min + 1e-12). ``inverted`` is a boolean (S,) mask.
    """
    if inverted is None:
        inverted = torch.arange(probs.shape[-1], device=probs.device) == 0
    x = torch.where(inverted, 1 - probs, probs)
    tau = quantile_over_queries(x, quantile).clamp_min(1e-6)
    mask = minmax_per_token(torch.sigmoid(s * (minmax_per_token(x) - tau)))
    t = torch.clamp(c * mask, max=cap)
    return torch.where(inverted, t.amax(dim=-2, keepdim=True) - t, t)


def quantile_over_queries(x: Tensor, q: float) -> Tensor:
    """Linear-interpolated q-quantile over the query axis (−2), kept as size 1.

    Same definition as ``torch.quantile`` (which refuses inputs above 16M elements).
    """
    ordered = x.sort(dim=-2).values
    position = q * (x.shape[-2] - 1)
    lo, hi = math.floor(position), math.ceil(position)
    low, high = ordered[..., lo : lo + 1, :], ordered[..., hi : hi + 1, :]
    return low + (position - lo) * (high - low)


def minmax_per_token(y: Tensor) -> Tensor:
    """(Y − min) / (max − min + 1e-12), min/max per sample and token over heads and queries."""
    low = y.amin(dim=(1, 2), keepdim=True)
    high = y.amax(dim=(1, 2), keepdim=True)
    return (y - low) / (high - low + 1e-12)


def adain_blend(x: Tensor, ref: Tensor, weight: float, eps: float = 1e-6) -> Tensor:
    """w·x + (1−w)·((x − mean x) · std ref / (std x + ε) + mean ref), stats over the last axis (unbiased)."""
    mean_x, std_x = x.mean(dim=-1, keepdim=True), x.std(dim=-1, keepdim=True)
    mean_r, std_r = ref.mean(dim=-1, keepdim=True), ref.std(dim=-1, keepdim=True)
    return weight * x + (1 - weight) * ((x - mean_x) * std_r / (std_x + eps) + mean_r)


def adain_map(t: Tensor, probs: Tensor, weight: float = 0.7, eps: float = 1e-6) -> Tensor:
    """P″ = w·T + (1−w)·((T − mean_S T) · std_S P / (std_S T + ε) + mean_S P), per query."""
    return adain_blend(t, probs, weight, eps)


def adain_output(out: Tensor, out0: Tensor, weight: float = 0.7, eps: float = 1e-6) -> Tensor:
    """O ← w·O + (1−w)·((O − mean_d O) · std_d O₀ / (std_d O + ε) + mean_d O₀), per query."""
    return adain_blend(out, out0, weight, eps)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ScalePowerParams:
    """Per-part parameters of ``scale-power``: P′ = min(scale · P^power, cap)."""

    scale: float
    power: float = 1.3

    def __post_init__(self) -> None:
        _check_number(self, "scale", minimum=0.0)
        _check_number(self, "power", minimum=0.0, strict=True)


@dataclass(frozen=True)
class SoftmaskParams:
    """Per-part parameters of ``softmask``: s/c step schedules, quantile q, AdaIN weight w and ε."""

    s: tuple[float, ...] | str = (7.5, 5.0, 5.0, 5.0)
    c: tuple[float, ...] | str = (1.0, 1.55, 1.55, 1.55)
    quantile: float = 0.65
    adain_weight: float = 0.7
    eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "s", _float_tuple(self.s, "softmask s schedule"))
        object.__setattr__(self, "c", _float_tuple(self.c, "softmask c schedule"))
        _check_number(self, "quantile", minimum=0.0, maximum=1.0)
        _check_number(self, "adain_weight", minimum=0.0, maximum=1.0)
        _check_number(self, "eps", minimum=0.0, strict=True)

    def at(self, step: int) -> tuple[float, float]:
        """(s_k, c_k); steps past a schedule's end repeat its last value."""
        return self.s[min(step, len(self.s) - 1)], self.c[min(step, len(self.c) - 1)]


Params = ScalePowerParams | SoftmaskParams
_PARAMS_OF_MODE = {"scale-power": ScalePowerParams, "softmask": SoftmaskParams}


@dataclass(frozen=True)
class AttentionManipulation:
    """Which identity-branch maps are manipulated, how, and where (see the module docstring)."""

    mode: str
    parts: Mapping[str, Params]
    tokens: tuple[int, ...] | str | None = None
    steps: tuple[int, ...] | str | None = None
    cap: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"attention mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        _check_parts(self.mode, self.parts)
        object.__setattr__(self, "parts", dict(self.parts))
        object.__setattr__(self, "tokens", _indices(self.tokens, "attention tokens"))
        object.__setattr__(self, "steps", _indices(self.steps, "attention steps"))
        _check_number(self, "cap", minimum=0.0, strict=True)

    @classmethod
    def scale_power(
        cls,
        *,
        power: float = 1.3,
        s_down: float = 1.55,
        s_up: float = 1.45,
        s_mid: float | None = None,
        parts: Sequence[str] = DEFAULT_PARTS,
        tokens: Sequence[int] | str | None = None,
        steps: Sequence[int] | str | None = None,
        cap: float = DEFAULT_CAP,
        params: Mapping[str, ScalePowerParams] | None = None,
    ) -> AttentionManipulation:
        """METHOD §3.1 defaults; ``s_mid`` (only used when "mid" is targeted) defaults to ``s_down``."""
        scales = {"down": s_down, "mid": s_down if s_mid is None else s_mid, "up": s_up}
        built = {part: ScalePowerParams(scales[part], power) for part in _part_names(parts)}
        return cls("scale-power", _override(built, params), tokens, steps, cap)

    @classmethod
    def softmask(
        cls,
        *,
        s: Sequence[float] | str = (7.5, 5.0, 5.0, 5.0),
        c: Sequence[float] | str = (1.0, 1.55, 1.55, 1.55),
        quantile: float = 0.65,
        adain_weight: float = 0.7,
        eps: float = 1e-6,
        parts: Sequence[str] = DEFAULT_PARTS,
        tokens: Sequence[int] | str | None = None,
        steps: Sequence[int] | str | None = None,
        cap: float = DEFAULT_CAP,
        params: Mapping[str, SoftmaskParams] | None = None,
    ) -> AttentionManipulation:
        """METHOD §3.2 defaults, the same for every targeted part unless ``params`` overrides one."""
        shared = SoftmaskParams(s, c, quantile, adain_weight, eps)
        built = {part: shared for part in _part_names(parts)}
        return cls("softmask", _override(built, params), tokens, steps, cap)

    def targets(self, part: str, step: int) -> bool:
        """Whether the ``attn2`` layers of ``part`` are manipulated at loop index ``step``."""
        _check_part_name(part)
        return part in self.parts and (self.steps is None or step in self.steps)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "parts": {part: _params_dict(p) for part, p in self.parts.items()},
            "tokens": None if self.tokens is None else list(self.tokens),
            "steps": None if self.steps is None else list(self.steps),
            "cap": self.cap,
        }


def _params_dict(params: Params) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}


def _override(built: dict[str, Params], params: Mapping[str, Params] | None) -> dict[str, Params]:
    for part in params or {}:
        if part not in built:
            raise ConfigError(f"attention parameters given for part {part!r}, which is not targeted")
    return {**built, **(params or {})}


def _part_names(parts: Sequence[str] | str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in parts.split(",")) if isinstance(parts, str) else tuple(parts)
    for name in names:
        _check_part_name(name)
    if not names:
        raise ConfigError("attention manipulation needs at least one part (down, mid, up)")
    return names


def _check_part_name(part: str) -> None:
    if part not in PARTS:
        raise ConfigError(f"attention part must be one of {', '.join(PARTS)}; got {part!r}")


def _check_parts(mode: str, parts: Mapping[str, Params]) -> None:
    if not isinstance(parts, Mapping) or not parts:
        raise ConfigError("attention manipulation needs parameters for at least one part (down, mid, up)")
    expected = _PARAMS_OF_MODE[mode]
    for part, params in parts.items():
        _check_part_name(part)
        if not isinstance(params, expected):
            raise ConfigError(
                f"{mode} needs {expected.__name__} for part {part!r}, got {type(params).__name__}"
            )


def _indices(value: Sequence[int] | str | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",")]
        except ValueError:
            raise ConfigError(f"{name} must be comma-separated integers, got {value!r}") from None
    items = tuple(value)
    if not items or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in items):
        raise ConfigError(f"{name} must be a non-empty list of non-negative integers, got {value!r}")
    return tuple(sorted({int(i) for i in items}))


def _float_tuple(value: Sequence[float] | str, name: str) -> tuple[float, ...]:
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError:
            raise ConfigError(f"{name} must be comma-separated numbers, got {value!r}") from None
    items = tuple(value) if isinstance(value, Sequence) else ()
    if not items or not all(_is_finite(v) for v in items):
        raise ConfigError(f"{name} must be a non-empty list of finite numbers, got {value!r}")
    return tuple(float(v) for v in items)


def _is_finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(
    obj: object, name: str, *, minimum: float, maximum: float = math.inf, strict: bool = False
) -> None:
    value = getattr(obj, name)
    above = _is_finite(value) and (value > minimum if strict else value >= minimum)
    if not (above and value <= maximum):
        low = f"> {minimum}" if strict else f">= {minimum}"
        high = f" and <= {maximum}" if maximum < math.inf else ""
        raise ConfigError(f"{type(obj).__name__}.{name} must be a finite number {low}{high}, got {value!r}")
    object.__setattr__(obj, name, float(value))


# ---------------------------------------------------------------------------------------------
# Applying a configuration


def attention_probs(query: Tensor, key: Tensor) -> Tensor:
    """P = softmax(Q Kᵀ / √d) over the token axis: (B, h, L, d), (B, h, S, d) -> (B, h, L, S)."""
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
    return scores.softmax(dim=-1)


def manipulate_probs(
    probs: Tensor, am: AttentionManipulation, part: str, step: int, tokens_per_photo: int | None = None
) -> Tensor:
    """P′ (scale-power) or P″ (softmask map after AdaIN) of ``probs`` (B, h, L, S); P if not targeted.

    ``tokens_per_photo`` (G): the S axis is photos × G tokens; None: one photo (G = S).
    """
    if not am.targets(part, step):
        return probs
    num_tokens = probs.shape[-1]
    targeted = _token_mask(am.tokens, num_tokens, probs.device)
    params = am.parts[part]
    if isinstance(params, ScalePowerParams):
        changed = scale_power(probs, params.scale, params.power, am.cap)
        return changed if targeted is None else torch.where(targeted, changed, probs)
    if num_tokens < 2:
        raise ConfigError("softmask needs at least 2 identity tokens (its AdaIN uses a std over tokens)")
    s, c = params.at(step)
    group = num_tokens if tokens_per_photo is None else tokens_per_photo
    if group < 1 or num_tokens % group:
        raise ConfigError(f"{num_tokens} identity tokens are not whole photos of {group} tokens")
    inverted = torch.arange(num_tokens, device=probs.device) % group == 0
    mask = softmask(probs, s, c, params.quantile, am.cap, inverted)
    mixed = mask if targeted is None else torch.where(targeted, mask, probs)
    return adain_map(mixed, probs, params.adain_weight, params.eps)


def _token_mask(tokens: tuple[int, ...] | None, num_tokens: int, device: torch.device) -> Tensor | None:
    if tokens is None:
        return None
    if tokens[-1] >= num_tokens:
        raise ConfigError(f"attention tokens {list(tokens)} out of range for {num_tokens} identity tokens")
    # Compared one Python int at a time: copying the index list to the device would synchronise.
    columns = torch.arange(num_tokens, device=device)
    mask = columns == tokens[0]
    for token in tokens[1:]:
        mask = mask | (columns == token)
    return mask


def manipulated_ip_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    am: AttentionManipulation | None,
    part: str = "down",
    step: int = 0,
    tokens_per_photo: int | None = None,
) -> Tensor:
    """Identity-branch attention output (before the adapter scale λ), with AM where targeted.

    query (B, h, L, d), key/value (B, h, S, d) -> (B, h, L, d). Untargeted (or ``am`` None): plain
    ``F.scaled_dot_product_attention``, exactly what diffusers' IP-Adapter processor computes.
    Targeted: P = softmax(QKᵀ/√d), output P′V (not renormalised); for softmask P″V blended with
    O₀ = PV by the output AdaIN. The manipulated path runs in float32 for half-precision inputs
    (float64 stays float64) and is cast back to the input dtype.
    """
    _check_part_name(part)
    if am is None or not am.targets(part, step):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False
        )
    work = torch.promote_types(query.dtype, torch.float32)
    q, k, v = query.to(work), key.to(work), value.to(work)
    probs = attention_probs(q, k)
    out = manipulate_probs(probs, am, part, step, tokens_per_photo) @ v
    if am.mode == "softmask":
        params = am.parts[part]
        out = adain_output(out, probs @ v, params.adain_weight, params.eps)
    return out.to(query.dtype)


# ---------------------------------------------------------------------------------------------
# Fused scale-power kernel


def scale_power_log_factor(query: Tensor, key: Tensor, power: float | Tensor) -> Tensor:
    """log of the per-query factor of the fused scale-power kernel, (B, h, L, 1), float32 or wider.

    With logits Z = Q Kᵀ / √d over the S identity tokens, ``P^p = exp(p·Z − p·LSE(Z)) =
    softmax(p·Z) · exp(LSE(p·Z) − p·LSE(Z))``: the factor is the second term. ``power`` may be a
    0-d tensor (a compiled graph then holds no Python number).
    """
    work = torch.promote_types(query.dtype, torch.float32)
    logits = (query.to(work) @ key.to(work).transpose(-1, -2)) * query.shape[-1] ** -0.5
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    return torch.logsumexp(logits * power, dim=-1, keepdim=True) - lse * power


def scale_power_sdpa(query: Tensor, key: Tensor, value: Tensor, power: float | Tensor) -> Tensor:
    """softmax(p · Q Kᵀ / √d) V as one scaled-dot-product attention: p is folded into the S keys."""
    return F.scaled_dot_product_attention(query, key * power, value, attn_mask=None, dropout_p=0.0, is_causal=False)


def fused_scale_power_attention(
    query: Tensor, key: Tensor, value: Tensor, scale: float | Tensor, power: float | Tensor, cap: float = DEFAULT_CAP
) -> Tensor:
    """``s · P^p V`` (scale-power AM on every token) as one SDPA with logit scale p/√d and a per-query factor.

    ``s · P^p = s · softmax(p·Z) · exp(LSE(p·Z) − p·LSE(Z))`` with Z = Q Kᵀ/√d. Since P ≤ 1, the
    cap ``min(·, cap)`` cannot bind while ``s ≤ cap``; above it (only knowable for a Python float)
    the exact capped map is computed instead. query (B, h, L, d), key/value (B, h, S, d) -> (B, h,
    L, d) in the query's dtype; equals :func:`manipulated_ip_attention` (scale-power, every token).
    """
    if not isinstance(scale, Tensor) and scale > cap:
        work = torch.promote_types(query.dtype, torch.float32)
        probs = attention_probs(query.to(work), key.to(work))
        return (scale_power(probs, scale, float(power), cap) @ value.to(work)).to(query.dtype)
    out = scale_power_sdpa(query, key, value, power)
    factor = torch.exp(scale_power_log_factor(query, key, power)) * scale
    return (out * factor.to(out.dtype)).to(query.dtype)
