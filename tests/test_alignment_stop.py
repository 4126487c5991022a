"""Alignment-weight schedules (constant, ERW, hard stop, cosine) and the run that stops paying for the teacher once
every alignment weight is 0 for good: the schedules against their formulas, the config checks, HASTE's terminated
step (../shared/golden/haste, ``haste_terminated.pt``), and tiny CPU runs through the stop (log, metrics, no teacher
and no images after it, optimizer state carried over, exact resume across it, ERW, two ranks).

"≤ 1e-5 relative" = the largest absolute difference over the largest absolute reference value.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from _golden_helpers import RTOL, check_step, rel_err
from _trainer_helpers import launch, read, tiny_config

import erw_fast.phases as phases_module
from erw_fast.checkpoint import latest_checkpoint, load_checkpoint
from erw_fast.config import ConfigError, load_config
from erw_fast.encoders.teacher import Teacher
from erw_fast.engines import LocalEngine
from erw_fast.models import SiT
from erw_fast.objectives import ConstantLambda, ERWLambdaSchedule, weight_schedule
from erw_fast.objectives.schedule import CosineToZero, HardStop
from erw_fast.phases import DenoisePhase, DiffusionPhase, WarmupPhase, plan_phases
from erw_fast.randomness import StepDraw
from erw_fast.runtime import DistEnv
from erw_fast.step import TrainStep
from erw_fast.trainer import Trainer

# ---------------------------------------------------------------------------------------------- the schedules


def _erw64(c0: float, w: int, total: int, h: float, s: int) -> float:
    return c0 * 2.0 ** (-min(max(s - w, 0), total - w) / h)


def _cosine64(value: float, start: int, end: int, s: int) -> float:
    if s >= end:
        return 0.0
    return value * 0.5 * (1 + math.cos(math.pi * max(s - start, 0) / (end - start)))


ERW = ERWLambdaSchedule(3.0, 10, 200, 25.0)
CASES = {  # kind, stop_step → (the schedule, its float64 formula, zero_from)
    "constant": (weight_schedule("constant", 0.5, start=0, stop_step=None), lambda s: 0.5, None),
    "constant_stopped": (weight_schedule("constant", 0.5, start=0, stop_step=60), lambda s: 0.5 * (s < 60), 60),
    "hard_stop": (weight_schedule("hard_stop", 0.7, start=0, stop_step=90), lambda s: 0.7 * (s < 90), 90),
    "erw": (weight_schedule("erw", 0.5, start=10, stop_step=None, erw=ERW),
            lambda s: _erw64(3.0, 10, 200, 25.0, s), None),
    "erw_stopped": (weight_schedule("erw", 0.5, start=10, stop_step=120, erw=ERW),
                    lambda s: _erw64(3.0, 10, 200, 25.0, s) * (s < 120), 120),
    "cosine": (weight_schedule("cosine", 0.8, start=10, stop_step=110), lambda s: _cosine64(0.8, 10, 110, s), 110),
    "zero_constant": (weight_schedule("constant", 0.0, start=0, stop_step=None), lambda s: 0.0, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_schedule_follows_its_formula_and_is_zero_from_its_zero_from(case):
    schedule, formula, zero_from = CASES[case]
    for s in range(0, 260):
        assert schedule(s) == pytest.approx(formula(s), rel=1e-12, abs=1e-15), (case, s)
    assert schedule.zero_from == zero_from
    if zero_from is not None:  # 0 for good from there, not before (for a weight that is not 0 from the start)
        assert all(schedule(s) == 0.0 for s in range(zero_from, 400))
        assert zero_from == 0 or schedule(zero_from - 1) > 0
    else:
        assert all(schedule(s) > 0 for s in range(0, 400))


def test_schedule_kinds_build_the_expected_objects():
    assert isinstance(CASES["hard_stop"][0], HardStop) and CASES["hard_stop"][0].inner == ConstantLambda(0.7)
    assert isinstance(CASES["erw_stopped"][0], HardStop) and CASES["erw_stopped"][0].inner is ERW
    assert CASES["cosine"][0] == CosineToZero(0.8, 10, 110)
    assert HardStop(ConstantLambda(0.0), 50).zero_from == 0  # the earlier of the two
    with pytest.raises(ValueError, match="stop_step"):
        weight_schedule("hard_stop", 0.5, start=0, stop_step=None)
    with pytest.raises(ValueError, match="erw"):
        weight_schedule("erw", 0.5, start=0, stop_step=None)


# ------------------------------------------------------------------------------------------ the config and plan


def _config(*extra, total=100):
    return load_config(None, ["run.device=cpu", "model.name=SiT-S/2", f"train.total_steps={total}",
                              "erw.warmup_steps=20", *extra])


@pytest.mark.parametrize(("extra", "message"), [
    (["run.mode=repa", "alignment.schedule=hard_stop"], r"alignment\.stop_step: the hard_stop schedule needs"),
    (["run.mode=repa", "alignment.schedule=cosine"], r"alignment\.stop_step: the cosine schedule needs"),
    (["run.mode=repa", "alignment.schedule=erw"], r"alignment\.schedule=erw: .* run\.mode is 'repa'"),
    (["run.mode=reg", "alignment.schedule=erw"], r"alignment\.schedule=erw"),
    (["run.mode=sit", "alignment.schedule=constant"], r"alignment\.schedule=constant: run\.mode=sit has no"),
    (["run.mode=sit", "alignment.stop_step=50"], r"alignment\.stop_step=50: run\.mode=sit has no"),
    (["run.mode=repa", "alignment.stop_step=0"], r"alignment\.stop_step=0: must be inside"),
    (["run.mode=repa", "alignment.stop_step=101"], r"alignment\.stop_step=101: .*≤ train\.total_steps=100"),
    (["run.mode=erw", "alignment.stop_step=20"], r"alignment\.stop_step=20: .*erw\.warmup_steps=20"),
])
def test_bad_schedules_are_refused_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        _config(*extra)


def _plan(*extra, total=100):
    return plan_phases(_config(*extra, total=total), Teacher(), "torch")


def test_plan_cuts_the_diffusion_phase_at_the_stop_and_adds_the_denoise_phase():
    repa, denoise = _plan("run.mode=repa", "alignment.schedule=hard_stop", "alignment.stop_step=60",
                          "alignment.weight=0.5")
    assert (repa.name, repa.start, repa.end, repa.aligns) == ("repa", 0, 60, True)
    assert isinstance(denoise, DenoisePhase) and not denoise.aligns and denoise.after == "repa"
    assert (denoise.start, denoise.end) == (60, 100)
    assert repa.alignment_weight(59) == 0.5 and denoise.alignment_weight(60) == 0.0
    assert denoise.targets({"images": None}, slice(None)) is None  # never asks the teacher
    # ERW: the decay until the stop inside Phase 2.
    warmup, full, denoise = _plan("run.mode=erw", "alignment.stop_step=70", "erw.c0=2", "erw.half_life=10")
    assert isinstance(warmup, WarmupPhase) and (full.start, full.end, denoise.start, denoise.end) == (20, 70, 70, 100)
    assert full.alignment_weight(45) == pytest.approx(2.0 * 2 ** (-25 / 10))
    # No stop: one phase, as before. A cosine ending at the last step: nothing left to switch off.
    assert [p.name for p in _plan("run.mode=repa")] == ["repa"]
    assert [p.name for p in _plan("run.mode=repa", "alignment.schedule=cosine", "alignment.stop_step=100")] == ["repa"]
    cos = _plan("run.mode=repa", "alignment.schedule=cosine", "alignment.stop_step=80")
    assert [p.name for p in cos] == ["repa", "denoise"] and cos[0].end == 80
    # REG: the class token is the teacher's CLS at every step, so the teacher keeps running (λ is 0 all the same).
    reg = _plan("run.mode=reg", "alignment.schedule=hard_stop", "alignment.stop_step=60")
    assert [p.name for p in reg] == ["reg"] and reg[0].alignment_weight(60) == 0.0


def test_the_stop_waits_for_every_alignment_term():
    """E = the latest zero_from over λ and HASTE's attention weight (attn_lam); a term that never ends: no stop."""
    phase = DiffusionPhase("repa", 0, 100, Teacher(), None, interpolant=None, encoder_depth=1,
                           lam=HardStop(ConstantLambda(0.5), 40))
    assert phases_module.stop_point(phase) == 40
    phase.attn_lam = HardStop(ConstantLambda(0.5), 70)
    assert phases_module.stop_point(phase) == 70
    phase.attn_lam = ConstantLambda(0.5)
    assert phases_module.stop_point(phase) is None


# --------------------------------------------------------------------------------- HASTE's terminated step


def test_terminated_step_matches_haste_from_the_recorded_draws(golden_dir, tmp_path):
    """The post-stop phase's loss + the engine's backward and clipping at global_step = E, from HASTE's draws:
    only the denoising loss, every gradient but the projector's (absent), the clipping norm."""
    root = golden_dir / "haste"
    cfg = json.loads((root / "config.json").read_text())
    s, e = cfg["student"], cfg["early_stop_point"]
    inputs = torch.load(root / "haste_inputs.pt", weights_only=True)
    g = torch.load(root / "haste_terminated.pt", weights_only=True)
    assert int(g["global_step"]) == e
    config = load_config(None, [
        "run.device=cpu", "run.mode=repa", f"run.output_dir={tmp_path}", "model.name=SiT-S/2",
        f"model.input_size={s['input_size']}", f"model.patch_size={s['patch_size']}", f"model.depth={s['depth']}",
        f"model.hidden_size={s['hidden_size']}", f"model.num_heads={s['num_heads']}",
        f"model.num_classes={s['num_classes']}", f"model.projector_dim={s['projector_dim']}", "model.qk_norm=false",
        f"alignment.encoder_depth={s['encoder_depth']}", f"alignment.weight={cfg['proj_coeff']}",
        "alignment.schedule=hard_stop", f"alignment.stop_step={e}", f"train.total_steps={2 * e}",
        f"optim.grad_clip={cfg['optimizer']['max_grad_norm']}", "encoder.names=[dinov2-vit-b]",
        "encoder.pretrained=false", "train.precision=fp32", "train.global_batch_size=2", "alignment.backend=torch",
        "optim.implementation=foreach",
    ])
    teacher = Teacher([SimpleNamespace(embed_dim=cfg["teacher"]["embed_dim"])])
    aligned, phase = plan_phases(config, teacher, "torch")
    assert aligned.alignment_weight(e - 1) == cfg["proj_coeff"] and isinstance(phase, DenoisePhase)
    assert phase.start == e and phase.alignment_weight(e) == 0.0
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims))
    model.load_state_dict(torch.load(root / "haste_student.pt", weights_only=True)["state_dict"], strict=True)
    engine = LocalEngine(model, config, DistEnv(0, 0, 1, torch.device("cpu")), accumulation=1)
    projector = {n for n, _ in model.named_parameters() if n.startswith("projectors.")}
    assert projector == {f"projectors.0.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}

    draw = StepDraw(t=inputs["t"], noise=inputs["noise"], drop_labels=inputs["drop_ids"].long())
    batch = {"latents": inputs["latents"], "labels": inputs["y"]}
    calls = []
    for p in projector:  # the projector is not even run
        model.get_submodule(p.rsplit(".", 1)[0]).register_forward_hook(lambda *a: calls.append(1))
    loss, parts = phase.loss(engine.forward_module, batch, slice(None), None, draw, e)
    assert not calls and set(parts) == {"loss", "loss_diffusion"}
    assert rel_err(parts["loss_diffusion"], g["loss_mean"]) <= RTOL
    assert rel_err(loss, g["total_loss"]) <= RTOL
    grads = check_step(engine, model, loss, g)
    assert not projector & set(grads)
    assert all(engine.optimizer.state[p] == {} for n, p in model.named_parameters() if n in projector)


# ------------------------------------------------------------------------------------------ tiny runs


REPA_STOP = ["run.mode=repa", "alignment.schedule=hard_stop", "alignment.stop_step=7", "train.total_steps=12"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The REPA run with a hard stop at 7 of 12 steps, in one process, in one go: its run directory."""
    config = tiny_config(tmp_path_factory.mktemp("uninterrupted"), "whole", *REPA_STOP)
    Trainer(config).run()
    return config.run_dir


def _watched_run(config, monkeypatch):
    """Run ``config``, recording per step: the phase, whether the batch had images, the teacher's calls."""
    seen: list[dict] = []
    step_call, targets = TrainStep.__call__, Teacher.targets

    def step(self, engine, phase, s, batch, *args, **kwargs):
        seen.append({"step": s, "phase": phase.name, "images": "images" in batch, "teacher": 0})
        return step_call(self, engine, phase, s, batch, *args, **kwargs)

    def counted(self, *args, **kwargs):
        seen[-1]["teacher"] += 1
        return targets(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(TrainStep, "__call__", step)
        patch.setattr(Teacher, "targets", counted)
        stats = Trainer(config).run()
    return seen, stats


def _without_denoise(monkeypatch):
    """Plans without the post-stop phase: λ is 0 from E on, but the teacher and projector still run."""
    monkeypatch.setattr(phases_module, "with_stop", lambda phase: [phase])


def _final(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))


def _assert_same_run(a_dir, b_dir, grad_norm_rel=0.0):
    """Bitwise the same losses and λ; the gradient norm to ``grad_norm_rel`` (a None gradient and a zero one
    enter the norm's reduction differently, in the last bit)."""
    a, b = read(a_dir), read(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "loss_diffusion", "lambda"):
            assert x.get(key) == y.get(key), (x["step"], key)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=grad_norm_rel, abs=0), x["step"]


@pytest.mark.slow
def test_repa_hard_stop_switches_the_teacher_off_and_keeps_the_optimizer_state(tmp_path, monkeypatch, capsys):
    config = tiny_config(tmp_path, "stop", *REPA_STOP)
    seen, stats = _watched_run(config, monkeypatch)
    out = capsys.readouterr().out
    line = ("alignment weights are 0 from step 7 on: teacher, projector, attention capture and image decode switched "
            "off")
    assert out.count(line) == 1 and "phase denoise: steps [7, 12)" in out
    assert out.count("teacher released") == 1 and (config.run_dir / "reference" / "0000012.pt").is_file()
    assert [(r["step"], r["phase"]) for r in seen] == [(s, "repa" if s < 7 else "denoise") for s in range(12)]
    assert all(r["images"] and r["teacher"] == 1 for r in seen[:7])
    assert not any(r["images"] or r["teacher"] for r in seen[7:])
    records = read(config.run_dir)
    assert [r["phase"] for r in records] == ["repa"] * 7 + ["denoise"] * 5
    assert all(r["lambda"] == 0.5 and "loss_align" in r for r in records[:7])
    assert all(r["lambda"] == 0.0 and "loss_align" not in r and r["loss"] == r["loss_diffusion"]
               for r in records[7:])
    assert stats["repa"].steps == 7 and stats["denoise"].steps == 5
    assert "denoise" in out.split("phase    steps")[-1]  # the end-of-run table has its row

    # The same run, computing everything with λ = 0 after E: the same losses and the same weights and EMA but
    # for the projector (no gradient after E, where λ·0 still hands it zeros for AdamW's moments).
    _without_denoise(monkeypatch)
    full = tiny_config(tmp_path, "computed", *REPA_STOP)
    seen_full, _ = _watched_run(full, monkeypatch)
    assert all(r["teacher"] == 1 and r["images"] for r in seen_full)
    _assert_same_run(config.run_dir, full.run_dir, grad_norm_rel=1e-6)
    # Bitwise one step after E (AdamW went on from its moments: fresh ones would move the weights far more); at the
    # end to rounding (a step clipped by a norm that differs in the last bit, see above).
    after = [load_checkpoint(d / "checkpoints" / "step_0000008.pt") for d in (config.run_dir, full.run_dir)]
    a, b = _final(config.run_dir), _final(full.run_dir)
    for part in ("model", "ema"):
        others = [k for k in b[part] if not k.startswith("projectors.")]
        assert others and all(torch.equal(after[0][part][k], after[1][part][k]) for k in others), part
        for k in others:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6)
    moments = a["optimizer"]["state"]
    assert len(moments) == len(b["optimizer"]["state"])  # the projector's moments are kept, from before E
    at_stop = load_checkpoint(config.run_dir / "checkpoints" / "step_0000007.pt")
    assert at_stop["phase"] == "repa"
    model = SiT(encoder_depth=3, **config.model.sit_kwargs([192]))  # the optimizer's parameter order
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    projector_ids = [i for i, n in enumerate(trainable) if n.startswith("projectors.")]
    assert projector_ids and len(trainable) == len(moments)
    for i in projector_ids:  # untouched after E: no gradient, so AdamW skipped them
        assert torch.equal(moments[i]["exp_avg"], at_stop["optimizer"]["state"][i]["exp_avg"])


@pytest.mark.slow
def test_resume_across_the_stop_is_exact(tmp_path, uninterrupted, monkeypatch, capsys):
    for budget in (6, 2, None):  # stops at E-1 = 6 and at E+1 = 8
        extra = [] if budget is None else [f"train.max_steps_per_run={budget}"]
        if budget is None:  # resumed at 8, after the stop: the teacher is not even loaded
            monkeypatch.setattr("erw_fast.encoders.load_encoders", _no_encoders)
            capsys.readouterr()
        Trainer(tiny_config(tmp_path, "pieces", *REPA_STOP, *extra)).run()
    assert "teacher: not loaded (the run resumes after its alignment stopped)" in capsys.readouterr().out
    monkeypatch.undo()
    for budget in (7, None):  # stops at E itself, after the hand-over
        extra = [] if budget is None else [f"train.max_steps_per_run={budget}"]
        Trainer(tiny_config(tmp_path, "at_stop", *REPA_STOP, *extra)).run()
    for name in ("pieces", "at_stop"):
        _assert_same_run(uninterrupted, tmp_path / name)
        a, b = _final(uninterrupted), _final(tmp_path / name)
        assert a["phase"] == b["phase"] == "denoise"
        for part in ("model", "ema"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (name, part)


def _no_encoders(*args, **kwargs):
    raise AssertionError("the teacher was loaded after the alignment stopped")


@pytest.mark.slow
def test_erw_with_a_hard_stop_inside_phase_2(tmp_path, monkeypatch, capsys):
    extra = ["alignment.stop_step=10"]  # ERW's decay until step 10 of 14 (Phase 2 from 6)
    config = tiny_config(tmp_path, "erw", *extra)
    seen, stats = _watched_run(config, monkeypatch)
    out = capsys.readouterr().out
    assert "ERW transfer at step 6" in out and out.count("alignment weights are 0 from step 10 on") == 1
    records = read(config.run_dir)
    assert [r["phase"] for r in records] == ["warmup"] * 6 + ["full"] * 4 + ["denoise"] * 4
    schedule = ERWLambdaSchedule(2.0, 6, 14, 4)
    for r in records[6:10]:
        assert r["lambda"] == pytest.approx(schedule(r["step"] - 1))
    assert all(r["lambda"] == 0.0 for r in records[10:])
    assert not any(r["teacher"] or r["images"] for r in seen[10:])
    assert stats["denoise"].steps == 4
    _without_denoise(monkeypatch)
    full = tiny_config(tmp_path, "erw_computed", *extra)
    Trainer(full).run()
    _assert_same_run(config.run_dir, full.run_dir, grad_norm_rel=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_through_the_stop_match_one_process(tmp_path, uninterrupted):
    """DDP over gloo, 2 ranks (the projector is ignored by DDP after the stop) = one process, to rounding."""
    out = launch(tmp_path, "two", *REPA_STOP)
    assert "global 8 = 2 device(s) × 4 per device" in out and "alignment weights are 0 from step 7 on" in out
    a, b = read(uninterrupted), read(tmp_path / "two")
    assert [r["phase"] for r in a] == [r["phase"] for r in b] == ["repa"] * 7 + ["denoise"] * 5
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "loss_diffusion", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)


# ------------------------------------------------------------------------------------- the benchmark and FLOPs


@pytest.mark.slow
def test_bench_times_the_steps_after_the_stop_and_flops_drop_the_teacher_and_projector():
    """``erw-bench train --phases repa,denoise``: the post-stop step runs (no teacher: its encoder region is
    empty) and costs the REPA step less the teacher's forward and the projector's forward + backward."""
    from erw_fast import flops as F
    from erw_fast.bench import train as bench_train

    tiny = ["model.name=SiT-S/2", "model.input_size=8", "model.depth=2", "model.hidden_size=64",
            "model.num_heads=2", "model.num_classes=10", "model.projector_dim=64", "encoder.names=[demo-vit-t]",
            "encoder.resolution=64", "data.image_size=64", "train.precision=fp32", "alignment.backend=torch",
            "alignment.encoder_depth=2"]
    settings = bench_train.TrainSettings(overrides=tiny, phases=["repa", "denoise"], batches=[2], steps=1,
                                         warmup=0, device="cpu")
    doc = bench_train.run_train_benchmark(settings)
    repa, denoise = doc["results"]
    assert repa["status"] == denoise["status"] == "ok" and denoise["phase"] == "denoise"
    assert repa["breakdown_median_s"]["encoder"] > 0 and denoise["breakdown_median_s"]["encoder"] < 1e-4
    config = bench_train.bench_config(settings, "denoise", 2, torch.device("cpu"))
    assert [p.name for p in plan_phases(config, Teacher(), "torch")] == ["repa", "denoise"]
    r = F.step_flops(config, "repa")
    projector = F.projector_flops(64, 2, 16, [192], 64)
    expected = r["total"] - r["encoder_forward"] - projector.training()
    assert denoise["gflops_per_step"] * 1e9 == pytest.approx(expected, rel=1e-12)
    assert F.step_flops(config, "denoise")["total"] == F.step_flops(config, "sit")["total"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_zero3_through_the_stop_and_resumed_after_it(tmp_path, uninterrupted):
    """DeepSpeed ZeRO-3 on 2 ranks (gloo): the hand-over restores its native checkpoint at E; stopped at E+1 and
    resumed, the run gives the one-process run's losses to rounding."""
    args = (*REPA_STOP, "engine.zero_stage=3")
    first = launch(tmp_path, "z3", *args, "train.max_steps_per_run=8", launcher="deepspeed")
    assert "ZeRO-3 over 2 rank(s)" in first and "alignment weights are 0 from step 7 on" in first
    second = launch(tmp_path, "z3", *args, launcher="deepspeed")
    assert "at step 8 (phase denoise)" in second and "alignment weights are 0" not in second
    a, b = read(uninterrupted), read(tmp_path / "z3")
    assert [r["phase"] for r in a] == [r["phase"] for r in b] == ["repa"] * 7 + ["denoise"] * 5
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)
