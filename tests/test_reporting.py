"""Metrics log reading, loss-curve plot and the per-phase summary table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erw_fast.reporting import phase_summary_table, plot_loss_curves, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records() -> list[dict]:
    recs = []
    for step in range(0, 40, 2):  # ERW warmup: alignment-only loss, λ = c0
        recs.append(
            {
                "step": step,
                "phase": "warmup",
                "loss": -0.1 - step / 100,
                "loss_diffusion": None,
                "loss_align": -0.1 - step / 100,
                "lambda": 1.0,
                "img_per_s": 250.0,
            }
        )
    for step in range(40, 100, 2):  # full phase: diffusion + λ · alignment with decaying λ
        lam = 2 ** (-(step - 40) / 20)
        recs.append(
            {
                "step": step,
                "phase": "full",
                "loss": 1.0 - lam * 0.5,
                "loss_diffusion": 1.0 - step / 200,
                "loss_align": -0.5,
                "lambda": lam,
                "img_per_s": 120.0,
            }
        )
    recs[25]["loss_align"] = None  # None / missing values are skipped
    del recs[26]["lambda"]
    recs[27]["loss"] = float("nan")
    return recs


def _write_jsonl(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


def test_read_metrics_roundtrip_and_truncated_last_line(tmp_path: Path) -> None:
    recs = [{"step": i, "phase": "warmup", "loss": 0.5 * i} for i in range(5)]
    path = tmp_path / "metrics.jsonl"
    _write_jsonl(path, recs, tail='{"step": 5, "phase": "warm')  # killed mid-write
    assert read_metrics(path) == recs
    _write_jsonl(path, recs, tail="\n\n")  # trailing blank lines are fine
    assert read_metrics(str(path)) == recs


def test_read_metrics_rejects_corruption_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def test_plot_loss_curves_writes_png(tmp_path: Path) -> None:
    out = plot_loss_curves(_records(), tmp_path / "sub" / "loss.png", title="ERW demo")
    assert out == tmp_path / "sub" / "loss.png"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000  # a real figure with curves, not an empty canvas

    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600


def test_plot_loss_curves_tolerates_sparse_and_empty_input(tmp_path: Path) -> None:
    sparse = [{"step": 1, "phase": "sit", "loss": 1.0}, {"phase": "sit", "loss": 2.0}, {"step": 3, "loss": None}]
    assert plot_loss_curves(sparse, tmp_path / "sparse.png").read_bytes()[:8] == PNG_SIGNATURE
    assert plot_loss_curves([], tmp_path / "empty.png").read_bytes()[:8] == PNG_SIGNATURE


def test_phase_summary_table() -> None:
    rows = [
        {
            "phase": "warmup",
            "steps": 120,
            "wall_s": 31.2,
            "images": 7488,
            "img_per_s": 240.0,
            "final_loss": -0.41,
            "gflops_per_step": None,
        },
        {
            "phase": "full",
            "steps": 380,
            "wall_s": 100.8,
            "images": 24320,
            "img_per_s": 241.27,
            "final_loss": 0.8731,
            "gflops_per_step": 12.5,
        },
    ]
    table = phase_summary_table(rows)
    lines = table.splitlines()
    assert len(lines) == 6  # header, rule, 2 phases, rule, total
    assert len({len(line) for line in lines}) == 1  # fixed width
    header = lines[0].split()
    assert header[0] == "phase" and "GFLOP/step" in header and "images" in header
    warm, full, total = lines[2].split(), lines[3].split(), lines[5].split()
    assert warm == ["warmup", "120", "31.2", "7488", "240.0", "-0.4100", "-"]
    assert full == ["full", "380", "100.8", "24320", "241.3", "0.8731", "12.5"]
    # Total: steps, wall, images summed; img/s from the sums; last phase's loss; GFLOP unknown for warmup.
    assert total == ["total", "500", "132.0", "31808", f"{31808 / 132.0:.1f}", "0.8731", "-"]


def test_phase_summary_table_derives_missing_columns() -> None:
    rows = [
        {"phase": "sit", "steps": 10, "wall_s": 2.0, "img_per_s": 100.0, "final_loss": 1.0, "gflops_per_step": 3.0},
        {"phase": "repa", "steps": 30, "wall_s": 6.0, "images": 300, "final_loss": 0.5, "gflops_per_step": 5.0},
    ]
    lines = phase_summary_table(rows).splitlines()
    assert lines[2].split()[3] == "200"  # images = img/s · wall
    assert lines[3].split()[4] == "50.0"  # img/s = images / wall
    assert lines[5].split() == ["total", "40", "8.0", "500", "62.5", "0.5000", "4.5"]  # GFLOP: step-weighted


def test_phase_summary_table_empty() -> None:
    assert phase_summary_table([]).splitlines()[-1].split() == ["total", "0", "0.0", "-", "-", "-", "-"]
