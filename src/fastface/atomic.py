"""Files that appear whole or not at all, never over a file they must not replace.

Every writer goes through a temporary file beside its target: written, flushed to disk, then
renamed over the target (``atomic_path``) or linked to a name nobody holds yet (``link_new``).
A full disk becomes one :class:`DiskFullError` line naming the file, and the temporary is removed,
so a half-written file is never left behind nor mistaken for a finished one.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FastFaceError, InputError

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(FastFaceError, OSError):
    """The disk (or the user's quota) filled up while writing a file."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(f"no space left on device while writing {path}; free space and rerun to resume")
        self.path = str(path)


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


@contextmanager
def disk_full_as_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full-disk ``OSError`` inside the block into a :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from None
        raise


def tmp_name(target: Path) -> Path:
    # Hidden, and carrying the pid, so that concurrent writers never share one.
    return target.with_name(f".{target.name}.tmp{os.getpid()}")


def flush_to_disk(path: Path) -> None:
    # A delayed write error (a full disk on a network or copy-on-write file system) shows up here,
    # before the rename, not later as a truncated "finished" file.
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` if the block succeeds.

    On an error the temporary is removed and ``target`` keeps its previous content.
    """
    final = Path(target)
    tmp = tmp_name(final)
    try:
        with disk_full_as_error(final):
            yield tmp
            flush_to_disk(tmp)
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def link_new(tmp: Path, final: Path) -> bool:
    """Give ``final`` the content of ``tmp`` only if no file has that name; False when one does.

    ``tmp`` stays (the caller may try another name). A hard link is the one way to name a file
    that never replaces; where the file system has none (FAT, some shares) an existence check
    and a rename of a copy stand in, which two writers racing for one name could beat.
    """
    with disk_full_as_error(final):
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
        if os.path.lexists(final):
            return False
        copy = tmp.with_name(tmp.name + "-copy")
        try:
            shutil.copyfile(tmp, copy)
            flush_to_disk(copy)
            os.replace(copy, final)
        finally:
            copy.unlink(missing_ok=True)
        return True


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through links, ``..`` or another spelling)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(os.path.realpath(a)) == os.path.abspath(os.path.realpath(b))


def ensure_writable_dir(folder: str | os.PathLike, what: str, *, create: bool = True) -> Path:
    """Prove a file can be written in ``folder`` (created if ``create``), before any long work.

    ``what`` names the option in messages (``--out``, ``--run-dir``). A read-only folder or file
    system, a path under a file, or a full disk is one :class:`InputError` line now, not a
    traceback after minutes of generation. Without ``create`` nothing is left behind: the probe
    is written in the nearest folder that exists.
    """
    path = Path(folder).expanduser()
    if os.path.lexists(path) and not path.is_dir():
        raise InputError(f"{what} {folder} exists and is not a folder")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise InputError(f"{what} {folder} exists and is not a folder") from None
        except NotADirectoryError:
            raise InputError(f"{what} {folder} is under a file, not a folder: {_file_above(path)} is a file") from None
        except OSError as exc:
            _refuse(exc, what, folder, path)
        probe_in = path
    else:
        probe_in = path
        while not probe_in.exists() and probe_in != probe_in.parent:
            if os.path.lexists(probe_in):  # a dangling link
                raise InputError(f"{what} {folder} cannot be created: {probe_in} is a broken link")
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            raise InputError(f"{what} {folder} is under a file, not a folder: {probe_in} is a file")
    probe = probe_in / f".fastface-write-test.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        _refuse(exc, what, folder, probe_in)
    try:
        os.write(fd, b"x")
    except OSError as exc:
        _refuse(exc, what, folder, probe_in)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    return path


def _refuse(exc: OSError, what: str, folder: str | os.PathLike, where: Path) -> None:
    if is_disk_full(exc):
        raise DiskFullError(where) from None
    if exc.errno == errno.EROFS:
        reason = "read-only file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    else:
        reason = (exc.strerror or str(exc)).lower()
    place = "" if Path(where) == Path(folder).expanduser() else f" (in {where})"
    raise InputError(f"{what} {folder} is not writable{place}: {reason}") from None


def _file_above(path: Path) -> Path:
    for parent in [path, *path.parents]:
        try:
            if not stat.S_ISDIR(os.stat(parent).st_mode):
                return parent
        except OSError:
            continue
    return path
