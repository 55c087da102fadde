"""Method presets: what each named method turns on, and stock CFG as a guidance configuration."""

from __future__ import annotations

import json

import pytest
import torch

from fastface.errors import ConfigError
from fastface.guidance import combine, count_evaluations, plan_steps
from fastface.presets import METHODS, get_method, plain_cfg


def test_method_names():
    assert list(METHODS) == ["fastface", "fastface-softmask", "dcg", "am", "none"]
    assert all(get_method(name).name == name for name in METHODS)


@pytest.mark.parametrize(
    ("name", "has_dcg", "am_mode"),
    [
        ("fastface", True, "scale-power"),
        ("fastface-softmask", True, "softmask"),
        ("dcg", True, None),
        ("am", False, "scale-power"),
        ("none", False, None),
    ],
)
def test_method_components(name, has_dcg, am_mode):
    method = get_method(name)
    assert (method.guidance is not None) == has_dcg
    assert (None if method.attention is None else method.attention.mode) == am_mode
    if has_dcg:  # the published DCG: 10 UNet evaluations at 4 steps
        assert count_evaluations(plan_steps(method.guidance, 4)) == 10
    if method.attention is not None:
        assert set(method.attention.parts) == {"down", "up"}


def test_fastface_uses_published_parameters():
    method = get_method("fastface")
    assert method.attention.parts["down"].scale == 1.55 and method.attention.parts["up"].scale == 1.45
    assert method.guidance.rescale == 0.75 and method.guidance.decomposition == "identity-first"


def test_unknown_method_lists_valid_names():
    with pytest.raises(
        ConfigError, match="unknown method 'fast'; choose one of: fastface, fastface-softmask, dcg, am, none"
    ):
        get_method("fast")


def test_to_dict_is_json_metadata():
    for name, method in METHODS.items():
        data = json.loads(json.dumps(method.to_dict()))
        assert data["name"] == name
        assert (data["guidance"] is None) == (method.guidance is None)
        assert (data["attention"] is None) == (method.attention is None)


def test_plain_cfg_is_stock_cfg():
    gen = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    plans = plan_steps(plain_cfg(5.0), 4)
    assert all(p.branches == ("null", "full") and p.rescale == 0.0 for p in plans)
    for plan in plans:
        got = combine({"null": uncond, "full": cond}, plan, "identity-first")
        assert torch.equal(got, uncond + 5.0 * (cond - uncond))
    assert count_evaluations(plan_steps(plain_cfg(1.0), 4)) == 4
