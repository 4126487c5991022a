"""One trainer per run directory: ``run_dir/run.lock``, held by rank 0 for the whole run.

Two trainers writing one run directory (a job submitted twice, a rerun while orphaned ranks still train) crash on
each other's temp files and interleave ``metrics.jsonl``. The lock is a POSIX record lock (``fcntl.lockf``) on
``run.lock``, which also says who holds it (host, pid, start time):

- the kernel drops it when the holder dies, however it dies (SIGKILL, node reboot for NFS's lock manager): a dead
  holder's lock is taken over without anyone deleting a file;
- it belongs to the process, not to the file descriptor, so loader workers forked by the trainer never hold it;
- where the file system has no working locks (``lockf`` fails with ENOLCK/EOPNOTSUPP, e.g. a Lustre mount
  without ``flock``), the file's existence is the lock: taken over when it names this host and a pid that is no
  longer running, else refused with the command to remove it.

A refusal is one line naming the holder. Taken at start-up, before anything in the directory is written; nothing
in the training step touches it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from erw_fast.errors import InputError

LOCK_NAME = "run.lock"
_HELD: set[str] = set()  # run directories locked by this process (POSIX locks do not exclude their own process)


class RunLockedError(InputError):
    """Another trainer holds the run directory."""


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a trainer whose details are not readable yet"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')} (since {since})"


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw or b"null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _read(path: Path) -> dict[str, Any] | None:
    """The holder's record, read by another process (in the holder, closing this descriptor would drop its lock)."""
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` holds the directory; ``RunLockedError`` names the holder when another has it."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._file_lock = False  # the fallback: the file's existence is the lock
        self.took_over: dict[str, Any] | None = None  # a dead holder's record, when one was found

    def _me(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

    def _refuse(self, holder: dict[str, Any] | None) -> RunLockedError:
        return RunLockedError(
            f"run directory {self.run_dir} is in use by another trainer: {_describe(holder)}. Stop that one first "
            f"(a second writer would interleave its checkpoints and metrics), or choose another run.name")

    def acquire(self) -> RunLock:
        key = str(self.run_dir.resolve())
        if key in _HELD:
            raise self._refuse(self._me())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            import fcntl

            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            os.close(fd)
            return self._acquire_by_existence(key)
        except OSError as error:
            os.close(fd)  # closing any descriptor of the file would drop our POSIX locks: none are held yet
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise self._refuse(_read(self.path)) from None
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return self._acquire_by_existence(key)
            raise
        previous = _parse(os.pread(fd, 1 << 16, 0))  # not _read: closing another descriptor drops the lock
        if previous and "released" not in previous:
            self.took_over = previous  # its holder died holding it (the kernel released the lock)
        data = json.dumps(self._me()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)  # through the locked descriptor: reopening the file would risk the lock
        self._fd = fd
        _HELD.add(key)
        return self

    def _acquire_by_existence(self, key: str) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path.with_suffix(".lock.held"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read(self.path.with_suffix(".lock.held"))
                stale = holder and holder.get("host") == socket.gethostname() and \
                    not _pid_running(int(holder.get("pid", -1)))
                if not stale:
                    raise RunLockedError(
                        f"{self._refuse(holder)} (this file system has no locks: if that trainer is gone, remove "
                        f"{self.path.with_suffix('.lock.held')})") from None
                self.took_over = holder
                self.path.with_suffix(".lock.held").unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._me(), f)
            self._file_lock = True
            _HELD.add(key)
            return self
        raise self._refuse(_read(self.path.with_suffix(".lock.held")))

    def release(self) -> None:
        _HELD.discard(str(self.run_dir.resolve()))
        if self._fd is not None:
            record = json.dumps({**self._me(), "released": time.time()}).encode()
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, record, 0)
            os.close(self._fd)  # drops the lock; the file stays (its record names the last holder)
            self._fd = None
        if self._file_lock:
            self.path.with_suffix(".lock.held").unlink(missing_ok=True)
            self._file_lock = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def describe(self) -> str:
        text = f"run directory lock: {self.path} (this process)"
        if self.took_over:
            text += f"; taken over from {_describe(self.took_over)}, which is gone"
        return text


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, rank: int, world_size: int, log: Callable[[str], None]) -> Iterator[None]:
    """Rank 0 holds the run directory's lock for the block; every rank raises the refusal when it cannot (one
    broadcast at start-up, so no rank goes on into a collective the others never join)."""
    lock, error = RunLock(run_dir), None
    if rank == 0:
        try:
            lock.acquire()
        except RunLockedError as refused:
            error = str(refused)
    if world_size > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunLockedError(error)
    try:
        if rank == 0:
            log(lock.describe())
        yield
    finally:
        lock.release()
