"""The alignment kernels compile for A100 (sm_80) and H100 (sm_90) without a GPU, and compile well.

The interpreter tests check the maths; this checks what only compilation shows: every launch a training step
makes compiles with the tiles it would use, no launch spills registers, shared memory fits, and the 16-bit
logit kernels run on pipelined tensor-core dots (wgmma on Hopper). It runs `python -m erw_fast.kernels.aot`
in a process without TRITON_INTERPRET (compiled kernels need it unset at import).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from erw_fast.kernels.aot import ARCHES  # noqa: E402  (after the skip)

BATCH = 32  # M = 32 * 256 = 8192 rows: one H100 node's local batch at a global batch of 256


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "erw_fast.kernels.aot", "--arch", "80", "90", "--dtype", "bf16", "fp32"]
    cmd += ["--d", "768", "1280", "--batch", str(BATCH), "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())["launches"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_launch_compiles_for_both_architectures(reports):
    seen = {(r["arch"], r["dtype"], r["d"], r["name"]) for r in reports}
    names = {"cosine.row_stats", "cosine.bwd", "nt_xent.lse", "nt_xent.grad", "nt_xent.lse_grad",
             "nt_xent.normalize_bwd"}
    for arch in (80, 90):
        for dtype in ("bf16", "fp32"):
            for d in (768, 1280):
                assert {n for a, t, dd, n in seen if (a, t, dd) == (arch, dtype, d)} == names


@pytest.mark.slow
@pytest.mark.multiprocess
def test_no_launch_spills_or_overflows_shared_memory(reports):
    for r in reports:
        where = f"{r['name']} sm_{r['arch']} {r['dtype']} D={r['d']} {r['settings']}"
        assert r["stack_bytes"] == 0, f"{where}: {r['stack_bytes']} bytes spilled"
        assert r["registers"] <= 255, where
        assert r["shared_bytes"] <= ARCHES[r["arch"]].shared_per_block, where
        assert r["resident_per_sm"] >= 1, where


@pytest.mark.slow
@pytest.mark.multiprocess
def test_16bit_logit_kernels_use_pipelined_tensor_cores(reports):
    expected = {80: "mma", 90: "wgmma"}
    logit = [r for r in reports if r["name"] in ("nt_xent.lse", "nt_xent.grad", "nt_xent.lse_grad")
             and r["dtype"] == "bf16"]
    big = [r for r in logit if r["grid"][1] == 1]  # batch negatives: 128-row tiles (position groups are 32)
    assert big
    for r in big:
        assert r["tensor_cores"] == expected[r["arch"]], r
    for r in logit:
        assert r["pipelined"] and r["tensor_cores"] != "none", r


@pytest.mark.slow
@pytest.mark.multiprocess
def test_batch_negative_forward_fills_the_gpu(reports):
    # 8192 rows are 64 query blocks of 128: alone they would fill 64 of 108/132 SMs (under half). The keys
    # are split so that the programs fill their waves (>= 80% of the slots of the waves they take).
    checked = 0
    for r in reports:
        if r["name"] == "nt_xent.lse" and r["grid"][1] == 1 and r["dtype"] == "bf16":
            sms = ARCHES[r["arch"]].sm_count
            programs = r["grid"][0] * r["grid"][2]
            assert r["grid"][2] > 1 and programs / (math.ceil(programs / sms) * sms) >= 0.8, r
            checked += 1
    assert checked == 4


def test_documented_specialisation_rule_agrees_with_the_jit():
    # The fallback rule (for Triton versions without the native helper) must specialise as the JIT does.
    import torch
    from erw_fast.kernels.aot import _documented_rule, _specializer

    native = _specializer()
    if native is _documented_rule:
        pytest.skip("this Triton has no native specialisation helper to compare with")
    values = [1, 0, 16, 768, 37, 2**33, 0.5, torch.zeros(4, dtype=torch.bfloat16), torch.zeros(8)[1:]]
    for value in values:
        assert _documented_rule(value) == tuple(native(value)), value


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_tuning_candidate_compiles_for_hopper_without_spills(tmp_path):
    # The tuner spends GPU time on these; one that spills or cannot fit would waste it (or be picked and slow).
    from erw_fast.kernels.tiles import TUNING_CANDIDATES

    out = tmp_path / "candidates.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "erw_fast.kernels.aot", "--tuning-candidates", "--arch", "90", "--dtype", "bf16",
           "--d", "768", "--batch", str(BATCH), "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    launches = json.loads(out.read_text())["launches"]
    assert len(launches) == sum(len(v) for v in TUNING_CANDIDATES.values())
    for r in launches:
        where = f"{r['name']} {r['settings']}"
        assert r["stack_bytes"] == 0 and r["registers"] <= 255, where
        assert r["shared_bytes"] <= ARCHES[90].shared_per_block and r["tensor_cores"] == "wgmma", where
