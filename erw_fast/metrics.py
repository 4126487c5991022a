"""Metric sinks (JSONL always, one record per logged step; TensorBoard and wandb when configured) and what a
logging step measures: the throughput window and the global-batch means."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from erw_fast.atomic import atomic_write_text
from erw_fast.stop_signals import StopSignals


class MetricsWriter:
    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None,
                 wandb_project: str | None = None, run_name: str = "run", config: dict | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            self._truncate_from(resume_step)
        self._file = path.open("a", buffering=1)
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency

            self._tb = SummaryWriter(str(tensorboard_dir))
        self._wandb = None
        if wandb_project is not None:
            import wandb  # optional dependency

            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def _truncate_from(self, step: int) -> None:
        """A run resumed after `step` completed steps re-logs what came later: drop those records (and a
        half-written last line)."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", -1) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))  # a crash here keeps the old log

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        numeric = {k: v for k, v in clean.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(numeric, step=record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class LogWindow:
    """Throughput since the last logging step: wall time, steps and the time spent waiting for data."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.reset()

    def reset(self) -> None:
        self.started, self.steps, self.data_s = time.perf_counter(), 0, 0.0

    def close(self, device: torch.device) -> tuple[float, dict[str, float]]:
        """(elapsed seconds, img/s and per-step times); waits for the device first, then starts a new window."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - self.started
        steps = max(self.steps, 1)
        rates = {"img_per_s": self.steps * self.global_batch / elapsed, "step_time_s": elapsed / steps,
                 "data_time_s": self.data_s / steps}
        self.reset()
        return elapsed, rates


def global_means(totals: dict[str, torch.Tensor], world_size: int, device: torch.device,
                 stop_signals: StopSignals) -> dict[str, float]:
    """Logged values are means over the global batch (one all-reduce, at logging steps only), so a run logs the
    same numbers on any world size. The same all-reduce carries whether any rank received a stop signal, so all
    ranks stop at the same step boundary."""
    n = len(totals)
    values = torch.stack([v.detach().float().to(device).reshape(()) for v in totals.values()])
    if world_size > 1:
        packed = torch.cat([values, torch.tensor(stop_signals.votes(), device=device)])
        dist.all_reduce(packed)
        values = torch.cat([packed[:n] / world_size, packed[n:]])
    flat = values.tolist()  # one host sync
    if world_size > 1:
        stop_signals.agree(flat[n:])
    return dict(zip(totals, flat[:n], strict=True))
