"""End-to-end trainer behaviour on tiny CPU runs: ERW phase switch, exact resume, checkpoint safety,
configuration errors, the non-finite guard and reference-layout export."""

import json
import math

import pytest
import torch
from _trainer_helpers import TINY, launch, read, tiny_config

import erw_fast.checkpoint as checkpoint_module
from erw_fast.checkpoint import latest_checkpoint, load_checkpoint
from erw_fast.config import ConfigError, load_config
from erw_fast.encoders.teacher import load_teacher
from erw_fast.models import SiT
from erw_fast.objectives import ERWLambdaSchedule
from erw_fast.step import TrainStep
from erw_fast.trainer import NonFiniteLossError, Trainer, main


def run(config, capsys=None):
    stats = Trainer(config).run()
    return stats


@pytest.mark.slow
def test_erw_run_switches_phase_and_reports_transfer(tmp_path, capsys):
    config = tiny_config(tmp_path)
    stats = run(config)
    out = capsys.readouterr().out
    assert "ERW transfer at step 6: copied" in out and "blocks 0..1" in out and "blocks 2..3" in out
    records = read(config.run_dir)
    assert [r["step"] for r in records] == list(range(1, 15))
    assert {r["phase"] for r in records if r["step"] <= 6} == {"warmup"}
    assert {r["phase"] for r in records if r["step"] > 6} == {"full"}
    assert all("loss_diffusion" not in r for r in records[:6])  # Phase 1: alignment only
    schedule = ERWLambdaSchedule(2.0, 6, 14, 4)
    for r in records[6:]:  # λ of the step that produced the record (step counter before increment)
        assert r["lambda"] == pytest.approx(schedule(r["step"] - 1))
        assert r["loss"] == pytest.approx(r["loss_diffusion"] + r["lambda"] * r["loss_align"], rel=1e-5)
    names = sorted(p.name for p in (config.run_dir / "checkpoints").iterdir())
    assert "phase1_0000006.pt" in names and "step_0000014.pt" in names
    phase1 = load_checkpoint(config.run_dir / "checkpoints" / "phase1_0000006.pt")
    assert phase1["phase"] == "warmup" and not any(k.startswith("final_layer") for k in phase1["model"])
    assert (config.run_dir / "config.yaml").is_file()
    assert stats["warmup"].steps == 6 and stats["full"].steps == 8


class Killed(Exception):
    pass


def kill_after(monkeypatch, steps):
    original = TrainStep.__call__
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        if calls["n"] == steps:
            raise Killed()
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", step)


@pytest.mark.parametrize("kill_at", [5, 11])  # mid-warmup (last checkpoint at 4), mid-Phase-2 (at 8)
@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(tmp_path, monkeypatch, kill_at):
    reference = tiny_config(tmp_path, "uninterrupted")
    run(reference)
    expected = read(reference.run_dir)

    interrupted = tiny_config(tmp_path, "interrupted")
    with monkeypatch.context() as patch:
        kill_after(patch, kill_at)
        with pytest.raises(Killed):
            run(interrupted)
    resumed_from = load_checkpoint(latest_checkpoint(interrupted.run_dir))["step"]
    assert resumed_from == (kill_at // 4) * 4
    run(tiny_config(tmp_path, "interrupted"))
    got = read(interrupted.run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected, strict=True):  # bitwise on CPU, same world size
        for key in ("loss", "loss_align", "loss_diffusion", "grad_norm", "lambda"):
            assert a.get(key) == b.get(key), (a["step"], key)
    final_a = load_checkpoint(latest_checkpoint(interrupted.run_dir))
    final_b = load_checkpoint(latest_checkpoint(reference.run_dir))
    for key in final_b["ema"]:
        assert torch.equal(final_a["ema"][key], final_b["ema"][key]), key


@pytest.mark.slow
def test_crash_during_checkpoint_save_keeps_previous(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    real_save = torch.save
    saves = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the save at step 6 (phase1) dies half-way
            f.write(b"partial")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        run(config)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    last = latest_checkpoint(config.run_dir)
    assert last.name == "step_0000004.pt" and load_checkpoint(last)["step"] == 4
    run(tiny_config(tmp_path))  # resumes from step 4 and finishes
    assert load_checkpoint(latest_checkpoint(config.run_dir))["step"] == 14


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.totl_steps=5", "unknown config key 'train.totl_steps' — did you mean 'train.total_steps'"),
        ("train.total_steps=five", "train.total_steps: expected an integer, got str 'five'"),
        ("erw.warmup_steps=14", r"erw.warmup_steps \(14\) must be > 0 and < train.total_steps \(14\)"),
        ("alignment.encoder_depth=9", r"alignment.encoder_depth \(9\) is beyond the model"),
        ("erw.warmup_depth=5", r"erw.warmup_depth \(5\) must be in \[1, model depth 4\]"),
        ("optim.betas=[0.9]", "optim.betas needs two values"),
    ],
)
def test_bad_configs_are_clear_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, "bad", override)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    assert main([*TINY, f"run.output_dir={tmp_path}", "train.warmup=3"]) == 2
    assert "config error: unknown config key 'train.warmup'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
@pytest.mark.slow
def test_nonfinite_guard_skips_then_aborts(tmp_path, monkeypatch, implementation):
    """foreach: the step decides on the host; fused: found_inf on the device, no host sync in the step (the
    counters are read at logging steps). Both leave weights, optimizer state and EMA untouched on a NaN step."""
    import erw_fast.phases as phases_module

    real = phases_module.diffusion_loss
    poisoned_steps = {8}

    def maybe_nan(model, latents, *args, **kwargs):
        out = real(model, latents, *args, **kwargs)
        if current["step"] in poisoned_steps:
            out.loss = out.loss * float("nan")
        return out

    current = {"step": -1}
    original_step = TrainStep.__call__

    def snapshot(engine):
        moments = [t.clone() for state in engine.optimizer.state.values() for t in state.values()]
        return [*(v.clone() for v in engine.module.state_dict().values()),
                *(v.clone() for v in engine.full_ema_state().values()), *moments]

    def step(self, engine, phase, step, batch, *args):
        current["step"] = step
        assert engine.sync_free == (implementation == "fused")
        before = snapshot(engine)
        totals = original_step(self, engine, phase, step, batch, *args)
        unchanged = all(torch.equal(a, b) for a, b in zip(before, snapshot(engine), strict=True))
        assert unchanged == (step in poisoned_steps), f"step {step}: {'un' if unchanged else ''}changed"
        return totals

    monkeypatch.setattr(phases_module, "diffusion_loss", maybe_nan)
    monkeypatch.setattr(TrainStep, "__call__", step)
    stats = run(tiny_config(tmp_path, "skip", f"optim.implementation={implementation}"))
    assert stats["full"].skipped == 1
    records = read(tmp_path / "skip")
    assert [r["step"] for r in records if r["skipped"]] == [9]

    poisoned_steps.update(range(9, 100))
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        run(tiny_config(tmp_path, "abort", "train.max_nonfinite_steps=3", "checkpoint.resume=none",
                        f"optim.implementation={implementation}"))


@pytest.mark.slow
def test_fused_sync_free_step_trains_like_foreach(tmp_path):
    foreach = tiny_config(tmp_path, "foreach", "optim.implementation=foreach")
    fused = tiny_config(tmp_path, "fused", "optim.implementation=fused")
    run(foreach)
    run(fused)
    for a, b in zip(read(fused.run_dir), read(foreach.run_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_exported_reference_checkpoint_loads_strict(tmp_path):
    config = tiny_config(tmp_path)
    run(config)
    exported = torch.load(config.run_dir / "reference" / "0000014.pt", weights_only=True)
    assert set(exported) == {"model", "ema", "args", "steps"} and exported["steps"] == 14
    model = SiT(input_size=8, patch_size=2, hidden_size=32, depth=4, num_heads=2, num_classes=4,
                z_dims=[exported["model"]["projectors.0.4.weight"].shape[0]], projector_dim=32, encoder_depth=3)
    model.load_state_dict(exported["model"], strict=True)
    model.load_state_dict(exported["ema"], strict=True)


@pytest.mark.parametrize("name", ["demo", "erw_sit_xl2", "erw_sit_b2", "repa_sit_xl2", "sit_xl2"])
def test_presets_load_and_validate(name):
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    if name == "erw_sit_xl2":  # the paper's run, as the issue states it
        assert (config.erw.warmup_steps, config.erw.warmup_depth, config.alignment.encoder_depth) == (100_000, 4, 14)
        assert (config.erw.c0, config.erw.half_life, config.train.total_steps) == (6.0, 50_000, 300_000)
        assert (config.optim.lr, config.optim.betas, config.optim.eps, config.optim.ema_decay) == (
            1e-4, [0.9, 0.999], 1e-8, 0.9999)
        assert config.train.global_batch_size == 256 and config.encoder.names == ["dinov2-vit-b"]


@pytest.mark.parametrize("mode", ["repa", "sit"])
@pytest.mark.slow
def test_baseline_modes_share_the_code_path(tmp_path, mode):
    config = tiny_config(tmp_path, mode, f"run.mode={mode}", "train.total_steps=4")
    stats = run(config)
    records = read(config.run_dir)
    assert list(stats) == [mode] and {r["phase"] for r in records} == {mode}
    if mode == "repa":  # constant λ = alignment.weight
        assert all(r["lambda"] == 0.5 for r in records)
        assert all(r["loss"] == pytest.approx(r["loss_diffusion"] + 0.5 * r["loss_align"], rel=1e-5) for r in records)
    else:
        assert all("loss_align" not in r for r in records)
        final = load_checkpoint(latest_checkpoint(config.run_dir))
        assert not any(k.startswith("projectors.") for k in final["model"])


def test_ema_is_the_exponential_average_of_the_weights():
    from erw_fast.ema import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    expected = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for k, v in model.state_dict().items():
            expected[k] = 0.9 * expected[k] + 0.1 * v.double()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_reference_warmup_checkpoint_starts_phase_two(tmp_path, capsys):
    """A reference warmup checkpoint (no final layer) is imported as Phase 1, then transferred at step W."""
    warm = tiny_config(tmp_path, "warm", "train.total_steps=7", "erw.warmup_steps=6")
    run(warm)
    phase1 = load_checkpoint(warm.run_dir / "checkpoints" / "phase1_0000006.pt")
    reference = {"model": phase1["model"], "ema": phase1["ema"], "args": {"model": "SiT-S/2"}, "steps": 6}
    path = tmp_path / "0100000.pt"
    torch.save(reference, path)
    capsys.readouterr()
    config = tiny_config(tmp_path, "from-ref", f"checkpoint.init_from_reference={path}")
    stats = run(config)
    out = capsys.readouterr().out
    assert "initialised from reference checkpoint" in out and "ERW transfer at step 6" in out
    assert stats["warmup"].steps == 0 and stats["full"].steps == 8


@pytest.mark.slow
def test_step_budget_stops_with_checkpoint_and_resumes(tmp_path):
    reference = tiny_config(tmp_path, "whole")
    run(reference)
    for _ in range(3):  # 6 + 6 + 2 steps over three invocations, crossing the phase switch
        stats = run(tiny_config(tmp_path, "pieces", "train.max_steps_per_run=6"))
    assert sum(s.steps for s in stats.values()) == 14
    assert [r["loss"] for r in read(tmp_path / "pieces")] == [r["loss"] for r in read(reference.run_dir)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_torchrun_two_ranks_resume_matches_uninterrupted(tmp_path):
    """DDP over gloo, 2 ranks: each rank keeps its own RNG stream across a stop/resume."""
    out = launch(tmp_path, "ddp")
    assert "global 8 = 2 device(s) × 4 per device" in out and "ERW transfer at step 6" in out
    launch(tmp_path, "ddp-pieces", "train.max_steps_per_run=9")
    launch(tmp_path, "ddp-pieces")
    whole, pieces = read(tmp_path / "ddp"), read(tmp_path / "ddp-pieces")
    assert [r["loss"] for r in pieces] == [r["loss"] for r in whole]
    state = load_checkpoint(latest_checkpoint(tmp_path / "ddp-pieces"))
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


@pytest.mark.slow
def test_monitors_write_outputs_without_changing_training(tmp_path):
    from erw_fast.evaluation.inception import build_fid_inception

    inception = tmp_path / "inception.pt"  # no real weights offline: a random network in the real format
    torch.save(build_fid_inception(pretrained=False, seed=0).net.state_dict(), inception)
    plain = tiny_config(tmp_path, "plain")
    run(plain)
    watched = tiny_config(tmp_path, "watched", "logging.sample_every=7", "logging.cknna_every=7",
                          "logging.sample_steps=4", "logging.sample_count=4", "logging.cknna_samples=16",
                          "logging.fid_every=14", "logging.fid_samples=8", f"logging.fid_inception={inception}")
    run(watched)
    assert [r["loss"] for r in read(watched.run_dir)] == [r["loss"] for r in read(plain.run_dir)]
    grids = sorted(p.name for p in (watched.run_dir / "samples").iterdir())
    assert grids == ["step_0000007.png", "step_0000007_cfg4.png", "step_0000014.png", "step_0000014_cfg4.png"]
    records = [json.loads(line) for line in (watched.run_dir / "monitor.jsonl").read_text().splitlines()]
    fids = [r for r in records if "fid" in r]
    assert [r["step"] for r in fids] == [14] and math.isfinite(fids[0]["fid"]) and fids[0]["fid"] > 0
    records = [r for r in records if "cknna" in r]
    assert [r["step"] for r in records] == [7, 14] and all(len(r["cknna"]) == 4 for r in records)
    # (the unbiased HSIC is not positive definite, so with 16 samples values may leave [-1, 1]: only finiteness)
    assert all(math.isfinite(v) for r in records for v in r["cknna"])


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """Phase 1 draws no noise besides label dropout (off here), so 2 × 4 accumulated equals one batch of 8."""
    whole = tiny_config(tmp_path, "whole", "model.class_dropout_prob=0.0", "train.total_steps=7")
    accumulated = tiny_config(tmp_path, "accum", "model.class_dropout_prob=0.0", "train.total_steps=7",
                              "train.micro_batch_size=4")
    run(whole)
    run(accumulated)
    for a, b in zip(read(accumulated.run_dir)[:6], read(whole.run_dir)[:6], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("image_format", ["png", "raw"])
@pytest.mark.slow
@pytest.mark.multiprocess
def test_trains_on_prepared_shards_identically_with_webdataset_and_dali(tmp_path, image_format):
    """The sharded loaders feed the same step: ERW over webdataset and over DALI (CPU) give identical losses."""
    from _shard_helpers import write_dataset

    write_dataset(tmp_path / "shards", num_samples=40, per_shard=12, image_size=64, image_format=image_format,
                  features=False, num_classes=4)
    losses = {}
    for kind in ("webdataset", "dali"):
        config = tiny_config(tmp_path, kind, f"data.kind={kind}", f"data.path={tmp_path / 'shards'}",
                             "data.num_workers=1", "model.input_size=8", "train.total_steps=9",
                             "erw.warmup_steps=4", "data.flip=true")
        run(config)
        records = read(config.run_dir)
        assert [r["step"] for r in records] == list(range(1, 10))
        losses[kind] = [r["loss"] for r in records]
    assert losses["webdataset"] == losses["dali"]
    assert all(math.isfinite(v) for v in losses["dali"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_shard_resume_continues_the_data_order(tmp_path):
    from _shard_helpers import write_dataset

    write_dataset(tmp_path / "shards", num_samples=40, per_shard=12, image_size=64, features=False, num_classes=4)
    common = ["data.kind=webdataset", f"data.path={tmp_path / 'shards'}", "data.num_workers=0",
              "model.input_size=8", "train.total_steps=9", "erw.warmup_steps=4"]
    run(tiny_config(tmp_path, "whole", *common))
    run(tiny_config(tmp_path, "pieces", *common, "train.max_steps_per_run=5", "data.num_workers=1"))
    run(tiny_config(tmp_path, "pieces", *common))
    assert [r["loss"] for r in read(tmp_path / "pieces")] == [r["loss"] for r in read(tmp_path / "whole")]
    # The next batch staged one step ahead (device prefetch) changes neither the batches nor where a resume starts.
    staged = [*common, "data.device_prefetch=true"]
    run(tiny_config(tmp_path, "staged", *staged, "train.max_steps_per_run=6"))
    run(tiny_config(tmp_path, "staged", *staged))
    assert [r["loss"] for r in read(tmp_path / "staged")] == [r["loss"] for r in read(tmp_path / "whole")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_mixed_precision_steps_are_finite(tmp_path, precision):
    """bf16 autocast (default) and fp16 with a GradScaler; the alignment and loss math stay in fp32."""
    config = tiny_config(tmp_path, precision, f"train.precision={precision}", "train.total_steps=8")
    run(config)
    records = read(config.run_dir)
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0.0 for r in records)
    state = load_checkpoint(latest_checkpoint(config.run_dir))
    assert bool(state["scaler"]) == (precision == "fp16")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("scope", ["blocks", "model"])
@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, scope):
    """torch.compile (regional per block, or the whole model) through aot_eager: the traced graphs must compute
    what eager computes, across the ERW switch (a second model is compiled there)."""
    eager = tiny_config(tmp_path, "eager", "train.total_steps=9")
    compiled = tiny_config(tmp_path, scope, "train.total_steps=9", "train.compile=true",
                           f"train.compile_scope={scope}", "train.compile_backend=aot_eager")
    run(eager)
    run(compiled)
    for a, b in zip(read(compiled.run_dir), read(eager.run_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_regional_compile_keeps_state_dict_keys():
    from erw_fast.compile import compile_model

    model = SiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=4, z_dims=[16],
                projector_dim=32, encoder_depth=1)
    keys = list(model.state_dict())
    assert compile_model(model, "blocks", backend="aot_eager") is model and list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="unknown compile scope 'layers'"):
        compile_model(model, "layers")


@pytest.mark.slow
def test_teacher_in_bf16_and_compiled(tmp_path):
    """encoder.dtype=bf16 keeps the teacher's weights in bf16; encoder.compile compiles its blocks (aot_eager here)
    and computes what eager computes."""
    base = tiny_config(tmp_path, "teacher", "train.total_steps=7", "train.precision=bf16")
    eager = load_teacher(base, torch.device("cpu"), base.model.num_tokens())
    other = tiny_config(tmp_path, "teacher2", "train.total_steps=7", "train.precision=bf16", "encoder.dtype=bf16",
                        "encoder.compile=true", "train.compile_backend=aot_eager")
    compiled = load_teacher(other, torch.device("cpu"), other.model.num_tokens())
    [teacher] = compiled.encoders
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, features = eager.encoders[0](images).float(), teacher(images).float()
    torch.testing.assert_close(features, reference, rtol=0.05, atol=0.05)
    run(other)  # and a short run trains with it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.slow
@pytest.mark.gpu
def test_the_training_step_never_syncs_with_the_host_on_cuda(tmp_path, monkeypatch):
    """bf16 + fused AdamW: the whole step (noise draw, teacher, loss, backward, clip, non-finite skip, optimizer,
    EMA) runs without a host sync; torch's sync debug mode turns any into an error."""
    original = TrainStep.__call__

    def step(self, *args):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(TrainStep, "__call__", step)
    config = tiny_config(tmp_path, "cuda", "run.device=cuda", "train.precision=bf16", "optim.implementation=fused",
                         "logging.log_every=100", "train.total_steps=8", "checkpoint.every=100")
    stats = run(config)
    assert stats["full"].steps == 2 and stats["full"].skipped == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny run is on the CPU: the interpreted kernels")
@pytest.mark.slow
def test_nt_xent_run_on_the_triton_kernels_matches_torch(tmp_path, capsys):
    # The fused kernels (interpreter; the frozen teacher takes their one-pass form) and the PyTorch reference in
    # the same short ERW run: same losses, and the log says which form runs and where its tiles come from.
    extra = ["alignment.objective=nt_xent", "train.total_steps=8", "erw.warmup_steps=4", "checkpoint.every=100"]
    run(tiny_config(tmp_path, "torch", *extra))
    capsys.readouterr()
    run(tiny_config(tmp_path, "triton", *extra, "alignment.backend=triton"))
    assert "alignment nt_xent/triton (one pass, frozen teacher; interpreter tiles)" in capsys.readouterr().out
    reference, fused = read(tmp_path / "torch"), read(tmp_path / "triton")
    for r, f in zip(reference, fused, strict=True):
        assert f["loss_align"] == pytest.approx(r["loss_align"], rel=1e-4, abs=1e-5), r["step"]
