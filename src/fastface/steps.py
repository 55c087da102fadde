"""The batched UNet inputs of every denoising step, assembled once before the loop (pure, torch only).

At step k the engine evaluates the distinct (text, identity) conditions of
``guidance.plan_steps(...)[k].branches`` for all images as ONE UNet call. The batch is
branch-major: chunk j holds every image under condition j. This module builds those stacks from
per-image rows; the engine (``FastFacePipeline``) and the benchmark's naive loop both use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .guidance import StepPlan, branch_conditions


@dataclass(frozen=True)
class StepInputs:
    """Everything one step's batched UNet call needs, except the latents and the timestep.

    ``conditions[j]`` = (with text, with identity) of chunk j; ``rows[branch]`` = the chunk whose
    prediction is that branch's. ``identity_tokens`` (chunks·count, S, C): each row's identity
    tokens (I or ∅), None without an adapter.
    """

    plan: StepPlan
    rows: Mapping[str, int]
    conditions: tuple[tuple[bool, bool], ...]
    count: int
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Mapping[str, torch.Tensor]
    identity_tokens: torch.Tensor | None

    @property
    def num_chunks(self) -> int:
        return len(self.conditions)


def image_rows(num_prompts: int, per_prompt: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per image, the prompt row it comes from: image i of ``num_prompts × per_prompt`` images."""
    return torch.arange(num_prompts, device=device).repeat_interleave(per_prompt)


def sdxl_time_ids(height: int, width: int, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """SDXL's micro-conditioning (original size, crop offset, target size) for an uncropped image: (1, 6)."""
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)


def assemble_step_inputs(
    plans: Sequence[StepPlan],
    *,
    text: torch.Tensor,
    null_text: torch.Tensor,
    pooled: torch.Tensor,
    null_pooled: torch.Tensor,
    time_ids: torch.Tensor,
    identity: torch.Tensor | None = None,
    null_identity: torch.Tensor | None = None,
) -> list[StepInputs]:
    """Branch-major UNet inputs of every step in ``plans``.

    ``text``/``null_text`` (n, L, C) and ``pooled``/``null_pooled`` (n, C_pooled) hold one row per
    image; ``identity``/``null_identity`` are (n or 1, S, C) identity tokens (None: no adapter, so
    "id" collapses onto "null" and "full" onto "text"); ``time_ids`` is (1, 6). Steps with the
    same conditions share their tensors. Nothing here reads a device value.
    """
    count = int(text.shape[0])
    for name, value in (("null_text", null_text), ("pooled", pooled), ("null_pooled", null_pooled)):
        if int(value.shape[0]) != count:
            raise ValueError(f"{name} has {value.shape[0]} rows, text has {count}")
    if (identity is None) != (null_identity is None):
        raise ValueError("give both identity and null_identity, or neither")
    texts = {True: text, False: null_text}
    pools = {True: pooled, False: null_pooled}
    ident = None
    if identity is not None and null_identity is not None:
        ident = {True: identity.expand(count, -1, -1), False: null_identity.expand(count, -1, -1)}
    cache: dict[tuple[tuple[bool, bool], ...], tuple] = {}
    result = []
    for plan in plans:
        conditions, rows = branch_conditions(plan.branches, has_identity=ident is not None)
        if conditions not in cache:
            n = len(conditions)
            states = torch.cat([texts[t] for t, _ in conditions])
            added = {
                "text_embeds": torch.cat([pools[t] for t, _ in conditions]),
                "time_ids": time_ids.expand(n * count, -1),
            }
            tokens = torch.cat([ident[i] for _, i in conditions]) if ident is not None else None
            cache[conditions] = (states, added, tokens)
        states, added, tokens = cache[conditions]
        result.append(StepInputs(plan, rows, conditions, count, states, added, tokens))
    return result
