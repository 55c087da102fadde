"""One writer per run folder: ``RUN_DIR/.lock``, held with ``flock`` for as long as a process writes.

Why ``flock``: the kernel drops the lock when its holder dies however it dies (SIGKILL, power
loss of a client), so a stale lock is never mistaken for a live one and needs no clean-up, while a
process that is merely stopped (SIGSTOP, a suspended laptop) still holds it. The file's content
(pid, host, start time, command) is only there to tell the next process who holds it.

Under ``accelerate launch`` / ``torchrun`` the processes of one launch share the folder: a lone
process holds the lock exclusively; the ranks of a launch (same ``MASTER_ADDR:MASTER_PORT`` and
``TORCHELASTIC_RUN_ID``) each hold it shared, the first one writing the owner record. So a second
command is refused until every rank of the launch has finished, and no rank of a launch is
refused because of another rank of the same launch.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..atomic import disk_full_as_error
from ..errors import FastFaceError

LOCK_NAME = ".lock"


class RunFolderBusy(FastFaceError):
    """Another live process is writing the run folder."""


def launch_group() -> str:
    """Who may share a folder: the processes of one distributed launch, or one process alone."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world > 1:
        return "launch:" + ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _read_owner(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        owner = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None  # being written, or garbage left by a crash: nobody to name yet
    return owner if isinstance(owner, dict) and "pid" in owner else None


def _process_state(pid: int) -> str | None:
    """The state letter of a local process from /proc (``T``: stopped), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else None


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "another process"
    text = f"process {owner.get('pid')} on {owner.get('host')}"
    if owner.get("group", "").startswith("launch:"):
        text += " (a distributed launch)"
    if owner.get("command"):
        text += f" (`{owner['command']}`)"
    if owner.get("started"):
        text += f", since {owner['started']}"
    if owner.get("host") == socket.gethostname() and _process_state(int(owner.get("pid", -1))) == "T":
        text += f"; it is stopped: resume it (`kill -CONT {owner.get('pid')}`) or end it"
    return text


def _command() -> str:
    argv = list(sys.argv)
    if argv and (argv[0].endswith(("fastface", os.path.join("fastface", "cli.py"), os.path.join("fastface", "__main__.py")))):
        argv[0] = "fastface"  # the CLI, however it was started
    return " ".join(argv)


class RunLock:
    """The lock on one run folder; release it (or leave the ``with`` block) when done writing."""

    def __init__(self, run_dir: Path, what: str, wait_s: float = 10.0) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self._acquire(what, wait_s)

    def _acquire(self, what: str, wait_s: float) -> None:
        group = launch_group()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        # A rank of our own launch may be between taking the lock and writing its name: retry a
        # moment. Any other holder is refused at once.
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = _read_owner(fd)
                    if owner is not None and owner.get("group") != group:
                        raise RunFolderBusy(self._busy(what, owner)) from None
                    if owner is not None:
                        try:
                            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                            self.fd = fd
                            return
                        except BlockingIOError:
                            pass  # the launch's first rank is still writing its name
                    if time.monotonic() > deadline:
                        raise RunFolderBusy(self._busy(what, owner)) from None
                    time.sleep(0.05)
                    continue
                # Exclusive: nobody holds the folder; whatever the file says is a finished or dead writer.
                owner = {"pid": os.getpid(), "host": socket.gethostname(), "group": group, "what": what,
                         "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "command": _command()}
                data = json.dumps(owner).encode()
                with disk_full_as_error(self.path):
                    # Over the old bytes first, then cut: no new page is needed for a name of the
                    # same size, so a nearly full disk still gets its owner named.
                    os.pwrite(fd, data, 0)
                    os.ftruncate(fd, len(data))
                if group.startswith("launch:"):
                    # Let the other ranks in; a stranger that slipped in between is caught below.
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    now = _read_owner(fd)
                    if now is None or now.get("group") != group:
                        raise RunFolderBusy(self._busy(what, now))
                self.fd = fd
                return
        except BaseException:
            os.close(fd)
            raise

    def _busy(self, what: str, owner: dict | None) -> str:
        folder = self.path.parent
        return (f"{folder} is being written by {describe_owner(owner)}; one command writes a run folder at a time: "
                f"wait for it to finish (or end it), then rerun `{what}`")

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_folder(run_dir: str | os.PathLike, what: str) -> RunLock:
    """Take the folder for this process (or this launch), or raise :class:`RunFolderBusy` naming the holder."""
    return RunLock(Path(run_dir), what)
