"""Stop at a step boundary with a checkpoint when the scheduler says the job is about to end.

A SLURM job at its time limit (or preempted) gets SIGTERM and, ``KillWait`` seconds later (30 by default),
SIGKILL; ``#SBATCH --signal=USR1@300`` asks for SIGUSR1 five minutes ahead. Without a handler everything since
the last periodic checkpoint is lost. The handler only records the signal; the trainer looks at it between steps,
saves and stops, so a resumed run continues exactly (a checkpoint is never written in the middle of a step).

Ranks must stop at the same step (saving is collective). A single process checks after every step; with several
ranks the flag travels in the all-reduce the logging step already makes, so the ranks agree at the next logging
step at no extra cost (set ``logging.log_every`` so that is well within the grace period).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

STOPPABLE = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")  # SIGINT stays Ctrl-C: stop now, no checkpoint


class StopSignals:
    """Records the first of ``names`` the process receives while installed (a context manager)."""

    def __init__(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in STOPPABLE]
        if unknown:
            raise ValueError(f"cannot stop on {unknown}: choose from {list(STOPPABLE)}")
        self.signals = [signal.Signals[n] for n in names]
        self.received: signal.Signals | None = None  # on this process
        self.agreed: signal.Signals | None = None  # the one every rank stops for
        self._previous: dict[signal.Signals, Any] = {}
        self.installed = False

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

    def votes(self) -> list[float]:
        """One entry per handled signal, 1.0 where this process received it: summed over ranks by the caller."""
        return [float(self.received == sig) for sig in self.signals]

    def agree(self, votes: Sequence[float]) -> None:
        """Take the ranks' summed votes: the first handled signal any rank received is the one all stop for."""
        if self.agreed is None:
            self.agreed = next((sig for sig, v in zip(self.signals, votes, strict=True) if v > 0), None)

    def due(self, world_size: int) -> signal.Signals | None:
        """The signal to stop for now: a single process needs no agreement, so it stops after any step."""
        if world_size == 1 and self.agreed is None:
            self.agreed = self.received
        return self.agreed

    def describe(self) -> str:
        if not self.installed:
            return "stop signals: none handled" + (" (not the main thread)" if self.signals else "")
        return "stop signals: " + ", ".join(s.name for s in self.signals) + " → checkpoint at a step boundary, exit"

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended (0 when none came)."""
        return 128 + int(self.agreed) if self.agreed is not None else 0
