"""Metric sinks: JSONL always (one record per logged step), TensorBoard and wandb when configured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from erw_fast.atomic import atomic_write_text


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
