"""Per-step randomness that does not depend on how the global batch is split across ranks.

Each step's diffusion times, noise (and REG's class-token noise) and label-dropout decisions are drawn for the
*whole global batch* from a generator seeded by (seed, step), and every rank takes the rows of its own samples
(the sampler gives rank r the r-th contiguous slice of the global batch). So one process, DDP or ZeRO on N ranks
and any gradient accumulation train on the same (sample, noise) pairs: the loss trajectory agrees up to
floating-point reduction order, and a resume on another world size continues the same run. Drawing the global
batch's noise on every rank costs a few MB of random numbers per step, which is nothing next to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erw_fast.objectives import Interpolant


@dataclass(frozen=True)
class StepDraw:
    """Random inputs of one step for a contiguous block of samples (rows of the global batch)."""

    t: torch.Tensor  # (n,)
    noise: torch.Tensor  # (n, C, H, W)
    drop_labels: torch.Tensor  # (n,) int, 1 = replace the label by the null class
    cls_noise: torch.Tensor | None = None  # (n, Dc): REG's class-token noise (runs with a class token only)

    def rows(self, sl: slice) -> StepDraw:
        cls_noise = self.cls_noise[sl] if self.cls_noise is not None else None
        return StepDraw(self.t[sl], self.noise[sl], self.drop_labels[sl], cls_noise)


class GlobalBatchRandomness:
    """Draws, in this order: t, the latent noise, REG's class-token noise (when ``cls_dim`` is set: right after the
    latent noise, as REG's loss draws it), the label-dropout decisions."""

    def __init__(self, *, seed: int, global_batch: int, latent_shape: tuple[int, int, int], class_dropout_prob: float,
                 interpolant: Interpolant, time_weighting: str, device: torch.device,
                 cls_dim: int | None = None) -> None:
        if not 0 <= seed < 2**31:
            raise ValueError(f"run.seed must be in [0, 2**31), got {seed}")
        self.seed = seed
        self.global_batch = global_batch
        self.latent_shape = tuple(latent_shape)
        self.class_dropout_prob = class_dropout_prob
        self.interpolant = interpolant
        self.time_weighting = time_weighting
        self.device = device
        self.cls_dim = cls_dim

    def generator(self, step: int) -> torch.Generator:
        if not 0 <= step < 2**32:
            raise ValueError(f"step {step} is outside [0, 2**32)")
        return torch.Generator(device=self.device).manual_seed((self.seed << 32) | step)

    def draw(self, step: int, first_row: int, num_rows: int) -> StepDraw:
        """Rows [first_row, first_row + num_rows) of step ``step``'s draw for the global batch."""
        if first_row < 0 or num_rows < 1 or first_row + num_rows > self.global_batch:
            raise ValueError(f"rows [{first_row}, {first_row + num_rows}) outside the global batch {self.global_batch}")
        g = self.generator(step)
        n = self.global_batch
        t = self.interpolant.sample_time(n, self.time_weighting, device=self.device, generator=g)
        noise = torch.randn((n, *self.latent_shape), device=self.device, generator=g)
        cls_noise = None
        if self.cls_dim is not None:
            cls_noise = torch.randn((n, self.cls_dim), device=self.device, generator=g)
        drop = (torch.rand(n, device=self.device, generator=g) < self.class_dropout_prob).long()
        return StepDraw(t, noise, drop, cls_noise).rows(slice(first_row, first_row + num_rows))
