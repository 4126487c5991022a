"""The optional experiment trackers of the training log: TensorBoard and Weights & Biases.

Both take the same three kinds of entries on the step axis of ``metrics.jsonl`` (``step`` = completed optimizer
steps): scalars (the logged records, FID, CKNNA, the phase index), images (the monitor's sample grids) and text (the
phase switch). Only rank 0 builds them (the trainer's ``MetricsWriter``).

Resuming: TensorBoard purges what an earlier invocation logged after the resume step (``purge_step``), as
``metrics.jsonl`` is truncated. W&B continues the same run: its id is kept in ``<run_dir>/wandb_id`` and passed with
``resume="allow"``; W&B itself ignores entries at a step below the last one it holds, so steps an interrupted
invocation had already sent after its last checkpoint keep their first values there.
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from erw_fast.atomic import atomic_write_text
from erw_fast.config import ConfigError

WANDB_ID_FILE = "wandb_id"


class LogSink(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def image(self, tag: str, step: int, image: np.ndarray, caption: str = "") -> None: ...

    def text(self, tag: str, step: int, text: str) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, log_dir: Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # the tb extra

        # A resumed run re-logs the steps after its checkpoint: TensorBoard drops the earlier invocation's events
        # from resume_step + 1 on (metrics.jsonl keeps the records up to resume_step the same way).
        purge = resume_step + 1 if resume_step is not None else None
        self._writer = SummaryWriter(str(log_dir), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def image(self, tag: str, step: int, image: np.ndarray, caption: str = "") -> None:
        self._writer.add_image(tag, image, step, dataformats="HWC")  # uint8 (H, W, 3)

    def text(self, tag: str, step: int, text: str) -> None:
        self._writer.add_text(tag, text, step)

    def close(self) -> None:
        self._writer.close()


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B run id: the stored one, or a new one stored now (atomically, before W&B starts, so
    an invocation that dies during ``wandb.init`` still hands its id to the next)."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's form
    atomic_write_text(path, run_id + "\n")
    return run_id


class WandbSink:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any] | None = None) -> None:
        import wandb  # the wandb extra

        self._wandb = wandb
        # Its files go beside the run's own unless WANDB_DIR says otherwise (wandb's default is the working dir).
        # Passed explicitly: wandb reads the environment once per process, at its first init.
        where = os.environ.get("WANDB_DIR") or str(run_dir)
        try:
            self._run = wandb.init(project=project, name=name, config=config, id=wandb_run_id(run_dir),
                                   resume="allow", allow_val_change=True, dir=where)
        except wandb.errors.Error as error:  # e.g. no API key: one line, not a traceback from inside wandb
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"logging.wandb: W&B did not start: {first} (run `wandb login` or set WANDB_API_KEY; "
                              "WANDB_MODE=offline logs without an account; or set logging.wandb=false)") from error

    @property
    def run_id(self) -> str:
        return self._run.id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def image(self, tag: str, step: int, image: np.ndarray, caption: str = "") -> None:
        self._run.log({tag: self._wandb.Image(image, caption=caption or None)}, step=step)

    def text(self, tag: str, step: int, text: str) -> None:
        self._run.log({tag: text}, step=step)

    def close(self) -> None:
        self._run.finish()
