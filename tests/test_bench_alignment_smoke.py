"""Smoke test of benchmarks/bench_alignment.py: its CPU path, and its timing/reporting code on tiny shapes."""

from __future__ import annotations

import json

import pytest
import torch
from _script_helpers import benchmark_script
from erw_fast.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton with CUDA or TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_alignment") as module:
        yield module


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, main() runs the full GPU benchmark")
def test_cpu_main_runs_preamble_and_exits_zero(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no GPU timing was done" in out and "FAIL" not in out
    assert not any(tmp_path.iterdir())  # the CPU path writes no results


def test_preamble_cases_pass(bench):
    checks = bench.run_correctness_preamble(verbose=False)
    assert len(checks) == 10 and all(c["ok"] for c in checks), checks


def test_slow_cases_get_fewer_repeats(bench):
    # A budget far below one call's time leaves the floor of 3 repeats; a generous one keeps the request.
    device = torch.device("cpu")
    tight = bench.measure(bench.naive_nt_xent, (2, 8, 16), torch.float32, device, reps=20, warmup=5, budget_s=0)
    assert tight["reps"] == 3 and tight["warmup"] == 3 and len(tight["times_ms"]["fwd"]) == 3
    loose = bench.measure(bench.naive_nt_xent, (2, 8, 16), torch.float32, device, reps=4, warmup=1, budget_s=1e6)
    assert loose["reps"] == 4 and len(loose["times_ms"]["fwd_bwd"]) == 4


@pytest.mark.slow
def test_timing_and_report_on_tiny_shapes(bench, tmp_path):
    # The GPU code path minus CUDA events/memory stats: tiny shapes, perf_counter timing, eager "compile".
    progress = []
    records = bench.run_benchmarks(
        torch.device("cuda" if torch.cuda.is_available() else "cpu"),  # where the kernels can run
        nt_xent_shapes=[(24, 16)],
        cosine_shapes=[(2, 8, 16)],
        dtype=torch.float32,
        reps=2,
        warmup=1,
        compile_backend="eager",
        tokens=8,
        verbose=False,
        on_record=lambda done: progress.append(len(done)),
    )
    assert progress == list(range(1, 10))  # called after every case
    assert [r["status"] for r in records] == ["ok"] * 9, [r["status"] for r in records]
    assert all(len(r["times_ms"][phase]) == 2 for r in records for phase in bench.PHASES)
    frozen = {r["impl"]: r for r in records if r["impl"].endswith("/frozen")}
    assert set(frozen) == {"triton/frozen", "naive/frozen"}  # the training case: d proj only, 4 M^2 D FLOPs
    m, d = frozen["naive/frozen"]["M"], frozen["naive/frozen"]["D"]
    rate = frozen["naive/frozen"]["tflops"]["fwd_bwd"] * 1e12 * frozen["naive/frozen"]["median_ms"]["fwd_bwd"] * 1e-3
    assert rate == pytest.approx(4 * m * m * d)
    # A fake OOM record must render as "OOM" everywhere.
    records.append(
        dict(
            kernel="nt_xent",
            impl="naive",
            M=65536,
            D=1024,
            shape=[256, 256, 1024],
            dtype="torch.bfloat16",
            status="OOM",
            times_ms=None,
            peak_extra_mib=None,
        )
    )
    settings = dict(reps=2, warmup=1)
    written = bench.write_report(records, bench.environment(torch.device("cpu")), settings, tmp_path)
    payload = json.loads((tmp_path / "alignment.json").read_text())
    assert payload["results"][-1]["status"] == "OOM" and "fwd_bwd" in payload["flop_formulas"]
    assert {"device", "torch", "triton", "python"} <= payload["environment"].keys()
    table = (tmp_path / "alignment.md").read_text()
    assert "| nt_xent | (3, 8, 16) | triton |" in table and "| OOM |" in table
    assert all(path.exists() for path in written)
