"""Alignment weights over the steps: REPA's constant λ, ERW's exponential decay, a hard stop (HASTE) and a cosine
to zero. ``zero_from``: the first step from which a weight is 0 for good (None: never), which lets a phase stop
running what only that term needs (the teacher, the projector, the attention maps, the image decode)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from erw_fast.models.sit import parse_model_name

# The reference picks c0 by string matching on the model name (6 for XL, 3 for L, 1 otherwise); here they are
# presets keyed by model size that a config can override.
ERW_C0_PRESETS: dict[str, float] = {"XL": 6.0, "L": 3.0, "B": 1.0, "S": 1.0}


class WeightSchedule(Protocol):
    def __call__(self, step: int) -> float: ...

    @property
    def zero_from(self) -> int | None: ...


def erw_c0_preset(model_name: str) -> float:
    size, _ = parse_model_name(model_name)
    return ERW_C0_PRESETS[size]


@dataclass(frozen=True)
class ERWLambdaSchedule:
    """λ(s) = c0 · 2^(−min(max(s − W, 0), S − W) / h): flat c0 through the warmup, then halving every h steps
    until the last step S."""

    c0: float
    warmup_steps: int
    total_steps: int
    half_life: float = 50_000

    def __post_init__(self) -> None:
        if self.c0 < 0:
            raise ValueError(f"c0 must be ≥ 0, got {self.c0}")
        if self.half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {self.half_life}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be in [0, total_steps={self.total_steps})"
            )

    def __call__(self, step: int) -> float:
        decay_steps = min(max(step - self.warmup_steps, 0), self.total_steps - self.warmup_steps)
        return self.c0 * 2.0 ** (-decay_steps / self.half_life)

    @property
    def zero_from(self) -> int | None:
        return 0 if self.c0 == 0 else None  # halving never reaches 0


@dataclass(frozen=True)
class ConstantLambda:
    """REPA: the same λ at every step."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value

    @property
    def zero_from(self) -> int | None:
        return 0 if self.value == 0 else None


@dataclass(frozen=True)
class HardStop:
    """``inner`` until ``stop_step``, then 0 for good (HASTE's termination: the step with ``stop_step`` completed
    steps is the first unaligned one)."""

    inner: WeightSchedule
    stop_step: int

    def __call__(self, step: int) -> float:
        return self.inner(step) if step < self.stop_step else 0.0

    @property
    def zero_from(self) -> int | None:
        inner = self.inner.zero_from
        return self.stop_step if inner is None else min(inner, self.stop_step)


@dataclass(frozen=True)
class CosineToZero:
    """``value`` until ``start``, then a half cosine down to 0 at ``end``, 0 after."""

    value: float
    start: int
    end: int

    def __post_init__(self) -> None:
        if not self.start < self.end:
            raise ValueError(f"the cosine schedule must end after it starts ({self.start} → {self.end})")

    def __call__(self, step: int) -> float:
        if step >= self.end:
            return 0.0
        progress = max(step - self.start, 0) / (self.end - self.start)
        return self.value * 0.5 * (1.0 + math.cos(math.pi * progress))

    @property
    def zero_from(self) -> int | None:
        return 0 if self.value == 0 else self.end


SCHEDULE_KINDS = ("constant", "erw", "hard_stop", "cosine")


def weight_schedule(kind: str, value: float, *, start: int, stop_step: int | None,
                    erw: ERWLambdaSchedule | None = None) -> WeightSchedule:
    """One alignment term's weight over a phase that begins at ``start``: ``constant`` (REPA), ``erw`` (ERW's
    decay, ``erw`` given), ``hard_stop`` (constant until ``stop_step``, HASTE) or ``cosine`` (down to 0 at
    ``stop_step``). A ``stop_step`` given with ``constant`` or ``erw`` stops that schedule there."""
    if kind == "erw":
        if erw is None:
            raise ValueError("the erw schedule needs ERW's parameters (run.mode erw / erw_reg)")
        inner: WeightSchedule = erw
    elif kind in ("constant", "hard_stop"):
        inner = ConstantLambda(value)
    elif kind == "cosine":
        if stop_step is None:
            raise ValueError("the cosine schedule needs its end step (stop_step)")
        return CosineToZero(value, start, stop_step)
    else:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULE_KINDS}")
    if stop_step is None:
        if kind == "hard_stop":
            raise ValueError("the hard_stop schedule needs its stop step (stop_step)")
        return inner
    return HardStop(inner, stop_step)
