"""Resolve model weights from a local path or the Hugging Face hub.

Every loader in FastFace accepts a hub repository id as its default *and* a local file or
directory. When the hub cannot be reached (``HF_HUB_OFFLINE=1`` or no network) and the files are
not in the local cache, the error says what is missing and how to provide it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingWeightsError


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def _looks_local(name: str) -> bool:
    """A hub id is ``owner/name``; anything path-like that does not exist is a local typo."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _missing(what: str, repo: str, filename: str | None, hint: str | None, cause: Exception) -> MissingWeightsError:
    target = f"'{filename}' from '{repo}'" if filename else f"'{repo}'"
    mode = "offline (HF_HUB_OFFLINE=1)" if is_offline() else "the hub could not be reached"
    how = hint or "download it on a connected machine and pass its local path instead"
    return MissingWeightsError(
        f"{what}: {target} is not in the local cache and {mode}; {how} ({type(cause).__name__})"
    )


def resolve_file(
    repo_or_path: str | os.PathLike,
    filename: str | None = None,
    *,
    what: str,
    hint: str | None = None,
    subfolder: str | None = None,
) -> Path:
    """Return a local path to one weights file.

    ``repo_or_path`` may be a local file, a local directory holding ``filename``, or a hub
    repository id from which ``filename`` is downloaded (or found in the cache).
    """
    local = Path(repo_or_path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        candidate = local / (subfolder or "") / (filename or "")
        if filename and candidate.is_file():
            return candidate
        raise MissingWeightsError(f"{what}: '{filename}' not found in local directory '{local}'")
    if filename is None:
        raise MissingWeightsError(f"{what}: '{repo_or_path}' is not a file")
    if _looks_local(str(repo_or_path)):
        raise MissingWeightsError(f"{what}: local path '{repo_or_path}' does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(repo_or_path), filename, subfolder=subfolder))
    except Exception as exc:  # offline, 404, gated, network: all mean "not available here"
        raise _missing(what, str(repo_or_path), filename, hint, exc) from exc


def resolve_folder(
    repo_or_path: str | os.PathLike,
    *,
    what: str,
    hint: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Return a local directory for a model repository (local directory or hub id)."""
    local = Path(repo_or_path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise MissingWeightsError(f"{what}: '{local}' is a file, a directory was expected")
    if _looks_local(str(repo_or_path)):
        raise MissingWeightsError(f"{what}: local directory '{repo_or_path}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(repo_or_path), allow_patterns=allow_patterns))
    except Exception as exc:
        raise _missing(what, str(repo_or_path), None, hint, exc) from exc
