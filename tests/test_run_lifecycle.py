"""A run's life on a cluster beyond one uninterrupted job: reruns of a finished run, rollbacks, two trainers on one
run directory, resumes with changed settings, kills while files are rewritten, failed exports, monitors whose
resources are missing, and the data-skip counter across resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from _trainer_helpers import REPO, TINY, read

from erw_fast.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from erw_fast.trainer import main


def argv(tmp_path, name="run", *extra):
    return [*TINY, f"run.output_dir={tmp_path}", f"run.name={name}", *extra]


def _mtimes(paths):
    return {p.name: p.stat().st_mtime_ns for p in paths}


# ------------------------------------------------------------------------------------------- 3: reruns


@pytest.mark.slow
def test_a_finished_run_reports_in_phase_order_and_a_rerun_rewrites_nothing(tmp_path, capsys):
    assert main(argv(tmp_path, "run", "train.max_steps_per_run=9")) == 0  # stops in Phase 2
    capsys.readouterr()
    assert main(argv(tmp_path)) == 0  # resumed in Phase 2: its stats come back first
    table = capsys.readouterr().out.split("phase   steps")[1].splitlines()
    rows = [line.split()[0] for line in table if line.split() and line.split()[0] in ("warmup", "full", "total")]
    assert rows == ["warmup", "full", "total"]
    full_loss, total_loss = (line.split()[5] for line in table if line.split()[:1] in (["full"], ["total"]))
    assert total_loss == full_loss  # the total's final loss is the last phase's

    run_dir = tmp_path / "run"
    final = [*list_checkpoints(run_dir), *sorted((run_dir / "reference").iterdir())]
    before = _mtimes(final)
    assert main(argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "run run is already complete" in out and "nothing to do" in out and "warmup " in out
    assert _mtimes(final) == before and len(read(run_dir)) == 14

    assert main(argv(tmp_path, "run", "checkpoint.reexport=true")) == 0  # asked: the export only
    after = _mtimes(final)
    assert {n for n in before if before[n] != after[n]} == {"0000014.pt", "0000014.model.safetensors",
                                                            "0000014.ema.safetensors"}


# ------------------------------------------------------------------------------------------- 4: rollback


@pytest.mark.slow
def test_a_rollback_starts_a_branch_and_auto_never_returns_to_the_abandoned_one(tmp_path, capsys):
    assert main(argv(tmp_path)) == 0  # 14 steps, checkpoints 4, phase1_6, 8, 12, 14
    run_dir = tmp_path / "run"
    whole = [r["loss"] for r in read(run_dir)]
    step8 = run_dir / "checkpoints" / "step_0000008.pt"
    # Roll back to step 8; preempted 2 steps later; rerun with auto.
    assert main(argv(tmp_path, "run", f"checkpoint.resume={step8}", "train.max_steps_per_run=2")) == 0
    out = capsys.readouterr().out
    assert "rollback: resuming from step_0000008.pt (step 8) starts a new branch" in out
    (aside,) = (run_dir / "checkpoints" / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "reference", "step_0000012.pt",
                                                       "step_0000014.pt"]
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [9, 10, 11,
                                                                                                        12, 13, 14]
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 10
    assert main(argv(tmp_path)) == 0
    assert "resumed from" in (out := capsys.readouterr().out) and "step_0000010.pt at step 10" in out
    assert [r["step"] for r in read(run_dir)] == list(range(1, 15))
    assert [r["loss"] for r in read(run_dir)] == whole  # the same data and noise: the branch retraces the run

    assert main(argv(tmp_path, "run", "checkpoint.resume=none", "train.max_steps_per_run=1")) == 0  # start over
    assert "rollback: starting over starts a new branch" in capsys.readouterr().out
    assert len(list((run_dir / "checkpoints" / "abandoned").iterdir())) == 2
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000001.pt"] and len(read(run_dir)) == 1


# ------------------------------------------------------------------------------------------- 5: two trainers


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_second_trainer_on_a_run_directory_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    train = [sys.executable, str(REPO / "train.py"), *argv(tmp_path, "run", "checkpoint.every=1000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*train, "train.total_steps=400"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    second = subprocess.run([*train, "train.max_steps_per_run=2"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert f"is in use by another trainer: host {os.uname().nodename}, pid {first.pid}" in line

    first.send_signal(signal.SIGKILL)  # dies holding the lock
    first.wait()
    third = subprocess.run([*train, "train.max_steps_per_run=1"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taken over from host {os.uname().nodename}, pid {first.pid}" in third.stdout
    steps = [r["step"] for r in read(tmp_path / "run")]
    assert steps == sorted(set(steps))  # one writer at a time: no duplicate or out-of-order records


# ------------------------------------------------------------------------------------------- 7: changed settings


@pytest.mark.slow
def test_a_resume_honours_or_refuses_each_changed_setting(tmp_path, capsys):
    assert main(argv(tmp_path, "run", "train.max_steps_per_run=9")) == 0
    run_dir = tmp_path / "run"
    config_before = (run_dir / "config.yaml").read_text()
    for change, key, old, new in (("run.seed=3", "run.seed", "0", "3"),
                                  ("model.hidden_size=64", "model.hidden_size", "32", "64"),
                                  ("run.mode=repa", "run.mode", "'erw'", "'repa'"),
                                  ("erw.warmup_steps=5", "erw.warmup_steps", "6", "5"),
                                  ("train.global_batch_size=4", "train.global_batch_size", "8", "4")):
        capsys.readouterr()
        assert main(argv(tmp_path, "run", change)) == 2, change
        err = capsys.readouterr().err
        assert err.startswith("config error: resume from") and f"{key}: {old} → {new}" in err, err
        assert (run_dir / "config.yaml").read_text() == config_before  # a refused resume writes nothing
    assert main(argv(tmp_path, "run", "optim.lr=5e-4", "optim.weight_decay=0.01", "train.max_steps_per_run=2")) == 0
    out = capsys.readouterr().out
    assert "resume with changed settings (honoured): optim.lr: 0.001 → 0.0005; optim.weight_decay: 0.0 → 0.01" in out
    assert [r["lr"] for r in read(run_dir)][8:] == [1e-3, 5e-4, 5e-4]  # applied to the restored optimizer
    optimizer = load_checkpoint(latest_checkpoint(run_dir))["optimizer"]
    assert all(g["lr"] == 5e-4 and g["weight_decay"] == 0.01 for g in optimizer["param_groups"])


# ------------------------------------------------------------------------------------------- 8: kills mid-rewrite

# Runs the trainer with every write to a file named like TARGET ending in SIGKILL before its first byte (after the
# file was opened, i.e. truncated when it is written in place): a kill at the worst moment of that rewrite.
_KILL_ON_WRITE = textwrap.dedent("""
    import builtins, io, os, signal, sys
    target, opened = os.environ["KILL_ON_WRITE"], io.open

    class Doomed:
        def __init__(self, f):
            self._f = f
        def write(self, data):
            os.kill(os.getpid(), signal.SIGKILL)
        def __getattr__(self, name):
            return getattr(self._f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self._f.close()

    def open_(file, mode="r", *args, **kwargs):
        f = opened(file, mode, *args, **kwargs)
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        return Doomed(f) if target in os.path.basename(name) and any(m in mode for m in "wa+") else f

    io.open = builtins.open = open_
    from erw_fast.trainer import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("target", ["config.yaml", "metrics.jsonl"])
@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_kill_while_the_run_files_are_rewritten_on_resume_loses_nothing(tmp_path, target):
    assert main(argv(tmp_path, "run", "train.max_steps_per_run=10")) == 0
    run_dir = tmp_path / "run"
    config, records = (run_dir / "config.yaml").read_text(), (run_dir / "metrics.jsonl").read_text()
    again = argv(tmp_path, "run", "train.max_steps_per_run=10")  # the same command: config.yaml is rewritten as is
    killed = subprocess.run([sys.executable, "-c", _KILL_ON_WRITE, *again], cwd=REPO, capture_output=True,
                            env={**os.environ, "KILL_ON_WRITE": target}, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / "config.yaml").read_text() == config
    assert (run_dir / "metrics.jsonl").read_text() == records  # all 10 records, no torn line


# ------------------------------------------------------------------------------------------- 10: exports


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import erw_fast.checkpoint_state as checkpoint_state

    model = {"w": torch.ones(3, 2), "b": torch.zeros(3)}
    out = tmp_path / "reference"
    paths = checkpoint_state.export_consolidated(model, model, {"model": "SiT"}, 5, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original, calls = checkpoint_state.export_safetensors, []

    def disk_full_on_the_second(state, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(state, path)

    monkeypatch.setattr(checkpoint_state, "export_safetensors", disk_full_on_the_second)
    for step in (5, 6):  # over an earlier export of the same step, and a new step
        calls.clear()
        with pytest.raises(OSError, match="No space"):
            checkpoint_state.export_consolidated({"w": torch.full((3, 2), 2.0)}, model, {}, step, out)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # all or nothing, no temp left


# ------------------------------------------------------------------------------------------- 2: monitors


def test_missing_monitor_resources_are_config_errors_at_start_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for extra, key in ((["logging.sample_every=2", "logging.sample_vae=ema"], "logging.sample_vae"),
                       (["logging.fid_every=2", "logging.fid_samples=8"], "logging.fid_inception"),
                       (["logging.cknna_every=2", "run.mode=sit"], "logging.cknna_every")):
        assert main(argv(tmp_path, "run", *extra)) == 2
        err = capsys.readouterr().err
        assert f"config error: {key}: " in err, err
        assert not (tmp_path / "run").exists()  # nothing written, nothing built


@pytest.mark.slow
def test_a_monitor_failing_later_is_logged_and_switched_off_never_the_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "samples").write_text("a file where the grids go: writing one fails")
    assert main(argv(tmp_path, "run", "logging.sample_every=7", "logging.sample_steps=2", "logging.sample_count=4",
                     "logging.cknna_every=7", "logging.cknna_samples=8")) == 0
    out = capsys.readouterr().out
    assert out.count("monitor samples (logging.sample_every) failed at step 7 and is off") == 1
    assert [r["step"] for r in read(tmp_path / "run")] == list(range(1, 15))
    cknna = [json.loads(line)["step"] for line in (tmp_path / "run" / "monitor.jsonl").read_text().splitlines()]
    assert cknna == [7, 14]  # the other monitor goes on


# ------------------------------------------------------------------------------------------- data skips


@pytest.mark.slow
def test_the_count_of_skipped_samples_survives_a_resume(tmp_path):
    from _shard_helpers import patch_image, write_dataset

    root = tmp_path / "shards"
    write_dataset(root, num_samples=40, per_shard=12, image_size=64, features=False, num_classes=4)
    patch_image(root, 3, lambda png: bytes(len(png)))  # unreadable
    common = ["data.kind=webdataset", f"data.path={root}", "data.num_workers=0", "data.on_error=skip",
              "train.total_steps=12", "erw.warmup_steps=4"]
    assert main(argv(tmp_path, "whole", *common)) == 0
    assert main(argv(tmp_path, "pieces", *common, "train.max_steps_per_run=9")) == 0
    assert main(argv(tmp_path, "pieces", *common)) == 0
    whole, pieces = (load_checkpoint(latest_checkpoint(tmp_path / n))["data"]["skipped"] for n in ("whole", "pieces"))
    assert whole == pieces > 0


def test_on_a_file_system_without_locks_a_dead_holders_lock_file_is_taken_over(tmp_path, monkeypatch):
    import errno
    import fcntl
    import socket

    from erw_fast.run_lock import RunLock, RunLockedError

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    held = tmp_path / "run.lock.held"
    alive, gone = os.getppid(), 2**22 + 7  # beyond Linux's largest pid: no such process
    held.write_text(json.dumps({"host": socket.gethostname(), "pid": alive, "started": 0}))
    with pytest.raises(RunLockedError, match=f"pid {alive} .*remove {held}"):
        RunLock(tmp_path).acquire()
    held.write_text(json.dumps({"host": socket.gethostname(), "pid": gone, "started": 0}))
    with RunLock(tmp_path) as lock:  # its holder is gone: taken over
        assert lock.took_over["pid"] == gone and json.loads(held.read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match="in use by another trainer"):
            RunLock(tmp_path).acquire()  # a second one in this process too
    assert not held.exists()
