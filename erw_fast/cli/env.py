"""``erw-env``: the environment doctor. Prints GPUs, package versions, optional accelerators, the backend each
trainer component will use, and known-bad settings (see ``erw_fast.doctor``).

    erw-env                      # human-readable report
    erw-env --json               # the same as JSON (for bug reports and CI logs)
    erw-env --strict             # exit 1 when a warning (not an info) was found: a pre-flight check in job scripts
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from erw_fast.doctor import collect_report, format_report, has_warnings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erw-env", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--output", type=Path, help="also write the JSON report to this file")
    p.add_argument("--strict", action="store_true", help="exit 1 if a warning-level finding was reported")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = collect_report()
    text = json.dumps(report, indent=2, sort_keys=False)
    print(text if args.json else format_report(report))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 1 if args.strict and has_warnings(report) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
