"""EMA split by rank under DDP: each rank averages only the tensors it owns.

Under DDP every rank holds the same weights, so keeping a full EMA on each is redundant work: the EMA pass reads
and writes 12 bytes per parameter every step (benchmarks/results/comm_model.md: ~2 ms per step for SiT-XL/2 on an
H100). Here the floating tensors are dealt out to ranks (largest first, each to the least-loaded rank), every rank
updates only its share, and the whole EMA is assembled only when it is needed (checkpoints, export, monitors) —
no communication per step.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from erw_fast.ema import WeightEMA, check_ema_state, sum_over_ranks


def assign_owners(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Greedy balance: tensors in decreasing size, each to the rank with the fewest elements so far."""
    load = [0] * world_size
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners


class RankShardedEMA(WeightEMA):
    """ema ← decay·ema + (1 − decay)·θ for this rank's share of the model's floating parameters and buffers."""

    partitioned = True

    def __init__(self, model: nn.Module, decay: float, rank: int, world_size: int) -> None:
        super().__init__(decay)
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

    def _sources(self) -> list[torch.Tensor]:
        return [t.detach() for t in self._src]

    def state_dict(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        """Every rank takes part: one all-reduce (or reduce to rank 0) per tensor."""
        out: dict[str, torch.Tensor] = {}
        received = everywhere or self.rank == 0
        for name in self.shapes:
            mine = self.own.get(name)
            full = mine.clone() if mine is not None else torch.zeros_like(self._tensors[name])
            if sum_over_ranks(full, everywhere):
                out[name] = full.cpu()
        if received:  # integer buffers are not averaged: as in the single-process EMA, they are the model's
            state = self.module.state_dict()
            out.update({k: v.detach().cpu().clone() for k, v in state.items() if k not in out})
            out = {k: out[k] for k in state}
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        check_ema_state(state, self.shapes, "tensor")
        for name, tensor in self.own.items():
            tensor.copy_(state[name].to(device=tensor.device, dtype=tensor.dtype))
