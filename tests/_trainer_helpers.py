"""The tiny CPU run shared by the trainer and engine tests, and launchers for multi-rank runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from erw_fast.config import load_config

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "run.device=cpu", "model.name=SiT-S/2", "model.input_size=8", "model.num_classes=4", "model.depth=4",
    "model.hidden_size=32", "model.num_heads=2", "model.projector_dim=32", "encoder.names=[demo-vit-t]",
    "encoder.pretrained=false", "alignment.encoder_depth=3", "alignment.backend=torch", "erw.warmup_steps=6",
    "erw.warmup_depth=2", "erw.c0=2.0", "erw.half_life=4", "train.total_steps=14", "train.global_batch_size=8",
    "train.precision=fp32", "data.num_samples=64", "data.image_size=64", "encoder.resolution=64", "logging.log_every=1",
    "logging.progress=false", "logging.plot=false", "checkpoint.every=4", "checkpoint.keep_last=10",
    "optim.lr=1e-3", "optim.ema_decay=0.9",
]


def tiny_config(tmp_path, name="run", *extra):
    return load_config(None, [*TINY, f"run.output_dir={tmp_path}", f"run.name={name}", *extra])


def read(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, *extra, ranks=2, launcher="torchrun", flags=()):
    """Run train.py on `ranks` CPU processes (gloo) with the torchrun or the deepspeed launcher; returns stdout."""
    args = [*flags, *TINY, f"run.output_dir={tmp_path}", f"run.name={name}", *extra]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(_free_port())]
    result = subprocess.run([*cmd, str(REPO / "train.py"), *args], capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def short_demo_run(out, *extra):
    """``make demo``'s config cut to 6 steps (2 of warmup) on 64 samples, trained in ``out``/demo; its config."""
    from erw_fast.trainer import Trainer

    config = load_config(REPO / "configs" / "demo.yaml", [
        "train.total_steps=6", "erw.warmup_steps=2", "data.num_samples=64", "train.global_batch_size=8",
        "logging.progress=false", "logging.plot=false", "checkpoint.every=100", f"run.output_dir={out}",
        "run.name=demo", *extra,
    ])
    Trainer(config).run()
    return config
