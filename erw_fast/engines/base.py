"""What the trainer needs from an engine (one process / DDP, or DeepSpeed ZeRO)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from erw_fast.ema import WeightEMA


def adamw_implementation(choice: str, device: torch.device) -> str:
    """optim.implementation: auto → torch's fused AdamW on CUDA, the foreach one elsewhere."""
    if choice == "auto":
        return "fused" if device.type == "cuda" else "foreach"
    return choice


@dataclass
class StepOutcome:
    grad_norm: torch.Tensor  # before clipping; inf/NaN when the step was skipped
    # False: non-finite loss or gradients, nothing was updated. A 0-dim bool tensor on the device when the engine
    # decided without a host sync (the trainer reads it at logging steps only).
    applied: bool | torch.Tensor


class Engine(Protocol):
    kind: str  # "ddp" (also one process) | "deepspeed"
    module: nn.Module  # the bare model (parameters may be partitioned under ZeRO-3)
    forward_module: nn.Module  # what the loss calls: possibly compiled and wrapped
    ema: WeightEMA  # the weights' moving average (whole, or this rank's share)

    def describe(self) -> str: ...
    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    # region: called with "ema" as the EMA update begins (the benchmark's step regions)
    def step(self, loss: torch.Tensor, region: Callable[[str], None] | None = None) -> StepOutcome: ...
    def lr(self) -> float: ...
    def close(self) -> None: ...
    def ema_module(self) -> nn.Module: ...
    # Every rank takes part; with everywhere=False only rank 0 receives the tensors (others: may be empty).
    def full_model_state(self, everywhere: bool = True) -> dict[str, torch.Tensor]: ...
    def full_ema_state(self, everywhere: bool = True) -> dict[str, torch.Tensor]: ...
    def checkpoint_state(self, directory: Path, name: str) -> dict[str, Any]: ...
    def load_checkpoint_state(self, state: dict[str, Any], directory: Path) -> None: ...
