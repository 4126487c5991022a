"""EMA split by rank under DDP: each rank averages only the tensors it owns.

Under DDP every rank holds the same weights, so keeping a full EMA on each is redundant work: the EMA pass reads
and writes 12 bytes per parameter every step (benchmarks/results/comm_model.md: ~2 ms per step for SiT-XL/2 on an
H100). Here the floating tensors are dealt out to ranks (largest first, each to the least-loaded rank), every rank
updates only its share, and the whole EMA is assembled only when it is needed (checkpoints, export, monitors) —
no communication per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def assign_owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Greedy balance: tensors in decreasing size, each to the rank with the fewest elements so far."""
    load = [0] * world_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


class RankShardedEMA:
    """ema ← decay·ema + (1 − decay)·θ for this rank's share of the model's floating parameters and buffers."""

    partitioned = True

    def __init__(self, model: nn.Module, decay: float, rank: int, world_size: int) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.rank, self.world_size = rank, world_size
        self.module = model
        tensors = {k: v for k, v in (dict(model.named_parameters()) | dict(model.named_buffers())).items()
                   if v.is_floating_point()}
        self._tensors = tensors
        self.shapes = {k: v.shape for k, v in tensors.items()}
        self.owners = assign_owners({k: v.numel() for k, v in tensors.items()}, world_size)
        self.own = {k: v.detach().clone() for k, v in tensors.items() if self.owners[k] == rank}
        self._ema = list(self.own.values())
        self._src = [tensors[k] for k in self.own]

    @property
    def local_numel(self) -> int:
        return sum(t.numel() for t in self._ema)

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        if not self._ema:
            return
        src = [t.detach() for t in self._src]
        weight = 1.0 - self.decay if applied is None else (1.0 - self.decay) * applied.to(torch.float32)
        torch._foreach_lerp_(self._ema, src, weight)

    def state_dict(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        """The whole EMA keyed like ``module.state_dict()`` (CPU). Every rank takes part (one all-reduce, or a
        reduce to rank 0 when not ``everywhere``: the other ranks then get an empty dict)."""
        keep = everywhere or self.rank == 0
        out: dict[str, torch.Tensor] = {}
        for name in self.shapes:
            mine = self.own.get(name)
            full = mine.clone() if mine is not None else torch.zeros_like(self._tensors[name])
            if everywhere:
                dist.all_reduce(full)
            else:
                dist.reduce(full, dst=0)
            if keep:
                out[name] = full.cpu()
        if keep:  # integer buffers are not averaged: as in the single-process EMA, they are the model's
            state = self.module.state_dict()
            out.update({k: v.detach().cpu().clone() for k, v in state.items() if k not in out})
            out = {k: out[k] for k in state}
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.shapes if k not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        for name, tensor in self.own.items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"EMA {name}: shape {tuple(state[name].shape)} != {tuple(tensor.shape)}")
            tensor.copy_(state[name].to(device=tensor.device, dtype=tensor.dtype))
