"""benchmarks/comm_model.py: volumes and times against hand-computed values, sanity orderings, the report files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

MODULE = Path(__file__).resolve().parents[1] / "benchmarks" / "comm_model.py"


@pytest.fixture(scope="module")
def cm():
    spec = importlib.util.spec_from_file_location("comm_model", MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _hw(cm, nvlink_bidir_gbps: float, ib_node_gbps: float, hbm_tbps: float = 1.0):
    return cm.Hardware("test", nvlink_bidir_gbps, ib_node_gbps, "test", hbm_tbps, 100.0, 80.0)


def test_volumes_small_case_by_hand(cm):
    # Ψ = 1000 fp32 elements over N = 4: one reduce-scatter sends 3/4 · 4000 = 3000 bytes per GPU.
    assert cm.unit_bytes(1000, 4, 4) == pytest.approx(3000)
    assert cm.allreduce_bytes(1000, 4, 4) == pytest.approx(6000)
    assert [cm.comm_bytes(e, 1000, 4, 4) for e in ("ddp", "zero1", "zero2", "zero3")] == pytest.approx(
        [6000, 6000, 6000, 9000])
    # bf16 halves everything; one GPU moves nothing.
    assert cm.comm_bytes("zero3", 1000, 4, 2) == pytest.approx(4500)
    assert cm.comm_bytes("ddp", 1000, 1, 4) == 0


def test_hierarchical_split_by_hand(cm):
    # N = 4 as 2 nodes × 2 GPUs, DDP (2 units), Ψ·b = 4000 bytes.
    split = cm.hierarchical_split("ddp", 1000, 4, 2, 4)
    assert (split["gpus_per_node"], split["nodes"]) == (2, 2)
    assert split["nvlink_bytes_per_gpu"] == pytest.approx(2 * 1 / 2 * 4000)  # 4000
    assert split["ib_bytes_per_node"] == pytest.approx(2 * 1 / 2 * 4000)  # 4000 per node…
    assert split["ib_bytes_per_gpu"] == pytest.approx(2000)  # …one NIC per GPU
    # The two links together carry exactly the flat ring volume per GPU.
    assert split["nvlink_bytes_per_gpu"] + split["ib_bytes_per_gpu"] == pytest.approx(cm.comm_bytes("ddp", 1000, 4, 4))
    one_node = cm.hierarchical_split("zero3", 1000, 4, 8, 4)
    assert (one_node["nodes"], one_node["ib_bytes_per_node"]) == (1, 0)
    with pytest.raises(ValueError):
        cm.hierarchical_split("ddp", 1000, 12, 8, 4)


def test_times_by_hand(cm):
    # NVLink 2 GB/s both ways → 1e9 B/s sent; IB 0.5 GB/s per node. Ψ = 1e9 bf16 over 16 GPUs = 2 nodes × 8.
    hw = _hw(cm, nvlink_bidir_gbps=2.0, ib_node_gbps=0.5)
    unit = 7 / 8 * 2e9 / 1e9 + 1 / 2 * 2e9 / 5e8  # 1.75 s NVLink + 2 s IB
    assert cm.unit_time(1e9, 16, 8, 2, hw) == pytest.approx(unit)
    assert cm.comm_time("ddp", 1e9, 16, 8, 2, hw) == pytest.approx(2 * unit)
    assert cm.comm_time("zero3", 1e9, 16, 8, 2, hw) == pytest.approx(3 * unit)
    # One node: only the NVLink phase.
    assert cm.unit_time(1e9, 8, 8, 2, hw) == pytest.approx(7 / 8 * 2e9 / 1e9)


def test_exposed_communication(cm):
    assert cm.exposed_comm("ddp", 1.0, 1.0, 3.0) == 0.0  # 2 s all-reduce under a 3 s backward
    assert cm.exposed_comm("ddp", 2.0, 1.0, 3.0) == pytest.approx(1.0)
    assert cm.exposed_comm("zero1", 1.0, 1.0, 3.0) == pytest.approx(1.0)  # the parameter all-gather after the step
    assert cm.exposed_comm("zero2", 4.0, 1.0, 3.0) == pytest.approx(1.0 + 4.0)
    assert cm.exposed_comm("zero3", 2.0, 1.0, 3.0) == pytest.approx(1.0 + 1.0)
    with pytest.raises(ValueError):
        cm.exposed_comm("fsdp", 1.0, 1.0, 1.0)


def test_optimizer_traffic_and_sharding(cm):
    assert cm.optimizer_bytes_per_param(("adamw",)) == 4 * (4 + 3)
    assert cm.optimizer_bytes_per_param(("ema",)) == 4 * 3
    assert cm.optimizer_bytes_per_param() == 28 + 12 + 12
    full = cm.optimizer_time("ddp", 1e9, 8, 1.0)
    assert full == pytest.approx(52e9 / 1e12)
    for engine in ("zero1", "zero2", "zero3"):
        for n in (2, 8, 64):
            assert cm.optimizer_time(engine, 1e9, n, 1.0) == pytest.approx(full / n)


def test_model_states_by_hand(cm):
    assert cm.model_state_bytes("ddp", 1000, 4) == pytest.approx(20_000)
    assert cm.model_state_bytes("zero1", 1000, 4) == pytest.approx(4000 + 4000 + 12_000 / 4)
    assert cm.model_state_bytes("zero2", 1000, 4) == pytest.approx(4000 + 16_000 / 4)
    assert cm.model_state_bytes("zero3", 1000, 4) == pytest.approx(20_000 / 4)


@pytest.mark.parametrize("n", [2, 8, 64, 512])
def test_monotonic_sanity(cm, n):
    b = [cm.comm_bytes(e, 683e6, n, 4) for e in ("ddp", "zero1", "zero2", "zero3")]
    assert b[0] == b[1] == b[2] < b[3]
    assert b[3] == pytest.approx(1.5 * b[2])
    states = [cm.model_state_bytes(e, 683e6, n) for e in ("ddp", "zero1", "zero2", "zero3")]
    assert states == sorted(states, reverse=True)
    # More GPUs: per-GPU volume grows toward 2Ψ·b, never past it.
    assert cm.comm_bytes("ddp", 683e6, n, 4) < cm.comm_bytes("ddp", 683e6, 2 * n, 4) < 2 * 683e6 * 4


def test_parameter_counts_match_hand_formula(cm):
    d, h, p, z = 1152, 4 * 1152, 2048, 768
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + (d * 6 * d + 6 * d)
    embed = (4 * 2 * 2 * d + d) + (256 * d + d) + (d * d + d) + 1001 * d  # patch, timestep MLP, labels (+ null)
    final = (d * 2 * d + 2 * d) + (d * 2 * 2 * 4 + 2 * 2 * 4)
    proj = (d * p + p) + (p * p + p) + (p * z + z)
    counts = cm.trainable_params()
    assert counts["full"] == embed + 28 * block + final + proj == 683_242_512 - 256 * d  # README total − pos_embed
    assert counts["sit_only"] == embed + 28 * block + final
    assert counts["warmup"] == embed + 4 * block + proj


def test_compute_split_and_peaks(cm):
    from erw_fast.cli.bench import peak_bf16_tflops
    from erw_fast.config import load_config
    from erw_fast.flops import step_flops

    total = step_flops(load_config(cm.CONFIG), "full")["total"]
    for n, batch in ((8, 32), (64, 4)):
        c = cm.step_compute("full", n)
        assert c["per_gpu_batch"] == batch
        assert c["forward_flops"] + c["backward_flops"] == pytest.approx(total / n)
    for hw in cm.HARDWARE.values():  # the same data-sheet peaks as erw-bench's MFU
        assert hw.peak_bf16_tflops == peak_bf16_tflops(hw.name)


def test_report_written(cm, tmp_path, capsys):
    assert cm.main(["--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "comm_model.md").read_text()
    data = json.loads((tmp_path / "comm_model.json").read_text())
    assert "analytic, nothing measured" in md and data["kind"] == "analytic, nothing measured"
    assert "| H100 SXM | 64 | 4 | ZeRO-3 |" in md and "## Recommendation" in md
    assert len(data["rows"]) == 2 * 2 * 3 * 4  # phases × worlds × hardware × engines
    assert set(data["formulas"]) >= {"comm_bytes_per_gpu", "hierarchical_time", "optimizer_ema_time"}
    assert data["recommendation"] and data["recommendation"] in md
    row = next(r for r in data["rows"] if (r["phase"], r["hardware_key"], r["world_size"], r["engine"])
               == ("full", "H100", 8, "ddp"))
    psi = data["settings"]["trainable_params"]["full"]
    assert row["fp32"]["bytes_per_gpu"] == pytest.approx(2 * 7 / 8 * psi * 4)
    assert row["fp32"]["comm_s"] == pytest.approx(2 * 7 / 8 * psi * 4 / 450e9)
    assert row["optimizer_ema_s"] == pytest.approx(psi * 52 / 3.35e12)
    assert "wrote" in capsys.readouterr().out


def test_committed_results_are_from_this_model(cm):
    committed = json.loads((MODULE.parent / "results" / "comm_model.json").read_text())
    assert committed["kind"] == "analytic, nothing measured"
    assert committed["settings"]["trainable_params"] == cm.trainable_params()
