"""Errors about what a run reads or writes, and the entry point's one-line report of them.

``InputError`` is a problem with a file (checkpoint, dataset, encoder weights): its message names the file and
says what to do, so a traceback adds nothing for the user. ``one_line_errors`` runs an entry point and turns
those, and ``OSError``s (disk full, permissions), into one ``error: …`` line on stderr with exit code 1;
``--debug`` keeps the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["InputError", "one_line", "one_line_errors"]


class InputError(RuntimeError):
    """A file the run reads or writes is missing, corrupt or does not fit; the message names it and the fix."""


def one_line(error: BaseException) -> str:
    """The error as one line. An exception re-raised by a DataLoader worker carries the worker's traceback in its
    message ("Caught X in DataLoader worker process 0. Original Traceback …"): its last line is the error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:
        return lines[-1]
    return " ".join(lines)


def one_line_errors(main: Callable[[], int], debug: bool = False) -> int:
    """``main()``'s exit code; an ``InputError`` or ``OSError`` escaping it becomes one ``error:`` line and 1."""
    try:
        return main()
    except (InputError, OSError) as error:
        if debug:
            raise
        # Printed by whichever rank hit it: a data or disk problem is usually one rank's.
        print(f"error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr, flush=True)
        return 1
