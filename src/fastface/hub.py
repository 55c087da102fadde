"""Resolve model weights from a local path or the Hugging Face hub.

Every loader in FastFace accepts a hub repository id as its default *and* a local file or
directory. When the hub cannot be reached (``HF_HUB_OFFLINE=1`` or no network) and the files are
not in the local cache, the error says what is missing and how to provide it.

Unreachable hub: ``huggingface_hub`` retries a dead network for ~20 s per file. Before the first
download of a process FastFace asks the endpoint once, with a short timeout
(:func:`hub_reachable`); when it does not answer, every later look-up reads the local cache only and
a missing file fails at once. The answer is memoised per process and per endpoint (the only memo
here: a network does not come back within one command, and ``HF_HUB_OFFLINE=1`` skips the check).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from .errors import InputError, MissingWeightsError

PROBE_TIMEOUT_S = 1.5


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


@functools.lru_cache(maxsize=8)
def _probe(endpoint: str, timeout_s: float) -> tuple[bool, str]:
    """One HEAD request to ``endpoint`` (proxies from the environment apply): any HTTP answer,
    even an error status, means reachable; a refused, unresolvable or silent host means not. The
    request runs in a daemon thread so that a slow name lookup (not covered by socket timeouts)
    cannot hold the caller past ``timeout_s``."""
    import threading
    import urllib.error
    import urllib.request

    start = time.monotonic()
    outcome: list[tuple[bool, str]] = []

    def attempt() -> None:
        request = urllib.request.Request(endpoint + "/api/whoami-v2", method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=timeout_s).close()
        except urllib.error.HTTPError:
            outcome.append((True, ""))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            outcome.append((False, f"{type(reason).__name__} after {time.monotonic() - start:.1f} s"))
        else:
            outcome.append((True, ""))

    worker = threading.Thread(target=attempt, name="fastface-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout_s + 0.25)
    return outcome[0] if outcome else (False, f"no answer within {timeout_s:.1f} s")


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face endpoint answers (False under ``HF_HUB_OFFLINE=1``); asked once per process."""
    if is_offline():
        return False
    return _probe(hub_endpoint(), timeout_s)[0]


def local_only() -> bool:
    """True when look-ups must stay in the local cache: offline mode, or a hub that did not answer."""
    return is_offline() or not hub_reachable()


def offline_reason() -> str:
    """Why nothing can be downloaded, in words, with the switch that skips the network check."""
    if is_offline():
        return "offline (HF_HUB_OFFLINE=1)"
    why = _probe(hub_endpoint(), PROBE_TIMEOUT_S)[1]
    return (f"the hub {hub_endpoint()} cannot be reached ({why}; set HF_HUB_OFFLINE=1 to skip this check "
            "on a machine without network)")


def _looks_local(name: str) -> bool:
    """A hub id is ``owner/name``; anything path-like that does not exist is a local typo."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _missing(what: str, repo: str, filename: str | None, hint: str | None, cause: Exception) -> MissingWeightsError:
    target = f"'{filename}' from '{repo}'" if filename else f"'{repo}'"
    how = hint or "download it on a connected machine and pass its local path instead"
    if local_only():
        return MissingWeightsError(f"{what}: {target} is not in the local cache and {offline_reason()}; {how}")
    first_line = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else ""
    detail = f"{type(cause).__name__}: {first_line}" if first_line else type(cause).__name__
    return MissingWeightsError(f"{what}: {target} could not be downloaded ({detail}); {how}")


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
        return Path(hf_hub_download(str(repo_or_path), filename, subfolder=subfolder, local_files_only=local_only()))
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
        return Path(snapshot_download(str(repo_or_path), allow_patterns=allow_patterns, local_files_only=local_only()))
    except Exception as exc:
        raise _missing(what, str(repo_or_path), None, hint, exc) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def check_weights_file(path: str | os.PathLike, *, what: str) -> None:
    """Refuse a ``.safetensors`` file whose header is unreadable (truncated, not safetensors, "header too
    large") with one :class:`InputError` line, before a loader turns it into a traceback. Reads the
    header only; other formats are checked when they are read (:func:`read_weights`)."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as fh:
            fh.keys()
    except Exception as exc:  # SafetensorError, OSError, ...: all mean "not a usable safetensors file"
        raise InputError(f"{what}: '{p}' is not a readable .safetensors file ({_first_line(exc)})") from None


def read_weights(path: str | os.PathLike, *, what: str) -> dict:
    """A state dict from ``.safetensors`` or a PyTorch pickle (weights only), one line if unreadable."""
    import torch

    p = Path(path)
    check_weights_file(p, what=what)
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a damaged or foreign file
        raise InputError(f"{what}: cannot read '{p}' ({type(exc).__name__}: {_first_line(exc)})") from None
