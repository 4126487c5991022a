"""Metric sinks (JSONL always, one record per logged step; TensorBoard and wandb when configured) and what a
logging step measures: the throughput window and the global-batch means."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from erw_fast.atomic import atomic_write_text
from erw_fast.stop_signals import StopSignals

if TYPE_CHECKING:
    from erw_fast.config import Config
    from erw_fast.log_sinks import LogSink


class MetricsWriter:
    """Rank 0's training log: ``metrics.jsonl`` (one record per logged step) and the configured trackers
    (``log_sinks``), which also take the monitors' images and scalars and the phase switch on the same step axis."""

    def __init__(self, path: Path, resume_step: int | None = None, sinks: Sequence[LogSink] = ()) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            self._truncate_from(resume_step)
        self._file = path.open("a", buffering=1)
        self.sinks = list(sinks)

    @classmethod
    def for_run(cls, config: Config, resume_step: int) -> MetricsWriter:
        """The run's writer: TensorBoard under ``<run_dir>/tb`` (logging.tensorboard), W&B (logging.wandb)."""
        from erw_fast.log_sinks import TensorBoardSink, WandbSink

        log, run_dir = config.logging, config.run_dir
        sinks: list[LogSink] = []
        if log.tensorboard:
            sinks.append(TensorBoardSink(run_dir / "tb", resume_step))
        if log.wandb:
            sinks.append(WandbSink(run_dir, log.wandb_project, config.run.name, config.to_dict()))
        return cls(run_dir / "metrics.jsonl", resume_step=resume_step, sinks=sinks)

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
        numeric = {k: v for k, v in clean.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}
        self.scalars(record["step"], numeric)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars to the trackers only (the monitors keep their own ``monitor.jsonl``)."""
        for sink in self.sinks:
            sink.scalars(step, values)

    def image(self, tag: str, step: int, image: np.ndarray, caption: str = "") -> None:
        for sink in self.sinks:
            sink.image(tag, step, image, caption)

    def phase_switch(self, step: int, previous: str, phase: str, index: int) -> None:
        """The phase switch at the step it happens (the first step of ``phase``), as a scalar and a text entry."""
        for sink in self.sinks:
            sink.scalars(step, {"phase_switch": index})
            sink.text("phase_switch_text", step, f"step {step}: {previous} → {phase}")

    def close(self) -> None:
        self._file.close()
        for sink in self.sinks:
            sink.close()


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
