"""Atomic, durable file writes: readers see the old file or the complete new one, never a torn one.

The one protocol every writer in the package uses: write a temp file in the target's directory, flush and fsync
it, ``os.replace`` it over the target, then fsync the directory so the rename itself survives a power loss.

Temp files are named ``.tmp-{name}.{pid}.{random}``: hidden, never matching a reader's pattern, and unique, so
two processes writing the same target (e.g. every rank finalising a dataset) each publish a complete file. An
exception removes the temp file; a hard kill leaves it, which ``remove_temp_files`` cleans up where a directory
has a single writer.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

__all__ = [
    "TMP_PREFIX",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "remove_temp_files",
    "replace_durably",
]

TMP_PREFIX = ".tmp-"


def fsync_file(f: IO[Any]) -> None:
    """Flush Python's buffer and the OS cache of an open file to disk."""
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make renames in ``directory`` durable; POSIX only (Windows cannot open a directory; its rename is)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Rename a complete, fsynced ``tmp`` over ``final`` (same directory) and fsync the directory."""
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(error: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``error``, if any: torch.save reports a full disk as its own RuntimeError
    ("inline_container.cc … unexpected pos") with the OSError only in the chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace ``path`` with what ``write`` puts into the binary file it is handed; returns the path.

    The parent directory is created if needed. ``write`` must not close the file. A full disk (or quota) anywhere
    in the write is raised as one ``OSError(ENOSPC)`` naming the path.
    """
    final = Path(path)
    directory = final.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{TMP_PREFIX}{final.name}.{os.getpid()}.{secrets.token_hex(4)}"
    # os.open with O_EXCL instead of mkstemp: mkstemp forces mode 0600, this honours the umask like a normal file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            fsync_file(f)  # data on disk before the rename publishes it
        replace_durably(tmp, final)
    except BaseException as error:
        # Disk full or Ctrl-C must not leave a (possibly multi-GB) temp behind; `final` was never touched.
        _remove_quietly(tmp)
        full = _disk_full(error)
        if full is not None:
            name = errno.errorcode.get(full.errno, "ENOSPC")
            raise OSError(full.errno, f"{os.strerror(full.errno)} ({name}) while writing {final}; nothing was "
                          f"replaced: free space in {directory} and rerun") from error
        raise
    return final


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def remove_temp_files(directory: str | os.PathLike[str]) -> None:
    """Delete the temp files killed writers left in ``directory``; only safe where no other writer is active."""
    for p in Path(directory).glob(f"{TMP_PREFIX}*"):
        if p.is_file():
            _remove_quietly(p)
