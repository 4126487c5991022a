"""Command-line entry points (installed as erw-* scripts)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def run_cli(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
            argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn the expected user errors into one ``prog: error: …`` line and exit code 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: bad or missing flags (already explained on stderr), or --help
        return int(exc.code or 0)
    try:
        run(args)
    except (OSError, ValueError, RuntimeError) as exc:  # OSError: also a full disk or a permission, named
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
