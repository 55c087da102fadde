"""Where this copy of FastFace comes from: its distribution name, version and source commit.

The import name is ``fastface``; the *distribution* (what ``pip install`` takes) is ``fastface-id``,
because ``fastface`` on the package index belongs to an unrelated face-detection project. Every
install hint in messages is built here so the two names never get mixed up again.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

DIST_NAME = "fastface-id"


def install_hint(*extras: str) -> str:
    """The pip command installing FastFace with ``extras``, e.g. ``pip install "fastface-id[faces]"``."""
    target = f"{DIST_NAME}[{','.join(extras)}]" if extras else DIST_NAME
    return f'pip install "{target}"'


def source_commit() -> str | None:
    """The git commit of the source tree this package is imported from, or None.

    Only a checkout counts (``src/fastface`` inside the work tree of a git repository); an installed
    wheel has no commit. ``+dirty`` marks uncommitted changes to tracked files.
    """
    package = Path(__file__).resolve().parent
    root = package.parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if commit and dirty else (commit or None)


def describe() -> dict[str, str]:
    """``{"version": ..., "commit": sha or "unreleased (no commit recorded)"}`` for manifests."""
    from . import __version__

    commit = source_commit()
    return {"version": __version__, "commit": commit or "unreleased (no commit recorded)"}
