"""A scheduler's stop signal (time limit, preemption) ends the run at a step boundary with a checkpoint, and the
resumed run continues exactly: one process; two ranks under torchrun whose agent forwards SIGTERM; two DeepSpeed
ranks of which only one receives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from _trainer_helpers import REPO, TINY, read, tiny_config

from erw_fast.checkpoint import latest_checkpoint, load_checkpoint
from erw_fast.config import ConfigError
from erw_fast.step import TrainStep
from erw_fast.stop_signals import StopSignals
from erw_fast.trainer import Trainer, main


def test_the_first_signal_is_recorded_and_previous_handlers_come_back():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with StopSignals(["SIGUSR1", "SIGUSR2"]) as stops:
            assert stops.installed and "SIGUSR1, SIGUSR2" in stops.describe()
            os.kill(os.getpid(), signal.SIGUSR2)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stops.received == signal.SIGUSR2 and stops.votes() == [0.0, 1.0]
        assert seen == []  # ours handled both while installed
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # the previous handler is back
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_ranks_agree_on_one_signal_and_exit_with_its_code():
    stops = StopSignals(["SIGTERM", "SIGUSR1"])
    assert stops.due(world_size=2) is None and stops.exit_code == 0
    stops.agree([0.0, 0.0])
    assert stops.due(world_size=2) is None
    stops.agree([0.0, 3.0])  # three ranks received SIGUSR1
    assert stops.due(world_size=2) == signal.SIGUSR1 and stops.exit_code == 128 + signal.SIGUSR1
    stops.agree([2.0, 0.0])  # decided once: a later vote does not change it
    assert stops.agreed == signal.SIGUSR1

    alone = StopSignals(["SIGTERM"])
    alone.received = signal.SIGTERM
    assert alone.due(world_size=1) == signal.SIGTERM  # one process needs no vote
    assert alone.exit_code == 128 + signal.SIGTERM == 143


def test_unknown_signals_and_other_threads():
    with pytest.raises(ValueError, match=r"cannot stop on \['SIGINT'\]"):
        StopSignals(["SIGINT"])
    assert StopSignals([]).describe() == "stop signals: none handled"
    result = {}

    def enter():
        with StopSignals(["SIGTERM"]) as stops:
            result["installed"], result["text"] = stops.installed, stops.describe()

    worker = threading.Thread(target=enter)
    worker.start()
    worker.join()
    assert result == {"installed": False, "text": "stop signals: none handled (not the main thread)"}


def test_a_bad_signal_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint.stop_signals\[0\]: 'SIGKILL' is not one of"):
        tiny_config(tmp_path, "bad", "checkpoint.stop_signals=[SIGKILL]")


@pytest.mark.slow
def test_a_stop_signal_checkpoints_at_the_next_step_and_the_rerun_continues_exactly(tmp_path, monkeypatch, capsys):
    reference = tiny_config(tmp_path, "uninterrupted")
    Trainer(reference).run()

    original, calls = TrainStep.__call__, {"n": 0}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 9:  # as if the scheduler's SIGUSR1 arrived during step 9 (Phase 2)
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(TrainStep, "__call__", step)
        argv = [*TINY, f"run.output_dir={tmp_path}", "run.name=stopped"]
        assert main(argv) == 128 + signal.SIGUSR1
    assert calls["n"] == 9  # no step after the signal's
    out = capsys.readouterr().out
    assert "stop signals: SIGTERM, SIGUSR1" in out and "SIGUSR1 received: stopped at step 9 with a checkpoint" in out
    stopped_dir = tmp_path / "stopped"
    assert load_checkpoint(latest_checkpoint(stopped_dir))["step"] == 9
    assert main([*TINY, f"run.output_dir={tmp_path}", "run.name=stopped"]) == 0
    got, expected = read(stopped_dir), read(reference.run_dir)
    assert [r["step"] for r in got] == list(range(1, 15))
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]


def _worker_of(agent: subprocess.Popen, local_rank: int) -> psutil.Process:
    for child in psutil.Process(agent.pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank}")


@pytest.mark.parametrize(
    ("engine", "target"),
    [("ddp", "agent"), ("deepspeed", "rank 1")],  # the agent forwards SIGTERM to both; or one rank alone gets it
)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_stops_both_ranks_at_one_step_and_the_rerun_continues_exactly(tmp_path, engine, target):
    steps = ["train.total_steps=60", "checkpoint.every=1000", "erw.warmup_steps=6", f"engine.kind={engine}"]
    args = [*TINY, *steps, f"run.output_dir={tmp_path}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, *args, "run.name=whole"], check=True, capture_output=True, cwd=REPO, env=env, timeout=600)

    agent = subprocess.Popen([*cmd, *args, "run.name=stopped"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 10):
        assert agent.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 10"
        time.sleep(0.05)
    if target == "agent":
        agent.send_signal(signal.SIGTERM)
    else:
        _worker_of(agent, local_rank=1).send_signal(signal.SIGTERM)
    output, _ = agent.communicate(timeout=120)
    assert agent.returncode != 0, output[-3000:]
    assert output.count("SIGTERM received: stopped at step") == 1, output[-3000:]  # logged by rank 0 only
    stopped_at = load_checkpoint(latest_checkpoint(tmp_path / "stopped"))["step"]
    assert 10 <= stopped_at < 60 and f"stopped at step {stopped_at} with a checkpoint" in output

    subprocess.run([*cmd, *args, "run.name=stopped"], check=True, capture_output=True, cwd=REPO, env=env,
                   timeout=600)
    got, expected = read(tmp_path / "stopped"), read(tmp_path / "whole")
    assert [r["step"] for r in got] == list(range(1, 61))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
