"""pytest plugin for stage 2 of ``benchmarks/first_light.sh``: every test's outcome goes to the JSON file named by
``FIRST_LIGHT_TESTS_JSON`` as soon as it is known, so a stage stopped by its time limit still reports every test
that finished (a --junitxml report is written only at the end of the session).

    FIRST_LIGHT_TESTS_JSON=out.json PYTHONPATH=benchmarks python -m pytest -p first_light_pytest ...
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}  # a test's outcome is the worst of its phases


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.time()
        self.tests: dict[str, dict[str, Any]] = {}
        self.collection_errors: list[dict[str, str]] = []
        self.session: dict[str, Any] = {"status": "running"}
        self._write()

    def _write(self) -> None:
        counts = {k: sum(t["outcome"] == k for t in self.tests.values()) for k in _RANK}
        # first_light.py record adds the stage's status, exit code and log tail once pytest has exited.
        doc = {"stage": "2_tests", "status": "running", "pytest": self.session, "counts": counts,
               "tests": self.tests, "collection_errors": self.collection_errors,
               "elapsed_s": time.time() - self.started}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, self.path)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collection_errors.append({"nodeid": report.nodeid, "message": str(report.longrepr)[-2000:]})
            self._write()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.tests.setdefault(report.nodeid, {"outcome": "passed", "duration_s": 0.0})
        entry["duration_s"] += report.duration
        if report.failed:
            outcome = "failed" if report.when == "call" else "error"
        elif report.skipped:
            outcome = "skipped"
        else:
            outcome = "passed"
        if _RANK[outcome] > _RANK[entry["outcome"]]:
            entry["outcome"] = outcome
            if report.skipped and isinstance(report.longrepr, tuple):
                entry["reason"] = str(report.longrepr[2])
            elif report.failed:
                entry["message"] = report.longreprtext[-3000:]
        if report.when == "teardown":
            self._write()

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.session = {"status": "finished", "exitstatus": int(exitstatus)}
        self._write()


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get("FIRST_LIGHT_TESTS_JSON")
    if path:
        config.pluginmanager.register(Recorder(Path(path)), "first_light_recorder")
