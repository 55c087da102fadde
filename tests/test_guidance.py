"""Decoupled CFG (METHOD §2) against a reference written here from the METHOD text.

The reference works on explicit per-sample Python arithmetic in float64 and always uses every
branch; the library must match it while reading only the branches its plan names.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastface.errors import ConfigError
from fastface.guidance import (
    BRANCHES,
    GuidanceConfig,
    StepPlan,
    combine,
    count_evaluations,
    decoupled_guidance,
    default_schedule,
    plan_steps,
    rescale_guidance,
    resolve_schedule,
)

DECOMPOSITIONS = ("identity-first", "text-first", "independent")
# METHOD §2: "the rescale uses the two non-null branches" of each decomposition.
NON_NULL = {"identity-first": ("id", "full"), "text-first": ("text", "full"), "independent": ("text", "id")}


# ------------------------------------------------------------------------------- reference


def ref_guided(p: dict, decomposition: str, a: float, b: float):
    """The combination exactly as written in METHOD §2 (all branches present)."""
    n, t, i, f = p["null"], p["text"], p["id"], p["full"]
    if decomposition == "identity-first":
        return n + a * (i - n) + b * (f - i)
    if decomposition == "text-first":
        return n + a * (t - n) + b * (f - t)
    return n + a * (t - n) + b * (i - n)


def ref_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def ref_rescale(pred: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor, phi: float) -> torch.Tensor:
    out = torch.empty_like(pred)
    for s in range(pred.shape[0]):
        sa = ref_std(ref_a[s].flatten().tolist())
        sb = ref_std(ref_b[s].flatten().tolist())
        sp = ref_std(pred[s].flatten().tolist())
        out[s] = pred[s] * (phi * (sa + sb) / (2 * sp) + (1 - phi))
    return out


def ref_step(p: dict, decomposition: str, a: float, b: float, phi: float) -> torch.Tensor:
    guided = ref_guided(p, decomposition, a, b)
    if phi > 0:
        ra, rb = NON_NULL[decomposition]
        guided = ref_rescale(guided, p[ra], p[rb], phi)
    return guided


def ref_coefficient(decomposition: str, branch: str, a: float, b: float) -> float:
    """Coefficient of ``branch`` in ε̂: the reference evaluated on a one-hot set of predictions."""
    return ref_guided({name: float(name == branch) for name in BRANCHES}, decomposition, a, b)


def random_preds(seed: int, batch: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Different spreads per branch so that the rescale factor is far from 1.
    return {
        name: torch.randn(batch, 4, 5, 5, generator=gen, dtype=torch.float64) * (1 + k)
        for k, name in enumerate(BRANCHES)
    }


# ------------------------------------------------------------------------------- schedules


def test_default_schedule_published_four_steps():
    assert default_schedule(1.5, 4) == [1.0, 1.5, 1.5, 1.0]
    assert default_schedule(3.0, 4) == [1.0, 3.0, 3.0, 1.0]


@pytest.mark.parametrize("num_steps", range(1, 9))
def test_default_schedule_rule(num_steps):
    values = default_schedule(2.5, num_steps)
    assert len(values) == num_steps
    for k, value in enumerate(values):
        inner = 0 < k < num_steps - 1 and num_steps > 2
        assert value == (2.5 if inner else 1.0)


def test_guidance_inactive_up_to_two_steps():
    for num_steps in (1, 2):
        plans = plan_steps(GuidanceConfig(), num_steps)
        assert all((p.alpha, p.beta) == (1.0, 1.0) for p in plans)


def test_resolve_schedule_forms():
    assert resolve_schedule(None, 5, peak=3.0, name="beta") == [1.0, 3.0, 3.0, 3.0, 1.0]
    assert resolve_schedule(2.0, 3, peak=3.0, name="beta") == [2.0, 2.0, 2.0]
    assert resolve_schedule([1, 2, 3], 3, peak=3.0, name="beta") == [1.0, 2.0, 3.0]
    assert resolve_schedule("1,1.5,1.5,1", 4, peak=3.0, name="alpha") == [1.0, 1.5, 1.5, 1.0]
    assert resolve_schedule(" 2.5 ", 2, peak=3.0, name="alpha") == [2.5, 2.5]
    assert resolve_schedule("4", 1, peak=3.0, name="alpha") == [4.0]


def test_resolve_schedule_wrong_length_message():
    with pytest.raises(ConfigError, match="^alpha schedule has 3 values but 4 steps are run$"):
        resolve_schedule([1.0, 1.5, 1.0], 4, peak=1.5, name="alpha")
    with pytest.raises(ConfigError, match="beta schedule has 2 values but 4 steps"):
        plan_steps(GuidanceConfig(beta="1,2"), 4)


@pytest.mark.parametrize("bad", ["1,,2", "abc", "1,nan", [], [1, "x"], True, float("inf"), {"a": 1}])
def test_resolve_schedule_rejects_garbage(bad):
    with pytest.raises(ConfigError, match="alpha schedule"):
        resolve_schedule(bad, 2, peak=1.5, name="alpha")


def test_config_validation():
    with pytest.raises(ConfigError, match="rescale must be in"):
        GuidanceConfig(rescale=1.5)
    with pytest.raises(ConfigError, match="rescale_on"):
        GuidanceConfig(rescale_on="some")
    with pytest.raises(ConfigError, match="decomposition"):
        GuidanceConfig(decomposition="id-first")
    with pytest.raises(ConfigError, match="positive integer"):
        plan_steps(GuidanceConfig(), 0)


def test_config_normalises_and_serialises():
    config = GuidanceConfig(alpha="1,1.5,1.5,1", beta=2)
    assert config.alpha == (1.0, 1.5, 1.5, 1.0) and config.beta == 2.0
    assert config.to_dict() == {
        "alpha": [1.0, 1.5, 1.5, 1.0],
        "beta": 2.0,
        "rescale": 0.75,
        "rescale_on": "all",
        "decomposition": "identity-first",
    }
    assert GuidanceConfig(alpha=[1.0, 1.5, 1.5, 1.0], beta=2.0) == config


# ------------------------------------------------------------------------------- branch plan


def test_published_plan_counts():
    plans = plan_steps(GuidanceConfig(), 4)
    assert [p.branches for p in plans] == [
        ("id", "full"),
        ("null", "id", "full"),
        ("null", "id", "full"),
        ("id", "full"),
    ]
    assert [(p.alpha, p.beta) for p in plans] == [(1.0, 1.0), (1.5, 3.0), (1.5, 3.0), (1.0, 1.0)]
    assert count_evaluations(plans) == 10
    guided = plan_steps(GuidanceConfig(rescale_on="guided"), 4)
    assert [p.rescale for p in guided] == [0.0, 0.75, 0.75, 0.0]
    assert count_evaluations(guided) == 8


VALUES = (0.0, 1.0, 1.5, 3.0)


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
def test_plan_branches_are_exactly_the_needed_ones(decomposition):
    for a, b, phi, on in itertools.product(VALUES, VALUES, (0.0, 0.75), ("all", "guided")):
        config = GuidanceConfig(alpha=a, beta=b, rescale=phi, rescale_on=on, decomposition=decomposition)
        (plan,) = plan_steps(config, 1)
        applied = phi > 0 and (on == "all" or (a, b) != (1.0, 1.0))
        expected = {name for name in BRANCHES if ref_coefficient(decomposition, name, a, b) != 0}
        if applied:
            expected |= set(NON_NULL[decomposition])
        assert set(plan.branches) == expected, (a, b, phi, on)
        assert list(plan.branches) == sorted(plan.branches, key=BRANCHES.index)
        assert plan.rescale == (phi if applied else 0.0)


# ------------------------------------------------------------------------------- combination


SCHEDULES = [
    (None, None, 4),
    (None, None, 7),
    (2.0, 2.0, 3),
    (1.0, 1.0, 2),
    ([1.0, 2.0, 0.5, 1.0, 3.0], [1.0, 4.0, 0.5, 2.0, 3.0], 5),
    ("1,1.5,1.5,1", "1,3,3,1", 4),
    (0.0, 1.0, 2),
]


@pytest.mark.parametrize("decomposition", DECOMPOSITIONS)
@pytest.mark.parametrize("phi", [0.0, 0.25, 0.75, 1.0])
@pytest.mark.parametrize("rescale_on", ["all", "guided"])
def test_combine_matches_reference(decomposition, phi, rescale_on):
    preds = random_preds(0)
    for alpha, beta, num_steps in SCHEDULES:
        config = GuidanceConfig(alpha, beta, phi, rescale_on, decomposition)
        for plan in plan_steps(config, num_steps):
            # Only the planned branches exist: anything else used would raise a KeyError.
            subset = {name: preds[name] for name in plan.branches}
            got = combine(subset, plan, decomposition)
            want = ref_step(preds, decomposition, plan.alpha, plan.beta, plan.rescale)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_combine_ignores_extra_predictions():
    preds = random_preds(1)
    plan = plan_steps(GuidanceConfig(), 4)[0]
    poisoned = {**preds, "null": torch.full_like(preds["null"], float("nan"))}
    assert torch.isfinite(combine(poisoned, plan, "identity-first")).all()


def test_combine_missing_prediction_or_branch_raises():
    preds = random_preds(2)
    plan = plan_steps(GuidanceConfig(), 4)[1]
    with pytest.raises(ConfigError, match="no prediction for branch"):
        combine({"id": preds["id"], "full": preds["full"]}, plan, "identity-first")
    short = StepPlan(step=1, alpha=1.5, beta=3.0, rescale=0.75, branches=("id", "full"))
    with pytest.raises(ConfigError, match="plan lacks branch"):
        combine(preds, short, "identity-first")


def test_combine_cfg_is_stock_cfg_bitwise():
    preds = random_preds(3)
    for decomposition in ("identity-first", "text-first"):
        (plan,) = plan_steps(GuidanceConfig(alpha=5.0, beta=5.0, rescale=0.0, decomposition=decomposition), 1)
        assert plan.branches == ("null", "full")
        cfg = preds["null"] + 5.0 * (preds["full"] - preds["null"])
        assert torch.equal(combine(preds, plan, decomposition), cfg)
    (plan,) = plan_steps(GuidanceConfig(alpha=1.0, beta=1.0, rescale=0.0), 1)
    assert plan.branches == ("full",)
    assert torch.equal(combine(preds, plan, "identity-first"), preds["full"])


# ------------------------------------------------------------------------------- conformance API


@pytest.mark.parametrize(("a", "b", "phi"), itertools.product((0.5, 1.0, 1.5), (1.0, 3.0), (0.0, 0.75, 1.0)))
def test_decoupled_guidance_matches_reference(a, b, phi):
    p = random_preds(4)
    got = decoupled_guidance(p["null"], p["id"], p["full"], a, b, rescale=phi)
    torch.testing.assert_close(got, ref_step(p, "identity-first", a, b, phi), rtol=1e-10, atol=1e-10)


def test_decoupled_guidance_optional_branches():
    p = random_preds(5)
    u, i, f = p["null"], p["id"], p["full"]
    assert torch.equal(decoupled_guidance(u, None, f, 4.0, 4.0), u + 4.0 * (f - u))
    assert torch.equal(decoupled_guidance(u, i, f, 4.0, 4.0), u + 4.0 * (f - u))
    assert torch.equal(decoupled_guidance(None, None, f, 1.0, 1.0), f)
    torch.testing.assert_close(
        decoupled_guidance(None, i, f, 1.0, 3.0, rescale=0.5), ref_step(p, "identity-first", 1.0, 3.0, 0.5)
    )


@pytest.mark.parametrize(
    ("uncond", "id_only", "a", "b", "phi", "missing"),
    [
        (None, True, 1.5, 3.0, 0.0, "uncond"),
        (True, None, 1.5, 3.0, 0.0, "id_only"),
        (True, None, 2.0, 2.0, 0.75, "id_only"),
        (None, None, 1.0, 1.0, 0.1, "id_only"),
    ],
)
def test_decoupled_guidance_missing_branch(uncond, id_only, a, b, phi, missing):
    p = random_preds(6)
    with pytest.raises(ConfigError, match=f"needs the {missing} prediction"):
        decoupled_guidance(p["null"] if uncond else None, p["id"] if id_only else None, p["full"], a, b, phi)


def test_decoupled_guidance_per_sample_tensors():
    p = random_preds(7)
    alphas, betas = [1.0, 1.5, 2.0], [1.0, 3.0, 0.5]
    got = decoupled_guidance(p["null"], p["id"], p["full"], torch.tensor(alphas), torch.tensor(betas), 0.75)
    for s in range(3):
        one = {k: v[s : s + 1] for k, v in p.items()}
        torch.testing.assert_close(got[s : s + 1], ref_step(one, "identity-first", alphas[s], betas[s], 0.75))
    zero_d = decoupled_guidance(p["null"], p["id"], p["full"], torch.tensor(1.5), torch.tensor(3.0))
    torch.testing.assert_close(zero_d, ref_step(p, "identity-first", 1.5, 3.0, 0.0))
    # A tensor's value is not read (no device sync), so the branch counts as needed.
    with pytest.raises(ConfigError, match="uncond"):
        decoupled_guidance(None, p["id"], p["full"], torch.tensor(1.0), 1.0)
    with pytest.raises(ConfigError, match=r"shape \(3,\)"):
        decoupled_guidance(p["null"], p["id"], p["full"], torch.ones(2), 1.0)


def test_rescale_is_per_sample():
    p = random_preds(8)
    whole = rescale_guidance(p["null"], p["id"], p["full"], 0.6)
    alone = rescale_guidance(p["null"][1:2], p["id"][1:2], p["full"][1:2], 0.6)
    torch.testing.assert_close(whole[1:2], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, ref_rescale(p["null"], p["id"], p["full"], 0.6))
