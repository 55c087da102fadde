"""Real small and read-only file systems for the tests: a tmpfs mounted for the test (needs root,
else the test is skipped), filled up to leave a chosen number of free bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, size: str = "3m", read_only: bool = False) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted at ``path`` for the block (unmounted after)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Write a filler file so that about ``leave_bytes`` stay free on ``folder``'s file system."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


@contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """A folder nobody may write in: a read-only tmpfs as root (root ignores permissions), else mode 555."""
    if os.geteuid() == 0:
        with tmpfs(path, "1m", read_only=True):
            yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)
