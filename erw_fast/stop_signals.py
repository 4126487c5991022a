"""Stop at a step boundary with a checkpoint when the scheduler says the job is about to end.

A SLURM job at its time limit (or preempted) gets SIGTERM and, ``KillWait`` seconds later (30 by default),
SIGKILL; ``#SBATCH --signal=USR1@300`` asks for SIGUSR1 five minutes ahead. Without a handler everything since
the last periodic checkpoint is lost. The handler only records the signal; the trainer looks at it between steps,
saves and stops, so a resumed run continues exactly (a checkpoint is never written in the middle of a step).

Ranks must stop at the same step (saving is collective). A single process checks after every step; with several
ranks the flag travels in the all-reduce the logging step already makes, so the ranks agree at the next logging
step at no extra cost (set ``logging.log_every`` so that is well within the grace period).

Two things a cluster adds (docs/reliability.md, "Time limits and preemption"):

- The signal reaches the whole process group (torchrun's agent ``killpg``s each worker's session; SLURM signals
  every process of the step), loader worker processes included. They must not die of it, or the trainer fails on
  its dead loader before it can save: ``loader_worker_init`` (run first in every DataLoader / DALI worker)
  ignores the stop signals and SIGINT, and ``children_inherit_blocked`` closes the gap between the fork and that
  call.
- The launcher can die first (the torchrun agent SIGKILLed, the ``deepspeed`` CLI SIGTERMed, which leaves its
  ``launch.py`` and the ranks running). ``LauncherWatch`` notices at the points where the stop flag is looked at
  anyway (a ``getppid`` and a read of ``/proc/<ppid>/stat``; no device sync) and stops the run as for SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

STOPPABLE = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")  # SIGINT stays Ctrl-C: stop now, no checkpoint
# What a loader worker ignores: its trainer decides when to stop (and a Ctrl-C reaches the trainer too).
WORKER_IGNORED = tuple(signal.Signals[n] for n in (*STOPPABLE, "SIGINT"))
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """Linux: the kernel sends ``sig`` to this process when the thread that forked it exits (prctl
    PR_SET_PDEATHSIG). Returns False elsewhere or when prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def loader_worker_init(*_: Any) -> None:
    """First thing in a loader worker process (a DataLoader ``worker_init_fn``; the DALI source's first call):
    ignore the stop signals and SIGINT, which a scheduler or torchrun sends to the whole process group, and die
    with the trainer instead of outliving it (SIGKILL on the parent's death)."""
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED)  # blocked across the fork (below)
    set_parent_death_signal(signal.SIGKILL)


@contextlib.contextmanager
def children_inherit_blocked() -> Iterator[None]:
    """Processes forked inside start with the stop signals and SIGINT blocked, so a signal arriving before
    ``loader_worker_init`` runs in them stays pending (and is then discarded) instead of killing them. This
    process's own mask is restored on exit; a signal that arrived meanwhile is delivered then, not lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ppid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])  # the field after the state
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LauncherWatch:
    """Whether the launcher this rank was started by is still there.

    torchrun: the parent (the elastic agent). ``deepspeed``: the parent (``launch.py``) and, when it is the
    ``deepspeed`` CLI, the grandparent, whose death leaves ``launch.py`` running. A process whose parent dies is
    re-parented at once, so a changed ``getppid()`` (or parent's ppid) is the death, zombie or not. Plain
    ``python train.py`` has no launcher to watch.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.lineage: list[tuple[int, int | None]] = []  # (pid, its expected parent)
        self.lost: str | None = None
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in env
                    else "deepspeed" if "CROSS_RANK" in env or any(a.startswith("--local_rank") for a in sys.argv)
                    else None)
        if launcher is None or not sys.platform.startswith("linux"):
            return
        self.launcher = launcher
        parent = os.getppid()
        grandparent = _ppid_of(parent)
        self.lineage.append((os.getpid(), parent))
        if launcher == "deepspeed" and grandparent and "deepspeed" in _cmdline(grandparent) \
                and "launcher.launch" not in _cmdline(grandparent):
            self.lineage.append((parent, grandparent))
        self._next_check = 0.0

    def dead(self, now: float | None = None, every_s: float = 0.0) -> bool:
        """True once a watched launcher process has died (checked at most every ``every_s`` seconds)."""
        if self.lost is not None:
            return True
        if not self.lineage:
            return False
        now = time.monotonic() if now is None else now
        if now < self._next_check:
            return False
        self._next_check = now + every_s
        for pid, parent in self.lineage:
            current = os.getppid() if pid == os.getpid() else _ppid_of(pid)
            if current != parent:
                self.lost = f"the {self.launcher} launcher (pid {parent}) died"
                return True
        return False


class StopSignals:
    """Records the first of ``names`` the process receives while installed (a context manager)."""

    def __init__(self, names: list[str], launcher: LauncherWatch | None = None) -> None:
        unknown = [n for n in names if n not in STOPPABLE]
        if unknown:
            raise ValueError(f"cannot stop on {unknown}: choose from {list(STOPPABLE)}")
        self.signals = [signal.Signals[n] for n in names]
        self.received: signal.Signals | None = None  # on this process
        self.agreed: signal.Signals | None = None  # the one every rank stops for
        self._previous: dict[signal.Signals, Any] = {}
        self.installed = False
        # A dead launcher counts as SIGTERM (what it would have sent): only where SIGTERM is handled.
        self.launcher = launcher if signal.SIGTERM in self.signals else None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> StopSignals:
        # Python runs handlers in the main thread only, and only it may install them.
        if self.signals and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.installed = False

    def _check_launcher(self, every_s: float = 0.0) -> None:
        if self.received is None and self.launcher is not None and self.launcher.dead(every_s=every_s):
            self.received = signal.SIGTERM

    def votes(self) -> list[float]:
        """One entry per handled signal, 1.0 where this process received it: summed over ranks by the caller."""
        self._check_launcher()
        return [float(self.received == sig) for sig in self.signals]

    def agree(self, votes: Sequence[float]) -> None:
        """Take the ranks' summed votes: the first handled signal any rank received is the one all stop for."""
        if self.agreed is None:
            self.agreed = next((sig for sig, v in zip(self.signals, votes, strict=True) if v > 0), None)

    def due(self, world_size: int) -> signal.Signals | None:
        """The signal to stop for now: a single process needs no agreement, so it stops after any step."""
        if world_size == 1 and self.agreed is None:
            self._check_launcher(every_s=1.0)  # every step here: a clock read, /proc at most once a second
            self.agreed = self.received
        return self.agreed

    def reason(self) -> str:
        """Why the run stops: ``SIGTERM received``, or the launcher's death (this rank's view)."""
        lost = self.launcher.lost if self.launcher is not None else None
        return f"{lost}: stopping as for SIGTERM" if lost and self.agreed == signal.SIGTERM else \
            f"{self.agreed.name if self.agreed else 'no signal'} received"

    def describe(self) -> str:
        if not self.installed:
            return "stop signals: none handled" + (" (not the main thread)" if self.signals else "")
        watched = f"; watching the {self.launcher.launcher} launcher" if self.launcher and self.launcher.lineage else ""
        return ("stop signals: " + ", ".join(s.name for s in self.signals) + " → checkpoint at a step boundary, exit"
                + watched)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended (0 when none came)."""
        return 128 + int(self.agreed) if self.agreed is not None else 0
