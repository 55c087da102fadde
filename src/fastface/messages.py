"""Messages in the user's language: Python keywords for the library, flags under the CLI.

Library code writes hints as Python keywords (``pass base_model=<folder>``), because that is what a
Python caller types. The CLI passes every message it prints (errors and warnings) through
:func:`to_cli`, which rewrites the keywords that have a flag into that flag (``--base-model
<folder>``) and drops hints written ``(Python: ...)``, which have none. One table, :data:`CLI_FLAGS`,
keeps the two vocabularies together.

:func:`quiet_loading` silences the third-party notices that say nothing to a FastFace user
(e.g. diffusers' "No LoRA keys associated to CLIPTextModel": FastFace's LoRAs are UNet-only by
design) around the calls that emit them, and only there: no global filter is set at import.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

# Python keyword -> CLI flag (for the keywords a message can suggest).
CLI_FLAGS: dict[str, str] = {
    "base_model": "--base-model",
    "adapter_path": "--adapter-path",
    "image_encoder": "--image-encoder",
    "vae": "--vae",
    "vae_tiling": "--vae-tiling",
    "cpu_offload": "--cpu-offload",
    "select": "--select",
    "outlier_threshold": "--outlier-threshold",
    "reject_threshold": "--reject-threshold",
    "sampler": "--sampler",
    "backbone": "--backbone",
    "steps": "--steps",
    "negative_prompt": "--negative-prompt",
    "ip_scale": "--ip-scale",
    "seed": "--seed",
    "num_images_per_prompt": "--num-images",
    "height": "--height",
    "width": "--width",
    "device": "--device",
    "dtype": "--dtype",
    "allow_partial": "--allow-partial",
}
_BOOLEAN_FLAGS = {"vae_tiling", "cpu_offload", "allow_partial"}
# Not inside a CLI value: "--limits steps=N,size=N" names limit keys, not keywords.
_KEYWORD = re.compile(r"(?<!--limits )(?<!,)\b(" + "|".join(sorted(CLI_FLAGS, key=len, reverse=True)) + r")=(True\b|<[^>]*>|[^\s,;)]+)?")
_PYTHON_ONLY = re.compile(r"\s*\(Python: [^()]*\)")


def to_cli(message: str) -> str:
    """``message`` with Python keyword hints rewritten as CLI flags, on one line."""

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        if name in _BOOLEAN_FLAGS or value in (None, "True"):
            return CLI_FLAGS[name]
        return f"{CLI_FLAGS[name]} {value.strip(chr(39) + chr(34))}"

    text = _PYTHON_ONLY.sub("", str(message))
    return " ".join(_KEYWORD.sub(flag, text).split())


def show_warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file=None, line: str | None = None) -> None:
    """A ``warnings.showwarning`` for the CLI: ``warning: <message>``, one line, no source path."""
    import sys

    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"warning: {to_cli(str(message))}\n")
    except OSError:  # a closed stderr must not turn a warning into a crash
        pass


# Notices of diffusers/transformers that are expected with FastFace's way of loading.
BENIGN_NOTICES = (
    re.compile(r"No LoRA keys associated to CLIPTextModel"),  # FastFace's LoRAs are UNet-only
    re.compile(r"image_encoder is not loaded since `image_encoder_folder=None`"),  # FastFace loads its own
    re.compile(r"requires torchvision \(not installed\); falling back"),  # torchvision is never a dependency
    re.compile(r"There are modules in UNet2DConditionModel that should be kept in float32: \[\]"),
    re.compile(r"Already found a `peft_config` attribute"),  # several adapters on one model is the point
)


class _BenignFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(pattern.search(text) for pattern in BENIGN_NOTICES)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide :data:`BENIGN_NOTICES` (log records and warnings) for the duration of the block."""
    benign = _BenignFilter()
    for library in ("diffusers", "transformers"):
        try:  # their public get_logger() installs the library's handler, which the filter must sit on
            __import__(f"{library}.utils.logging", fromlist=["get_logger"]).get_logger()
        except ImportError:
            pass
    handlers = [h for name in ("diffusers", "transformers") for h in logging.getLogger(name).handlers]
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for target in (*handlers, *loggers):
        target.addFilter(benign)
    try:
        with warnings.catch_warnings():
            for pattern in BENIGN_NOTICES:
                warnings.filterwarnings("ignore", message=f".*{pattern.pattern}")
            yield
    finally:
        for target in (*handlers, *loggers):
            target.removeFilter(benign)
