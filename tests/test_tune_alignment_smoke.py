"""benchmarks/tune_alignment_kernels.py end to end on tiny problems under the Triton interpreter.

Timings here mean nothing; what is checked is that every candidate runs through the real launchers (key
splits included), agrees with the default tiles, and that the winners land in a table the kernels read.
"""

from __future__ import annotations

import json

import pytest
import torch
from _script_helpers import benchmark_script
from erw_fast.kernels import triton_available

pytestmark = pytest.mark.skipif(
    not triton_available() or torch.cuda.is_available(), reason="CPU interpreter path (on a GPU it tunes for real)"
)


@pytest.fixture(scope="module")
def tuner():
    with benchmark_script("tune_alignment_kernels") as module:
        yield module


@pytest.mark.slow
def test_tuner_writes_a_table_the_kernels_read(tuner, tmp_path):
    from erw_fast.kernels.tiles import LogitTiles, tuned_tiles

    table = tmp_path / "tuned.json"
    args = ["--out", str(tmp_path), "--table", str(table), "--d", "40", "--rows", "48", "--tokens", "8"]
    args += ["--position-batches", "5", "--dtype", "bf16", "--candidates", "16x16x16w4s1", "32x16x32w4s1"]
    assert tuner.main(args + ["--reps", "1", "--warmup", "0"]) == 0
    records = json.loads((tmp_path / "tune_alignment.json").read_text())["records"]
    # 3 kernels x 2 group sizes x 2 candidates, all correct against the default tiles.
    assert len(records) == 12 and all(r["status"] == "ok" for r in records), records
    assert max(r["max_rel_err"] for r in records) < 2e-2
    name = "cpu (Triton interpreter)"
    for kernel in ("lse", "grad", "lse_grad"):
        for group in (48, 5):
            found = tuned_tiles(name, kernel, torch.bfloat16, 40, group, table)
            assert found in (LogitTiles(16, 16, 16, 4, 1), LogitTiles(32, 16, 32, 4, 1))
    # A second GPU's run merges beside the first instead of replacing it.
    tuner.merge_table(table, "other GPU", {"lse/bf16/D40/G64": "64x64x64w4s3"}, {})
    assert tuned_tiles(name, "lse", torch.bfloat16, 40, 48, table) is not None
    assert tuned_tiles("other GPU", "lse", torch.bfloat16, 40, 48, table) == LogitTiles(64, 64, 64, 4, 3)


def test_a_failing_candidate_is_recorded_not_fatal(tuner, tmp_path, monkeypatch):
    # 16x16x16 "fails" (as a compile error would on some GPU); the other candidate still wins.
    real = tuner.nt_xent._lse

    def flaky(x, *args):
        if tuner.tiles._pinned.get("lse") == tuner.LogitTiles(16, 16, 16, 4, 1):
            raise RuntimeError("simulated compile failure")
        return real(x, *args)

    monkeypatch.setattr(tuner.nt_xent, "_lse", flaky)
    args = ["--out", str(tmp_path), "--kernels", "lse", "--d", "40", "--rows", "48", "--tokens", "8",
            "--position-batches", "--dtype", "fp32", "--candidates", "16x16x16w4s1", "32x16x32w4s1",
            "--reps", "1", "--warmup", "0"]
    assert tuner.main(args) == 0
    records = json.loads((tmp_path / "tune_alignment.json").read_text())["records"]
    assert [r["status"] for r in records] == ["error: RuntimeError: simulated compile failure", "ok"]
    assert "32x16x16w4s1" in (tmp_path / "tune_alignment.md").read_text()  # fp32 halves BLOCK_D


def test_winners_skip_wrong_and_failed_candidates(tuner):
    records = [
        dict(key="k", tiles="a", status="WRONG", median_ms=0.1),
        dict(key="k", tiles="b", status="out of resources: shared memory"),
        dict(key="k", tiles="c", status="ok", median_ms=0.5),
        dict(key="k", tiles="d", status="ok", median_ms=0.3),
    ]
    assert tuner.winners(records) == {"k": "d"}
