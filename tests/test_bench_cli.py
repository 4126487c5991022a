"""`erw-bench`: the cost analysis writes its table / JSON / PNG with the analytic numbers, and the training
benchmark runs end to end on CPU with a tiny configuration, in the fast and the reference-step mode."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as tF

from erw_fast import flops as F
from erw_fast.cli import bench
from erw_fast.objectives import repa_cosine_loss

TINY = ["--model", "SiT-S/2", "--input-size", "8", "--depth", "2", "--hidden", "64", "--heads", "2",
        "--num-classes", "10", "--projector-dim", "64", "--encoder", "demo-vit-t", "--encoder-resolution", "64"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The same tiny workload as `erw-bench train` takes it: trainer config overrides (before the options).
WORK = bench.Workload(model="SiT-S/2", input_size=8, depth=2, hidden=64, heads=2, num_classes=10, projector_dim=64,
                      encoders=["demo-vit-t"], resolution=64)
TRAIN_TINY = [*WORK.config_overrides(), "train.precision=fp32"]


def test_cost_cli_writes_table_json_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["cost", "--out", str(tmp_path), "--name", "cost"]) == 0
    md = (tmp_path / "cost.md").read_text()
    doc = json.loads((tmp_path / "cost.json").read_text())
    assert (tmp_path / "cost.png").read_bytes()[:8] == PNG_MAGIC
    assert "| phase | ours (GFLOPs)" in md and "42,200" in md and "224,800" in md and "Reconstruction" in md
    assert doc["device"] == "analytic" and doc["settings"]["batch"] == 256
    # the JSON carries the library's numbers
    warm = F.step_breakdown("SiT-XL/2", "warmup", 256, warmup_depth=4).training() / 1e9
    full = F.step_breakdown("SiT-XL/2", "full", 256).training() / 1e9
    assert doc["per_step"]["warmup"]["gflops"] == pytest.approx(warm)
    assert doc["per_step"]["full"]["gflops"] == pytest.approx(full)
    assert doc["warmup_over_full"] == pytest.approx(warm / full)
    assert doc["paper"]["delta"]["full"] == pytest.approx(full / 224_800 - 1)
    labels = [r["label"] for r in doc["splits"]]
    assert labels == ["0K+100K", "10K+90K", "20K+80K", "50K+50K", "100K+100K", "REPA 100K"]
    r = doc["splits"][1]
    assert r["total_flops"] == pytest.approx((10_000 * warm + 90_000 * full) * 1e9)
    assert r["paper_total_flops"] == pytest.approx((10_000 * 42_200 + 90_000 * 224_800) * 1e9)
    assert "wrote" in capsys.readouterr().out


def test_cost_cli_custom_splits_and_non_paper_settings(tmp_path: Path) -> None:
    args = ["cost", "--model", "SiT-B/2", "--splits", "0+1000,500+500", "--out", str(tmp_path), "--name", "b"]
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["paper"] is None  # the paper's numbers are for SiT-XL/2 only: no comparison column
    assert [r["label"] for r in doc["splits"]] == ["0K+1K", "500+500"]
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_cost_cli_measure_on_tiny_config(tmp_path: Path) -> None:
    args = ["cost", *TINY, "--batch", "4", "--measure", "--measure-steps", "1", "--measure-warmup", "0",
            "--device", "cpu", "--out", str(tmp_path), "--name", "tiny"]
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "tiny.json").read_text())
    measured = doc["measured"]
    assert measured["device"]["type"] == "cpu"
    phases = {p["phase"]: p for p in measured["phases"]}
    assert set(phases) == {"warmup", "full"} and all(p["step_time_s"] > 0 for p in phases.values())
    assert phases["full"]["gflops_per_step"] == pytest.approx(doc["per_step"]["full"]["gflops"])
    split = next(s for s in measured["splits"] if s["label"] == "10K+90K")
    assert split["seconds"] == pytest.approx(10_000 * phases["warmup"]["step_time_s"]
                                             + 90_000 * phases["full"]["step_time_s"])
    assert "## Measured on" in (tmp_path / "tiny.md").read_text()


def test_cost_measure_refuses_a_real_model_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["cost", "--measure", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "too slow" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.slow
def test_train_bench_runs_on_cpu(tmp_path: Path, reference: bool) -> None:
    args = ["train", *TRAIN_TINY, "--batch", "4", "--steps", "2", "--warmup", "1", "--device", "cpu",
            "--out", str(tmp_path), "--name", "t"] + (["--reference-step"] if reference else [])
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert {"device", "versions", "settings", "results", "speedups"} <= set(doc)
    assert doc["device"]["type"] == "cpu" and doc["device"]["peak_bf16_tflops"] is None
    assert doc["versions"]["torch"] == torch.__version__
    variants = ["fast", "reference"] if reference else ["fast"]
    expected = [(p, v) for p in ("warmup", "full") for v in variants]
    assert [(r["phase"], r["variant"]) for r in doc["results"]] == expected
    for r in doc["results"]:
        assert r["status"] == "ok" and r["batch"] == 4 and r["steps"] == 2
        assert set(r["breakdown_median_s"]) == set(bench.REGIONS)
        assert r["img_per_s"] > 0 and r["step_time_median_s"] > 0 and r["mfu"] is None
        assert r["peak_memory_gib"] is None  # CPU
        assert r["gpu_telemetry"] == {"unavailable": "not a CUDA device (cpu)"}
        assert len(r["raw"]["region_times_s"]) == 2 and len(r["raw"]["step_times_s"]) == 2
        assert r["gflops_per_step"] == pytest.approx(WORK.step_breakdown(r["phase"], 4).training() / 1e9)
        assert r["achieved_tflops"] == pytest.approx(r["gflops_per_step"] / 1e3 / r["step_time_median_s"])
        assert r["precision"] == ("fp16" if r["variant"] == "reference" else "fp32")
    by_key = {(r["phase"], r["variant"]): r for r in doc["results"]}
    assert {(x["variant"], x["batch"]) for x in doc["phase1_ratios"]} == {(v, 4) for v in variants}
    for x in doc["phase1_ratios"]:
        warm, full = by_key[("warmup", x["variant"])], by_key[("full", x["variant"])]
        share = warm["gflops_per_step"] / full["gflops_per_step"]
        assert 0 < share < 1 and x["flop_share"] == pytest.approx(share)
        assert x["ratio"] == pytest.approx(warm["step_time_median_s"] / (share * full["step_time_median_s"]))
        assert x["meets_target"] == (x["ratio"] <= 1.15)
    assert "Phase 1 step time against its FLOP share" in (tmp_path / "t.md").read_text()
    if reference:
        assert {(s["phase"], s["variant"]) for s in doc["speedups"]} == {("warmup", "fast"), ("full", "fast")}
        assert all(s["speedup"] > 0 for s in doc["speedups"])
        assert "Speed-up over the reference step" in (tmp_path / "t.md").read_text()
    else:
        assert doc["speedups"] == []


@pytest.mark.slow
def test_train_bench_sweeps_attention_backends(tmp_path: Path) -> None:
    # Two backends, each its own variant; same seeds and data, so both runs end at the same loss.
    args = ["train", *TRAIN_TINY, "--batch", "2", "--steps", "2", "--warmup", "0", "--device", "cpu", "--phases",
            "full", "--attn-backend", "sdpa", "math", "--out", str(tmp_path), "--name", "a"]
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert [(r["variant"], r["attention"]) for r in doc["results"]] == [("fast@sdpa", "sdpa"), ("fast@math", "math")]
    losses = [r["final_loss"] for r in doc["results"]]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert "fast@math" in (tmp_path / "a.md").read_text()
    # The figure draws each case's median breakdown: the bars of a row add up to that row's regions.
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = bench.train_figure(doc).axes[0]
    bars = list(ax.patches)
    per_region = len(doc["results"])
    for i, r in enumerate(doc["results"]):
        drawn = sum(bars[k * per_region + i].get_width() for k in range(len(bench.REGIONS)))
        assert drawn == pytest.approx(sum(r["breakdown_median_s"].values()) * 1e3)


@pytest.mark.slow
def test_train_bench_reports_after_every_measurement() -> None:
    # A run cut short by a time limit keeps what finished: the document is handed out after each case,
    # batch by batch, both phases of a batch before the next batch.
    settings = bench.TrainSettings(overrides=TRAIN_TINY, batches=[2, 3], steps=1, warmup=0, device="cpu")
    docs = []
    final = bench.run_train_benchmark(settings, on_result=docs.append)
    assert [len(d["results"]) for d in docs] == [1, 2, 3, 4]
    assert [(r["batch"], r["phase"]) for r in final["results"]] == [(2, "warmup"), (2, "full"), (3, "warmup"),
                                                                    (3, "full")]
    assert len(docs[1]["phase1_ratios"]) == 1  # the first batch's ratio exists after its second case


@pytest.mark.parametrize("phase_name", ["warmup", "full"])
@pytest.mark.slow
def test_the_benchmark_times_the_trainers_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               phase_name: str) -> None:
    """`erw-bench train` builds model, engine and step from the config as the trainer does: for the same batch
    and step (hence the same draws) both give the same losses, gradients, gradient norm, weights and EMA."""
    import io

    from erw_fast.bench import train as bench_train
    from erw_fast.encoders.teacher import load_teacher
    from erw_fast.engines.local import LocalEngine
    from erw_fast.trainer import Trainer

    gradients: list[list[torch.Tensor]] = []
    original = LocalEngine.step

    def recording(self: LocalEngine, loss: torch.Tensor, region=None):  # noqa: ANN001, ANN202
        gradients.append([p.grad.detach().clone() for p in self.trainable])
        return original(self, loss, region)

    monkeypatch.setattr(LocalEngine, "step", recording)
    cpu = torch.device("cpu")
    settings = bench.TrainSettings(overrides=[*TRAIN_TINY, "train.micro_batch_size=2", f"run.output_dir={tmp_path}"],
                                   phases=[phase_name], batches=[4], device="cpu")
    config = bench.bench_config(settings, phase_name, 4, cpu)
    host = bench_train._host_batch(config, 4, cpu)
    teacher = load_teacher(config, cpu, config.model.num_tokens(), lambda _line: None)

    torch.manual_seed(config.run.seed)
    built = bench_train.trainer_step(config, phase_name, teacher, cpu, iter(lambda: dict(host), None))
    bench_loss = built.run(3, None)

    trainer = Trainer(config, log_stream=io.StringIO())
    trainer.teacher.encoders = teacher.encoders
    phase = next(p for p in trainer.phases if p.name == phase_name)
    torch.manual_seed(config.run.seed)  # as Trainer.run seeds rank 0 before it builds the model
    trainer._enter_phase(phase, trainer._new_model(phase))
    totals = trainer.train_step(trainer.engine, phase, phase.start + 3, dict(host))

    assert torch.equal(totals["loss"], bench_loss)
    [bench_grads, trainer_grads] = gradients
    assert len(bench_grads) == len(trainer_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(bench_grads, trainer_grads, strict=True))
    for mine, theirs in ((built.engine.full_model_state(), trainer.engine.full_model_state()),
                         (built.engine.full_ema_state(), trainer.engine.full_ema_state())):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert built.engine.trainable[0].grad is None  # the step completed (AdamW applied, gradients released)


def test_train_bench_rejects_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    options = ["--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)]
    base = ["train", *TRAIN_TINY, *options]
    assert bench.main([*base, "--phases", "phase2"]) == 2
    assert "unknown phase" in capsys.readouterr().err
    # 8 px latents / patch 2 = 16 tokens, but DINOv2-B at 256 px yields 256: a clear token-count error
    teacher = ["encoder.names=[dinov2-vit-b]", "encoder.resolution=256", "data.image_size=256"]
    assert bench.main(["train", *TRAIN_TINY, *teacher, *options]) == 2
    assert "token-count mismatch" in capsys.readouterr().err
    assert bench.main(["train", *TRAIN_TINY, "train.warmup=3", *options]) == 2  # the trainer's config errors
    assert "unknown config key 'train.warmup'" in capsys.readouterr().err
    assert bench.main([*base, "--attn-backend", "sdpa", "flash-attention"]) == 2
    assert "unknown attention backend 'flash-attention'" in capsys.readouterr().err
    # the real SiT-XL/2 on CPU is refused before anything is built
    assert bench.main(["train", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "too slow" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_train_bench_on_gpu_reports_mfu_and_memory(tmp_path: Path) -> None:
    args = ["train", *TRAIN_TINY, "train.precision=bf16", "--batch", "8", "--steps", "3", "--warmup", "2",
            "--device", "cuda",
            "--reference-step", "--out", str(tmp_path), "--name", "g"]
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    for r in doc["results"]:
        assert r["status"] == "ok" and r["peak_memory_gib"] > 0
        assert (r["mfu"] is None) == (doc["device"]["peak_bf16_tflops"] is None)
        telemetry = r["gpu_telemetry"]
        if "unavailable" not in telemetry:  # NVML may be unreachable in a container; then it says why
            assert telemetry["samples"] >= 2 and telemetry["sm_clock_mhz"]["max"] > 0


# ------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0), ("NVIDIA H800", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("x86_64", None),
])
def test_peak_table(name: str, peak: float | None) -> None:
    assert bench.peak_bf16_tflops(name) == peak


def test_region_timer_on_cpu() -> None:
    timer = bench.RegionTimer(torch.device("cpu"))
    started = time.perf_counter()
    for _ in range(2):
        timer.start()
        timer.region("data")
        time.sleep(0.01)
        timer.region("forward")
        time.sleep(0.02)
        timer.region("data")  # a region entered again in the step (micro-batches) adds up
        time.sleep(0.01)
        timer.stop()
    wall = time.perf_counter() - started
    steps = timer.results()
    assert [list(s) for s in steps] == [["data", "forward"]] * 2
    assert all(s["data"] >= 0.02 and s["forward"] >= 0.02 for s in steps)
    assert sum(sum(s.values()) for s in steps) <= wall


def test_reference_cosine_loop_equals_the_vectorised_loss() -> None:
    # the reference-step mode must do the same maths, only the reference's way
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 4, generator=g)]
    feats = [torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 4, generator=g)]
    loop = bench._reference_cosine_loop(zs, feats)
    assert torch.allclose(loop, repa_cosine_loss(zs, feats, backend="torch"), atol=1e-6)
    direct = torch.stack([-tF.cosine_similarity(z, f, dim=-1).mean() for z, f in zip(zs, feats, strict=True)]).mean()
    assert torch.allclose(loop, direct, atol=1e-6)


def test_reference_ema_matches_the_library_ema() -> None:
    from erw_fast.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ema = EMA(model, 0.9)
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    bench._reference_ema(ref, model, 0.9)
    for a, b in zip(ema.model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a, b)


@pytest.mark.slow
def test_train_bench_profile_writes_traces_with_step_regions(tmp_path: Path) -> None:
    args = ["train", *TRAIN_TINY, "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--phases",
            "full", "--compile", "on", "--out", str(tmp_path), "--name", "t", "--profile", str(tmp_path / "traces"),
            "--profile-steps", "2"]
    assert bench.main(args) == 0
    [result] = json.loads((tmp_path / "t.json").read_text())["results"]
    assert result["variant"] == "fast+compile"
    trace = json.loads(Path(result["trace"]).read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    for region in ("step", *bench.REGIONS):  # every region once per profiled step
        assert names.count(f"full_fast+compile_b2/{region}") == 2, region


def test_a_failing_variant_is_recorded_and_the_others_still_run(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from erw_fast.bench import train as bench_train

    real = bench_train.trainer_step

    def compile_breaks(config, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if config.train.compile:
            raise RuntimeError("inductor failed\nlong details")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(bench_train, "trainer_step", compile_breaks)
    args = ["train", *TRAIN_TINY, "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu", "--phases",
            "full", "--compile", "both", "--out", str(tmp_path), "--name", "e"]
    assert bench.main(args) == 1  # not every case ran
    results = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [(r["variant"], r["status"]) for r in results] == [
        ("fast", "ok"), ("fast+compile", "error: RuntimeError: inductor failed")]
