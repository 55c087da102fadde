"""The batched UNet inputs of every step (fastface.steps), on small tensors: pure, no model."""

from __future__ import annotations

import pytest
import torch

from fastface.guidance import (
    BRANCH_CONDITIONS,
    GuidanceConfig,
    StepPlan,
    branch_conditions,
    plan_steps,
    unet_evaluations,
)
from fastface.steps import assemble_step_inputs, image_rows, sdxl_time_ids


def rows(n, L=3, C=2, offset=0.0):
    return torch.arange(n * L * C, dtype=torch.float32).reshape(n, L, C) + offset


def inputs(plans, identity=True, n=2):
    kwargs = {}
    if identity:
        kwargs = {"identity": torch.full((1, 4, 5), 7.0), "null_identity": torch.full((1, 4, 5), -7.0)}
    return assemble_step_inputs(
        plans, text=rows(n, offset=100.0), null_text=rows(n, offset=-100.0),
        pooled=torch.ones(n, 6), null_pooled=torch.zeros(n, 6), time_ids=sdxl_time_ids(64, 32), **kwargs,
    )


def test_branch_meaning_is_one_table():
    assert dict(BRANCH_CONDITIONS) == {
        "null": (False, False), "text": (True, False), "id": (False, True), "full": (True, True)}
    conditions, index = branch_conditions(("null", "id", "full"))
    assert conditions == ((False, False), (False, True), (True, True))
    assert index == {"null": 0, "id": 1, "full": 2}
    # Without an adapter "id" is "null" and "full" is "text": evaluated once each.
    conditions, index = branch_conditions(("null", "text", "id", "full"), has_identity=False)
    assert conditions == ((False, False), (True, False)) and index == {"null": 0, "text": 1, "id": 0, "full": 1}


def test_each_chunk_carries_its_branch_text_and_identity():
    plan = StepPlan(1, 1.5, 3.0, 0.75, ("null", "id", "full"))
    [step] = inputs([plan])
    assert step.num_chunks == 3 and step.count == 2
    states = step.encoder_hidden_states.chunk(3)
    tokens = step.identity_tokens.chunk(3)
    pooled = step.added_cond_kwargs["text_embeds"].chunk(3)
    for branch, chunk in step.rows.items():
        with_text, with_id = BRANCH_CONDITIONS[branch]
        assert torch.equal(states[chunk], rows(2, offset=100.0 if with_text else -100.0))
        assert torch.equal(pooled[chunk], torch.ones(2, 6) if with_text else torch.zeros(2, 6))
        assert torch.equal(tokens[chunk], torch.full((2, 4, 5), 7.0 if with_id else -7.0))
    assert step.added_cond_kwargs["time_ids"].shape == (6, 6)
    assert step.added_cond_kwargs["time_ids"][0].tolist() == [64, 32, 0, 0, 64, 32]


def test_steps_with_the_same_conditions_share_tensors_and_counts_follow_the_plan():
    plans = plan_steps(GuidanceConfig(), 4)  # 1st/last step: α=β=1, "id" kept for the rescale reference
    steps = inputs(plans)
    assert [s.num_chunks for s in steps] == [2, 3, 3, 2]
    assert steps[1].encoder_hidden_states is steps[2].encoder_hidden_states
    assert steps[0].identity_tokens is steps[3].identity_tokens
    assert unet_evaluations(plans) == 10 and unet_evaluations(plans, images=2) == 20
    without = inputs(plans, identity=False)
    assert all(s.identity_tokens is None for s in without)
    assert [s.num_chunks for s in without] == [2, 2, 2, 2] == [
        len(branch_conditions(p.branches, False)[0]) for p in plans]


def test_image_rows_and_bad_shapes():
    assert image_rows(2, 3).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="null_text has 1 rows"):
        assemble_step_inputs([], text=rows(2), null_text=rows(1), pooled=torch.ones(2, 6),
                             null_pooled=torch.zeros(2, 6), time_ids=sdxl_time_ids(8, 8))
    with pytest.raises(ValueError, match="both identity and null_identity"):
        assemble_step_inputs([], text=rows(2), null_text=rows(2), pooled=torch.ones(2, 6),
                             null_pooled=torch.zeros(2, 6), time_ids=sdxl_time_ids(8, 8), identity=torch.ones(1, 4, 5))
