"""Writing files the way Unix tools do: one writer for every file eplb writes (maps, loads, traces, reports, plots).

- A new file gets ``0666`` less the umask, like ``open(path, "w")``; an existing file keeps its mode (and its
  owner, where the process may set it).
- A symbolic link is written through: its target is replaced, the link stays.
- The write is atomic: the data goes to a temporary file beside the target, then ``os.replace`` puts it in place,
  so a reader sees the old file or the new one, never half of one; on error the temporary file is removed.
- Every failure (missing folder, a folder in the way, no permission, read-only file system) is an
  :class:`~eplb.EplbError` naming the flag (when the caller gives one), the path and the reason.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from eplb.errors import FormatError

__all__ = ["atomic_path", "check_writable", "new_file_mode"]


def _umask() -> int:
    # Linux reports the umask without changing it; setting and restoring it instead would race with any thread
    # that creates a file in between (the runtime writes maps from a background thread).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(folder: bool = False) -> int:
    """``0666`` (``0777`` for a folder) less the process umask: the mode ``open(path, "w")`` / ``mkdir`` give."""
    return (0o777 if folder else 0o666) & ~_umask()


def _label(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def _target(path: Path, flag: str | None) -> Path:
    """The file to replace: ``path``, or what it links to; raises when that cannot be a file we write."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.is_dir():
        raise FormatError(f"{_label(path, flag)}: is a folder; give a file name")
    parent = target.parent
    if not parent.exists():
        raise FormatError(f"{_label(path, flag)}: folder {parent} does not exist")
    if not parent.is_dir():
        raise FormatError(f"{_label(path, flag)}: {parent} is not a folder")
    return target


def check_writable(path, flag: str | None = None, folder: bool = False) -> None:
    """Raise now, before any long work, when ``path`` could not be written by :func:`atomic_path` (``folder``: when
    files could not be written in the folder ``path``, or in the nearest existing folder above it that would hold it).

    Creates and removes a temporary file there: the only test that covers permissions, read-only and special file
    systems alike.
    """
    path = Path(path)
    if folder:
        where = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor or "."))
        if not where.is_dir():
            raise FormatError(f"{_label(path, flag)}: {where} is a file, not a folder")
    else:
        where = _target(path, flag).parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".eplb-check.", suffix=".tmp", dir=where)
    except OSError as exc:
        raise FormatError(f"{_label(path, flag)}: cannot write in {where}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(tmp)


@contextmanager
def atomic_path(path, flag: str | None = None):
    """Yield a temporary path beside ``path`` (same suffix) to write; on success it replaces ``path`` atomically
    with the mode a Unix tool would give it (see the module docstring), on error it is removed.

    Args:
        path: the file to write (a symbolic link is written through).
        flag: the option that named ``path`` (``"-o"``, ``"--plot"``), used in error messages.

    Raises:
        FormatError: the file cannot be written there (the message names ``flag``, the path and the reason).
    """
    path = Path(path)
    target = _target(path, flag)
    try:
        old = target.stat() if target.exists() else None
        mode = stat.S_IMODE(old.st_mode) if old else new_file_mode()
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix or ".tmp", dir=target.parent)
    except OSError as exc:
        raise FormatError(f"{_label(path, flag)}: cannot write in {target.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode)
        if old and (old.st_uid, old.st_gid) != (os.getuid(), os.getgid()):
            try:  # keep the owner too, where we may (root replacing a service's file)
                os.chown(tmp, old.st_uid, old.st_gid)
            except OSError:
                pass
        os.replace(tmp, target)
    except OSError as exc:
        raise FormatError(f"{_label(path, flag)}: cannot write: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
