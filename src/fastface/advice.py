"""Options that have no effect in a configuration, said once instead of silently ignored.

:func:`ineffective_options` is pure (it loads nothing): the CLI prints each finding as one
``warning:`` line in flag terms, the Python API (or a server) can show the same findings with keyword
names. A finding is never an error: the run is still what the user asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .guidance import GuidanceConfig, plan_steps

NULL_TEXT_BRANCHES = ("null", "id")  # branches evaluated with the negative (∅) text


@dataclass(frozen=True)
class Ineffective:
    """Option ``option`` (Python keyword name) does nothing here, because ``reason``."""

    option: str
    reason: str

    def message(self, cli: bool = False) -> str:
        from .messages import CLI_FLAGS

        name = CLI_FLAGS.get(self.option, "--" + self.option.replace("_", "-")) if cli else self.option
        return f"{name} has no effect: {self.reason}"


# Attention-manipulation options (names as in AttentionManipulation / the CLI).
AM_OPTIONS = ("am_parts", "am_tokens", "am_power", "am_steps", "attention")


def ineffective_options(
    *,
    method: Any,
    guidance: GuidanceConfig,
    steps: int,
    adapter: Any | None,
    given: Mapping[str, Any],
    face_is_embedding: bool = False,
) -> list[Ineffective]:
    """What of ``given`` (the options the user set explicitly, by keyword name) changes nothing.

    ``method`` is a :class:`~fastface.presets.MethodConfig`, ``guidance`` the resolved guidance,
    ``adapter`` the adapter spec (None: no adapter).
    """
    found: list[Ineffective] = []
    plans = plan_steps(guidance, steps)
    uses_null_text = any(branch in NULL_TEXT_BRANCHES for plan in plans for branch in plan.branches)
    unguided = all(plan.branches == ("full",) for plan in plans)
    if given.get("negative_prompt") and not uses_null_text:
        found.append(Ineffective("negative_prompt", f"method {method.name} on this backbone is CFG-free "
                                 "(no step evaluates the negative text branch)"))
    if unguided:
        for option in ("rescale", "rescale_on"):
            if option in given:
                found.append(Ineffective(option, "no step is guided (α = β = 1), so there is nothing to rescale"))
    if getattr(method, "attention", None) is None:
        for option in AM_OPTIONS:
            if option in given:
                found.append(Ineffective(option, f"method {method.name} has no attention manipulation "
                                         "(use fastface, fastface-softmask or am)"))
    if adapter is None:
        for option in ("ip_scale", "lora_scale", "face_backend", "image_encoder", "adapter_path"):
            if option in given:
                found.append(Ineffective(option, "no identity adapter is loaded"))
    else:
        if "image_encoder" in given and not getattr(adapter, "image_encoder", None):
            found.append(Ineffective("image_encoder", f"the {adapter.name} adapter uses no image encoder"))
    if face_is_embedding:
        for option in ("face_backend", "select", "outlier_threshold", "reject_threshold"):
            if option in given:
                found.append(Ineffective(option, "the face is an embedding file: no photo is analysed"))
    if given.get("no_fuse") and given.get("cpu_offload"):
        found.append(Ineffective("no_fuse", "LoRAs always stay unfused under CPU offload"))
    return found
