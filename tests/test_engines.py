"""Engines: the generated and merged DeepSpeed config, engine selection, world-size-invariant step randomness,
and 2-rank CPU (gloo) runs under DDP and DeepSpeed ZeRO-1/2/3 against one process.

Tolerance of the multi-rank comparisons: everything runs in fp32, and a 2-rank run differs from one process only
in the order of floating-point sums (the gradient all-reduce / reduce-scatter, the EMA all-reduce when gathered).
Measured on this machine: losses agree to ~2e-7 relative and weights to ~2e-6 absolute after 14 steps; the tests
assert 1e-5 relative on losses and gradient norms and 2e-5 absolute on the exported weights and EMA.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _trainer_helpers import REPO, TINY, launch, read, tiny_config

from erw_fast.checkpoint import prune_engine_dirs
from erw_fast.config import ConfigError, load_config
from erw_fast.engines import select_engine
from erw_fast.engines.deepspeed_engine import check_resumable, needs_universal
from erw_fast.engines.ds_config import build_deepspeed_config
from erw_fast.objectives import Interpolant
from erw_fast.randomness import GlobalBatchRandomness
from erw_fast.trainer import Trainer

pytest.importorskip("deepspeed")

LOSS_RTOL, WEIGHT_ATOL = 1e-5, 2e-5


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("one"), "one")
    Trainer(config).run()
    return config.run_dir


def assert_same_run(run_dir, reference_dir):
    ours, ref = read(run_dir), read(reference_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == list(range(1, 15))
    for a, b in zip(ours, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL, abs=1e-7), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOSS_RTOL), a["step"]
    exported = torch.load(run_dir / "reference" / "0000014.pt", weights_only=True)
    expected = torch.load(reference_dir / "reference" / "0000014.pt", weights_only=True)
    for part in ("model", "ema"):
        assert set(exported[part]) == set(expected[part])
        for key, value in expected[part].items():
            torch.testing.assert_close(exported[part][key], value, rtol=0, atol=WEIGHT_ATOL, msg=f"{part} {key}")


# ------------------------------------------------------------------------------------------ multi-rank runs


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_two_ranks_matches_one_process(tmp_path, one_process):
    out = launch(tmp_path, "ddp", "engine.ddp_bucket_mb=1", "engine.ddp_static_graph=true")
    assert "DDP over 2 ranks (bucket 1 MB" in out and "static_graph True" in out
    assert_same_run(tmp_path / "ddp", one_process)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_two_ranks_matches_one_process_with_irepa_and_manifold_terms(tmp_path):
    """iREPA's conv projector (k = 3, mixing neighbouring tokens), its z-scored targets and U-REPA's manifold loss
    (per-image Grams) are per-sample terms: 2 ranks train the same run as one process, both ERW phases. The one
    process accumulates two micro-batches of 4, the ranks' shares, so the conv weight's gradient sums in the same
    groups (measured here: identical exports; against one batch of 8 the conv weight differs by 4.0e-5 after 14
    steps with or without DDP: the split, not the ranks)."""
    terms = ("alignment.projector=conv", "alignment.projector_kernel_size=3", "alignment.target_norm=spatial_zscore",
             "alignment.manifold_weight=3.0")
    reference = tiny_config(tmp_path, "one-irepa", *terms, "train.micro_batch_size=4")
    Trainer(reference).run()
    launch(tmp_path, "ddp-irepa", *terms)
    assert_same_run(tmp_path / "ddp-irepa", reference.run_dir)
    ours, ref = read(tmp_path / "ddp-irepa"), read(reference.run_dir)
    assert all("loss_manifold" in r for r in ref)  # both phases
    for a, b in zip(ours, ref, strict=True):
        assert a["loss_manifold"] == pytest.approx(b["loss_manifold"], rel=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero1_torchrun_matches_one_process_and_resumes_on_one_rank(tmp_path, one_process):
    args = ("engine.kind=deepspeed", "engine.zero_stage=1")
    out = launch(tmp_path, "z1", *args, "train.max_steps_per_run=9")
    assert "ZeRO-1 over 2 rank(s)" in out and "EMA sharded" in out
    shutil.copytree(tmp_path / "z1", tmp_path / "z1-on-one")
    launch(tmp_path, "z1", *args)
    assert "a universal checkpoint" in launch(tmp_path, "z1-on-one", *args, ranks=1)
    assert_same_run(tmp_path / "z1", one_process)
    assert_same_run(tmp_path / "z1-on-one", one_process)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero2_deepspeed_launcher_with_a_user_json_and_accumulation(tmp_path, one_process):
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {
        "stage": 2, "reduce_bucket_size": 500_000, "allgather_bucket_size": 500_000}}))
    out = launch(tmp_path, "z2", "train.micro_batch_size=2", launcher="deepspeed",
                 flags=["--deepspeed_config", str(ds_json)])
    assert "engine deepspeed (a DeepSpeed config was given" in out and "ZeRO-2 over 2 rank(s)" in out
    assert "4 per device = 2 per micro-batch × 2 accumulation step(s)" in out  # DeepSpeed's accumulation too
    written = json.loads((tmp_path / "z2" / "deepspeed_config.json").read_text())
    assert written["zero_optimization"]["reduce_bucket_size"] == 500_000 and written["train_batch_size"] == 8
    assert written["gradient_accumulation_steps"] == 2
    assert_same_run(tmp_path / "z2", one_process)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_zero3_saves_on_two_ranks_and_resumes_on_two_and_on_one(tmp_path, one_process):
    from erw_fast.cli.export import export

    args = ("engine.kind=deepspeed", "engine.zero_stage=3")
    launch(tmp_path, "z3", *args, "train.max_steps_per_run=9")  # stops after the ERW switch, at step 9
    assert (tmp_path / "z3" / "checkpoints" / "deepspeed" / "step_0000009").is_dir()
    shutil.copytree(tmp_path / "z3", tmp_path / "z3-on-one")
    launch(tmp_path, "z3", *args)
    out = launch(tmp_path, "z3-on-one", *args, ranks=1)
    assert "a universal checkpoint" in out and "checkpoint written with 2 rank(s), running with 1" in out
    assert_same_run(tmp_path / "z3", one_process)
    assert_same_run(tmp_path / "z3-on-one", one_process)
    # erw-export consolidates DeepSpeed's shards offline into the same file the run exported at its end
    [pt, *_] = export(tmp_path / "z3" / "checkpoints" / "step_0000014.pt", tmp_path / "export")
    offline, in_run = (torch.load(p, weights_only=True) for p in (pt, tmp_path / "z3" / "reference" / "0000014.pt"))
    assert offline["args"] == in_run["args"] and offline["steps"] == 14
    for part in ("model", "ema"):
        assert set(offline[part]) == set(in_run[part])
        assert all(torch.equal(offline[part][k], in_run[part][k]) for k in in_run[part])
    # erw-sample/erw-eval read a DeepSpeed trainer checkpoint's raw weights from DeepSpeed's files, not its EMA
    from erw_fast.checkpoint import import_reference_checkpoint

    imported = import_reference_checkpoint(tmp_path / "z3" / "checkpoints" / "step_0000014.pt")
    assert all(torch.equal(imported["model"][k], in_run["model"][k]) for k in in_run["model"])
    assert not all(torch.equal(imported["model"][k], imported["ema"][k]) for k in in_run["model"])


# ------------------------------------------------------------------------------------------ the DeepSpeed JSON


def _config(*extra):
    return load_config(None, ["model.name=SiT-B/2", *extra])


def _ds(config, user=None, **kw):
    kw = {"global_batch": 256, "micro_batch": 16, "accumulation": 2, "device": torch.device("cpu"), **kw}
    return build_deepspeed_config(config, user=user, user_source="ds.json", **kw)


def test_generated_config_follows_the_run_config():
    config = _config("optim.lr=2e-4", "optim.grad_clip=0.5", "train.precision=bf16", "optim.betas=[0.9,0.95]")
    ds = _ds(config)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        256, 16, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["zero_optimization"]["stage"] == 1  # the default for one node (README)
    assert ds["optimizer"]["params"]["foreach"] is True  # optim.implementation auto on CPU
    cuda = _ds(config, device=torch.device("cuda", 0))
    assert cuda["optimizer"]["params"]["fused"] is True and cuda["zero_optimization"]["overlap_comm"] is True
    assert _ds(_config("engine.zero_stage=3"))["zero_optimization"]["stage"] == 3


def test_user_json_is_merged_and_conflicts_name_both_values():
    config = _config()
    merged = _ds(config, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                          "train_batch_size": "auto", "optimizer": {"params": {"lr": 1e-4}}})
    assert merged["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert merged["train_batch_size"] == 256
    with pytest.raises(ConfigError) as error:
        _ds(config, {"train_batch_size": 512, "optimizer": {"params": {"lr": 3e-4}}})
    message = str(error.value)
    assert "train_batch_size = 512 in ds.json, but 256 from train.global_batch_size" in message
    assert "optimizer.params.lr = 0.0003 in ds.json, but 0.0001 from optim.lr" in message
    with pytest.raises(ConfigError, match="zero_optimization.stage = 2 in ds.json, but 3 from engine.zero_stage"):
        _ds(_config("engine.zero_stage=3"), {"zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match="bf16.enabled = true in ds.json, but false from train.precision"):
        _ds(_config("train.precision=fp32"), {"bf16": {"enabled": True}})


def test_refused_keys_and_unreadable_files(tmp_path):
    from erw_fast.engines.ds_config import load_user_json

    with pytest.raises(ConfigError, match="'scheduler' is not supported here: the trainer keeps a constant"):
        _ds(_config(), {"scheduler": {"type": "WarmupLR"}})
    with pytest.raises(ConfigError, match="DeepSpeed config not found: .*missing.json"):
        load_user_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_user_json(bad)


def test_engine_selection():
    assert select_engine(_config()) == ("ddp", "launched by torchrun/python")
    assert select_engine(_config(), deepspeed_launcher=True)[0] == "deepspeed"
    assert select_engine(_config(), deepspeed_flag=True)[0] == "deepspeed"
    assert select_engine(_config("engine.deepspeed_config=x.json"))[0] == "deepspeed"
    assert select_engine(_config("engine.kind=deepspeed"))[0] == "deepspeed"
    assert select_engine(_config("engine.kind=ddp"), deepspeed_launcher=True)[0] == "ddp"
    with pytest.raises(ConfigError, match="engine.kind=ddp, but a DeepSpeed config"):
        select_engine(_config("engine.kind=ddp", "engine.deepspeed_config=x.json"))
    with pytest.raises(ConfigError, match="engine.zero_stage must be 0, 1, 2 or 3, got 4"):
        _config("engine.zero_stage=4")


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_resume_under_the_engine_that_wrote_them(tmp_path):
    check_resumable({"engine": {"kind": "deepspeed"}}, "deepspeed", tmp_path / "a.pt")
    check_resumable({"model": {}}, "ddp", tmp_path / "a.pt")  # written before engines were recorded
    with pytest.raises(ConfigError, match="a.pt was written by the deepspeed engine, but this run uses the ddp"):
        check_resumable({"engine": {"kind": "deepspeed"}}, "ddp", tmp_path / "a.pt")
    info = {"zero_stage": 0, "precision": "fp32", "world_size": 2}
    assert not needs_universal(info, 1)  # nothing partitioned
    assert needs_universal({**info, "zero_stage": 2}, 1) and not needs_universal({**info, "zero_stage": 2}, 2)
    assert needs_universal({**info, "precision": "bf16"}, 4)  # DeepSpeed's bf16 optimizer partitions its masters


def test_engine_dirs_without_a_state_file_are_pruned(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step_0000004", "step_0000008", "phase1_0000006"):
        (checkpoints / "deepspeed" / name).mkdir(parents=True)
    (checkpoints / "deepspeed-universal" / "step_0000004").mkdir(parents=True)
    (checkpoints / "deepspeed" / "zero_to_fp32.py").write_text("")
    for name in ("step_0000008", "phase1_0000006"):
        (checkpoints / f"{name}.pt").write_bytes(b"")
    removed = prune_engine_dirs(tmp_path)
    assert sorted(p.relative_to(checkpoints).as_posix() for p in removed) == [
        "deepspeed-universal/step_0000004", "deepspeed/step_0000004"]
    assert sorted(p.name for p in (checkpoints / "deepspeed").iterdir()) == [
        "phase1_0000006", "step_0000008", "zero_to_fp32.py"]


# ------------------------------------------------------------------------------------------ step randomness


def test_step_randomness_does_not_depend_on_the_split():
    def randomness(global_batch=8):
        return GlobalBatchRandomness(seed=3, global_batch=global_batch, latent_shape=(4, 2, 2), class_dropout_prob=0.5,
                                     interpolant=Interpolant("linear"), time_weighting="uniform",
                                     device=torch.device("cpu"))

    r = randomness()
    whole = r.draw(5, 0, 8)
    halves = [r.draw(5, 0, 4), r.draw(5, 4, 4)]
    for field in ("t", "noise", "drop_labels"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(h, field) for h in halves]))
    assert torch.equal(whole.rows(slice(2, 6)).noise, r.draw(5, 2, 4).noise)
    assert not torch.equal(r.draw(6, 0, 8).noise, whole.noise)  # every step draws afresh
    assert torch.equal(randomness().draw(5, 0, 8).noise, whole.noise)  # and reproducibly
    assert whole.t.min() >= 0 and whole.t.max() <= 1 and set(whole.drop_labels.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match=r"rows \[6, 10\) outside the global batch 8"):
        r.draw(5, 6, 4)


_NONFINITE_SCRIPT = """
import sys, torch
import erw_fast.phases as P
import erw_fast.trainer as T
from erw_fast.step import TrainStep
from _trainer_helpers import tiny_config
real = P.diffusion_loss
state = {"step": -1}
def poisoned(*args, **kwargs):
    out = real(*args, **kwargs)
    if state["step"] == 8:
        out.loss = out.loss * float("nan")
    return out
P.diffusion_loss = poisoned
original = TrainStep.__call__
def step(self, engine, phase, step, batch, *args):
    state["step"] = step
    before = engine.full_model_state(), engine.full_ema_state()
    totals = original(self, engine, phase, step, batch, *args)
    after = engine.full_model_state(), engine.full_ema_state()
    changed = any(not torch.equal(b[k], a[k]) for b, a in zip(before, after) for k in b)
    assert changed == (step != 8), (step, changed)
    return totals
TrainStep.__call__ = step
config = tiny_config(sys.argv[1], "nan", "engine.zero_stage=2", "train.precision=" + sys.argv[2])
stats = T.Trainer(config, engine="deepspeed").run()
assert stats["full"].skipped == 1, stats
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_skips_a_nonfinite_step(tmp_path, precision):
    """A NaN loss at step 8: DeepSpeed's overflow check skips the update, the EMA is not touched, the run goes on."""

    result = subprocess.run([sys.executable, "-c", _NONFINITE_SCRIPT, str(tmp_path), precision], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = read(tmp_path / "nan")
    assert [r["step"] for r in records if r["skipped"]] == [9]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["step"] != 9)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_engine_benchmark_runs_every_engine(tmp_path):
    """The single-device engine benchmark on a tiny model (speed is for GPU runs; here it must just work)."""
    script = REPO / "benchmarks" / "bench_engines.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model", "SiT-S/2", "--batch", "4", "--steps", "1", "--warmup", "0",
         "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path), "--tag", "smoke",
         "--scratch", str(tmp_path / "runs"), "--override", "model.input_size=8", "model.depth=2",
         "erw.warmup_depth=1", "alignment.encoder_depth=1",
         "model.hidden_size=32", "model.num_heads=2", "model.projector_dim=32", "model.num_classes=4"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["engine"] for r in report["results"]] == ["ddp", "zero0", "zero1", "zero2"]
    assert all(len(r["step_s"]) == 1 and r["median_step_s"] > 0 for r in report["results"])
    assert "ZeRO-2 over 1 rank(s)" in report["results"][3]["describe"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_under_another_zero_stage_is_a_clear_error(tmp_path):
    launch(tmp_path, "stage", "engine.kind=deepspeed", "engine.zero_stage=2", "train.max_steps_per_run=3", ranks=1)
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *TINY, f"run.output_dir={tmp_path}", "run.name=stage",
         "engine.kind=deepspeed", "engine.zero_stage=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "written with ZeRO-2 and this run is configured for ZeRO-3: resume with engine.zero_stage=2" in result.stderr


# ------------------------------------------------------------------------------- NT-Xent's global negatives

NT_XENT = ("alignment.objective=nt_xent", "alignment.backend=torch")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_nt_xent_global_negatives_give_the_same_run_on_any_world_size_and_accumulation(tmp_path):
    """alignment.negatives_scope=global (the default): every query sees the whole global batch's teacher tokens,
    so one process, accumulation 2 and 2 DDP ranks train the same run; with local negatives they do not."""
    one = tiny_config(tmp_path, "one", *NT_XENT)
    Trainer(one).run()
    Trainer(tiny_config(tmp_path, "acc", *NT_XENT, "train.micro_batch_size=4")).run()
    launch(tmp_path, "ddp", *NT_XENT)
    assert_same_run(tmp_path / "acc", one.run_dir)
    assert_same_run(tmp_path / "ddp", one.run_dir)
    Trainer(tiny_config(tmp_path, "local", *NT_XENT, "alignment.negatives_scope=local",
                        "train.micro_batch_size=4")).run()
    first = {r["step"]: r["loss_align"] for r in read(one.run_dir)}
    local = {r["step"]: r["loss_align"] for r in read(tmp_path / "local")}
    assert abs(local[1] - first[1]) > 1e-3 * abs(first[1])  # half the candidates: another loss
