"""Preemption on a cluster, with real launchers and real signals: a stop signal sent to the whole process group
reaches the loader's worker processes too (webdataset DataLoader workers, loader threads, DALI python workers), and
the run still stops at a step boundary with a checkpoint and exit code 128 + signal; a launcher that dies (the
torchrun agent SIGKILLed, the ``deepspeed`` CLI SIGTERMed) leaves no rank training on as an orphan; DeepSpeed's
shared-memory files are gone after the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from _trainer_helpers import REPO, TINY, _free_port

from erw_fast.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _records(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _start(cmd: list[str], run_dir: Path, at_least: int = 3) -> subprocess.Popen:
    """Launch in a new session (a job step's process group) and wait until ``at_least`` steps are logged."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while _records(run_dir) < at_least:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended or stalled before step {at_least}:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.1)
    return proc


def _has_rank(process: psutil.Process) -> bool:
    try:
        return "LOCAL_RANK" in process.environ()
    except psutil.Error:
        return False


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The training processes: launched with LOCAL_RANK by a launcher without it (their forked loader workers
    inherit the variable, from their rank)."""
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if _has_rank(p) and not _has_rank(p.parent())]


def _loader_workers(rank: psutil.Process) -> list[psutil.Process]:
    return rank.children(recursive=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from _shard_helpers import write_dataset

    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, num_samples=40, per_shard=12, image_size=64, features=False, num_classes=4)
    return root


@pytest.mark.parametrize(
    ("loader", "sig", "to", "ranks"),
    [
        ("webdataset workers", "SIGTERM", "agent", 1),  # torchrun's agent forwards it with killpg
        ("webdataset threads", "SIGTERM", "agent", 1),
        # As SLURM signals every process of the step; two ranks agree at the next logging step, so the loader
        # must go on delivering batches after the signal.
        ("dali workers", "SIGUSR1", "rank groups", 2),
    ],
)
def test_a_stop_signal_to_the_process_group_checkpoints_with_loader_workers(tmp_path, shards, loader, sig, to,
                                                                            ranks):
    data = {"webdataset workers": ["data.kind=webdataset", "data.num_workers=2"],
            "webdataset threads": ["data.kind=webdataset", "data.num_workers=0", "data.loader_threads=2"],
            "dali workers": ["data.kind=dali", "data.num_workers=1", "logging.log_every=4"]}[loader]
    run_dir = tmp_path / "run"
    args = [*TINY, f"run.output_dir={tmp_path}", "run.name=run", f"data.path={shards}", *data,
            "train.total_steps=400", "erw.warmup_steps=4", "checkpoint.every=1000"]
    agent = _start([*TORCHRUN, "--nproc_per_node", str(ranks), str(REPO / "train.py"), *args], run_dir)
    rank_procs = _ranks(agent)
    assert len(rank_procs) == ranks
    workers = [w for rank in rank_procs for w in _loader_workers(rank)]
    assert bool(workers) == ("workers" in loader), workers
    if to == "agent":
        agent.send_signal(signal.Signals[sig])
    else:
        for rank in rank_procs:
            os.killpg(rank.pid, signal.Signals[sig])  # each rank and its loader workers
    output, _ = agent.communicate(timeout=120)
    assert "killed by signal" not in output and "DALI failed" not in output, output[-3000:]
    assert f"{sig} received: stopped at step" in output, output[-3000:]
    if to == "rank groups":  # the agent reports how its worker ended (signalled itself, it says nothing of it)
        assert f"exitcode  : {128 + signal.Signals[sig]}" in output, output[-3000:]
    stopped_at = load_checkpoint(latest_checkpoint(run_dir))["step"]
    assert 3 <= stopped_at < 400 and f"stopped at step {stopped_at} with a checkpoint" in output
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]  # none left behind


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def test_the_ranks_of_a_killed_torchrun_agent_stop_with_a_checkpoint(tmp_path):
    """SIGKILL of the agent (an OOM kill, a node agent's cleanup): its two ranks used to train on to the end."""
    run_dir = tmp_path / "run"
    args = [*TINY, f"run.output_dir={tmp_path}", "run.name=run", "train.total_steps=300", "checkpoint.every=1000",
            "logging.log_every=2"]
    agent = _start([*TORCHRUN, "--nproc_per_node", "2", str(REPO / "train.py"), *args], run_dir, at_least=2)
    ranks = _ranks(agent)
    assert len(ranks) == 2
    agent.kill()
    agent.wait()
    alive = _wait_gone(ranks, timeout=120)
    assert not alive, "orphaned ranks are still training"
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert 2 <= state["step"] < 300 and state["step"] % 2 == 0  # agreed at a logging step, saved by both ranks


def test_sigterm_to_the_deepspeed_cli_stops_its_ranks_with_a_checkpoint(tmp_path):
    """The `deepspeed` CLI dies of SIGTERM without passing it on; its launch.py and the ranks used to go on."""
    run_dir = tmp_path / "run"
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    args = [*TINY, f"run.output_dir={tmp_path}", "run.name=run", "train.total_steps=300", "checkpoint.every=1000",
            "logging.log_every=2"]
    cli = _start([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                  str(_free_port()), str(REPO / "train.py"), *args], run_dir, at_least=2)
    ranks = _ranks(cli)
    assert len(ranks) == 2
    cli.send_signal(signal.SIGTERM)
    cli.communicate(timeout=60)
    alive = _wait_gone(ranks, timeout=120)
    assert not alive, "orphaned ranks are still training"
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert 2 <= state["step"] < 300 and state["engine"]["kind"] == "deepspeed"
    leaked = {n for n in set(os.listdir("/dev/shm")) - before if n.startswith("deepspeed_allreduce_buffer")} \
        if before or os.path.isdir("/dev/shm") else set()
    assert not leaked, f"DeepSpeed's shared-memory files left behind: {leaked}"
