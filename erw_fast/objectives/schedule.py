"""Alignment weights: ERW's exponentially decaying λ(s) and REPA's constant λ."""

from __future__ import annotations

from dataclasses import dataclass

from erw_fast.models.sit import parse_model_name

# The reference picks c0 by string matching on the model name (6 for XL, 3 for L, 1 otherwise); here they are
# presets keyed by model size that a config can override.
ERW_C0_PRESETS: dict[str, float] = {"XL": 6.0, "L": 3.0, "B": 1.0, "S": 1.0}


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


@dataclass(frozen=True)
class ConstantLambda:
    """REPA: the same λ at every step."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value
