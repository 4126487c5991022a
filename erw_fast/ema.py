"""Exponential moving averages of model weights, updated with one multi-tensor lerp per step.

``WeightEMA`` is the interface the engines use, whatever holds the average: ``EMA`` (a whole copy of the model, one
process or replicated), ``RankShardedEMA`` (``engines.rank_sharded_ema``: each DDP rank averages a share of the
tensors) and ``ShardedEMA`` (``engines.sharded_ema``: each rank averages its fragment of DeepSpeed's fp32 masters).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn


class WeightEMA(ABC):
    """ema ← decay·ema + (1 − decay)·θ over the tensors this process averages.

    Subclasses fill ``_ema`` (the averages this process holds) and return the matching current weights from
    ``_sources``; ``state_dict`` always returns the whole EMA with the keys of the model's ``state_dict()``.
    """

    partitioned: bool = False  # True: each rank holds part of the EMA, and state_dict gathers (every rank calls)

    def __init__(self, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._ema: list[torch.Tensor] = []

    @property
    def local_numel(self) -> int:
        """Elements of the average this process holds and updates."""
        return sum(t.numel() for t in self._ema)

    @abstractmethod
    def _sources(self) -> list[torch.Tensor]:
        """The current weights, one per tensor of ``_ema`` (same shape, a dtype lerp accepts)."""

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """One lerp over all tensors. ``applied`` (0-dim, 1 = the optimizer step was applied) makes a skipped step
        leave the EMA untouched without reading the flag on the host."""
        if not self._ema:
            return
        if applied is None:
            torch._foreach_lerp_(self._ema, self._sources(), 1.0 - self.decay)
            return
        # A tensor weight must go in as a list: the single-tensor form is read with .item(), a host sync per step.
        weight = (1.0 - self.decay) * applied.to(torch.float32)
        torch._foreach_lerp_(self._ema, self._sources(), [weight.to(t.dtype) for t in self._ema])

    @abstractmethod
    def state_dict(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        """The whole EMA: CPU copies when gathered, the EMA model's own tensors for ``EMA``. When partitioned every
        rank must call; ``everywhere=False`` gives it to rank 0 only (the others get an empty dict), sparing their
        host memory when only rank 0 writes."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a whole EMA (from any of the implementations, saved on any world size)."""


class EMA(WeightEMA):
    """The whole EMA as a copy of the model (``.model``), for every parameter and floating buffer.

    The EMA model has the same state-dict keys as the model, so it exports in the reference layout.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        ema_state = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        src_state = dict(model.named_parameters()) | dict(model.named_buffers())
        keys = [k for k, v in src_state.items() if v.is_floating_point()]
        self._ema = [ema_state[k] for k in keys]
        self._src = [src_state[k] for k in keys]

    def _sources(self) -> list[torch.Tensor]:
        return [t.detach() for t in self._src]

    def state_dict(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------- helpers of the sharded EMAs


def check_ema_state(state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], what: str) -> None:
    """Every tensor in ``shapes`` is in ``state`` with that shape; ``what`` names them in errors ("tensor")."""
    missing = [k for k in shapes if k not in state]
    if missing:
        raise KeyError(f"EMA state lacks {len(missing)} {what}(s), e.g. {missing[:3]}")
    noun = what.split()[-1]
    for name, shape in shapes.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(f"EMA {name}: shape {tuple(state[name].shape)} != {noun} {tuple(shape)}")


def sum_over_ranks(pieces: torch.Tensor, everywhere: bool, group: dist.ProcessGroup | None = None) -> bool:
    """Assemble a tensor whose ranks hold disjoint pieces (zeros elsewhere) by summing in place: on every rank, or
    (not ``everywhere``) on the group's rank 0 only. Returns whether this rank received the sum."""
    if everywhere:
        dist.all_reduce(pieces, group=group)
        return True
    dist.reduce(pieces, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return dist.get_rank(group) == 0
