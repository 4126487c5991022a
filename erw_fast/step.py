"""One training step, the function both the trainer and ``erw-bench train`` run.

micro-batches → the teacher's targets → the phase's loss → backward → the engine's step (clip, AdamW, EMA, a
non-finite step skipped on the device). Nothing here waits for the GPU: the skip counters stay on the device
until the trainer reads them at a logging step or a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from erw_fast.config import Config, ConfigError
from erw_fast.encoders.teacher import class_token_dim
from erw_fast.engines import Engine
from erw_fast.objectives import Interpolant
from erw_fast.phases import Phase
from erw_fast.randomness import GlobalBatchRandomness
from erw_fast.runtime import DistEnv, autocast_context

Region = Callable[[str], None]  # called as each region of the step begins (the benchmark's timer)


def _no_region(name: str) -> None:
    pass


@dataclass(frozen=True)
class BatchPlan:
    """Global batch → per-device batch → micro-batches (gradient accumulation)."""

    global_batch: int
    local_batch: int
    micro_batch: int
    accumulation: int

    @classmethod
    def derive(cls, config: Config, world_size: int) -> BatchPlan:
        global_batch = config.train.global_batch_size
        if global_batch % world_size:
            raise ConfigError(
                f"train.global_batch_size ({global_batch}) is not divisible by the world size {world_size}"
            )
        local = global_batch // world_size
        micro = config.train.micro_batch_size or local
        if local % micro:
            raise ConfigError(f"train.micro_batch_size ({micro}) does not divide the per-device batch {local}")
        return cls(global_batch, local, micro, local // micro)


class SkipCounter:
    """Non-finite steps, counted on the device: the current streak and the skips since the last read."""

    def __init__(self, device: torch.device) -> None:
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.skips = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, applied: bool | torch.Tensor) -> torch.Tensor:
        skipped = ~torch.as_tensor(applied, device=self.streak.device)
        self.streak = (self.streak + 1) * skipped
        self.skips += skipped
        return skipped

    def read(self) -> tuple[int, int]:
        """(streak, skips since the last read): one host sync."""
        streak, skips = torch.stack([self.streak, self.skips]).tolist()
        self.skips.zero_()
        return streak, skips


class TrainStep:
    """``step(engine, phase, s, batch)``: one optimizer step on this rank's share of the global batch ``s``.

    The diffusion times, noise (and REG's class-token noise) and label dropout come from the global-batch draw of
    step ``s`` (the rows of this rank's samples), so any world size and accumulation trains on the same (sample,
    noise) pairs.
    """

    def __init__(self, plan: BatchPlan, randomness: GlobalBatchRandomness, rank: int, precision: str,
                 device: torch.device, world_size: int = 1) -> None:
        self.plan, self.randomness, self.rank, self.world_size = plan, randomness, rank, world_size
        self.precision, self.device = precision, device
        self.skips = SkipCounter(device)
        self.last: dict[str, torch.Tensor] = {}  # the last step's totals (named in a non-finite abort)

    @classmethod
    def for_run(cls, config: Config, plan: BatchPlan, env: DistEnv) -> TrainStep:
        """The step of a run with ``config`` on this rank: its precision and global-batch randomness."""
        m = config.model
        randomness = GlobalBatchRandomness(
            seed=config.run.seed, global_batch=plan.global_batch,
            latent_shape=(m.in_channels, m.input_size, m.input_size), class_dropout_prob=m.class_dropout_prob,
            interpolant=Interpolant(config.diffusion.path_type), time_weighting=config.diffusion.time_weighting,
            device=env.device, cls_dim=class_token_dim(config))
        return cls(plan, randomness, env.rank, config.train.precision, env.device, env.world_size)

    def __call__(self, engine: Engine, phase: Phase, step: int, batch: dict[str, torch.Tensor],
                 region: Region = _no_region) -> dict[str, torch.Tensor]:
        b = self.plan
        first_row = self.rank * b.local_batch  # this rank's samples are rows [first_row, + local) of the step
        draw = self.randomness.draw(step, first_row, b.local_batch)
        keys = self._global_keys(phase, batch, region) if phase.global_keys else None
        totals: dict[str, torch.Tensor] = {}
        for start in range(0, b.local_batch, b.micro_batch):
            sl = slice(start, start + b.micro_batch)
            # DDP all-reduces on the last micro-batch only: no_sync must cover forward and backward.
            with engine.micro_batch(last=start + b.micro_batch >= b.local_batch):
                with autocast_context(self.precision, self.device):
                    if keys is None:
                        region("encoder")
                        targets, mine = phase.targets(batch, sl), None
                    else:
                        row = first_row + start
                        targets, mine = [k[row : row + b.micro_batch] for k in keys], (keys, row)
                    region("forward")
                    loss, parts = phase.loss(engine.forward_module, batch, sl, targets, draw.rows(sl), step, mine)
                region("backward")
                engine.backward(loss)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0) + value.detach() / b.accumulation
        region("optimizer")
        outcome = engine.step(totals["loss"], region)
        totals["skipped"] = self.skips.record(outcome.applied).float()
        totals["grad_norm"] = outcome.grad_norm
        totals["lambda"] = torch.tensor(phase.alignment_weight(step))
        attn_weight = phase.attention_weight(step)
        if attn_weight is not None:  # HASTE's attention-distillation weight
            totals["lambda_attn"] = torch.tensor(attn_weight)
        self.last = totals
        return totals

    def _global_keys(self, phase: Phase, batch: dict[str, torch.Tensor], region: Region) -> list[torch.Tensor]:
        """The teacher's features of the whole global batch (every rank, every micro-batch), one tensor per
        encoder: NT-Xent's candidates with alignment.negatives_scope=global. The teacher runs once on the local
        batch; one all-gather per encoder brings the other ranks' rows (no gradient: the teacher is frozen)."""
        region("encoder")
        with autocast_context(self.precision, self.device):
            local = phase.targets(batch, slice(None))
        if self.world_size == 1:
            return local
        gathered = []
        for features in local:
            features = features.contiguous()
            out = features.new_empty((self.world_size * features.shape[0], *features.shape[1:]))
            dist.all_gather_into_tensor(out, features)
            gathered.append(out)
        return gathered
