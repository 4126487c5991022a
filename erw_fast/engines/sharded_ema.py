"""EMA of the weights kept on each rank's own piece of the fp32 master weights (DeepSpeed ZeRO).

Under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) every rank owns a contiguous fragment of each parameter's fp32
master copy; under ZeRO-3 it owns a 1/N partition of every parameter. The EMA lives on exactly those fragments,
so its memory and update time are divided by the world size, and it is updated from the fp32 masters (not from
rounded bf16 weights). It is gathered only to save or export: each rank writes its fragment into a zero buffer and
one all-reduce assembles the parameter (fragments are disjoint).

Frozen parameters and buffers never change, so their EMA equals their value; it is read from the model when
gathered. Without partitioning (ZeRO-0 in fp32) the EMA holds whole parameters, like the single-process EMA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from erw_fast.ema import WeightEMA, check_ema_state, sum_over_ranks


@dataclass
class _Fragment:
    name: str
    param: nn.Parameter
    shape: torch.Size
    start: int  # offset of this rank's fragment in the flattened parameter
    master: torch.Tensor | None  # fp32 master fragment (a view DeepSpeed's optimizer updates in place)
    ema: torch.Tensor | None


def _zero3(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def _local_fragment(param: nn.Parameter, rank: int) -> tuple[int, torch.Tensor | None]:
    """(start, fp32 master view) of this rank's piece of ``param``; view None when the rank holds none of it."""
    if _zero3(param):
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param).view(-1)
        start = rank * local.numel()  # ZeRO-3 pads each parameter to world_size equal partitions
        count = max(0, min(local.numel(), param.ds_numel - start))
        return start, (local.narrow(0, 0, count) if count else None)
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer
        mapping = param._hp_mapping
        if mapping is None:
            return 0, None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment().view(-1)
    return 0, param.data.view(-1)  # not partitioned: the parameter is its own fp32 master


class ShardedEMA(WeightEMA):
    """ema ← decay·ema + (1 − decay)·θ on this rank's fragments of the fp32 master weights."""

    def __init__(self, module: nn.Module, decay: float, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(decay)
        self.module = module
        self.group = group
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        self._rank = rank
        self.fragments: list[_Fragment] = []
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            start, master = _local_fragment(param, rank)
            shape = param.ds_shape if _zero3(param) else param.shape
            ema = None if master is None else master.detach().float().clone()
            self.fragments.append(_Fragment(name, param, shape, start, master, ema))
        self._ema = [f.ema for f in self.fragments if f.ema is not None]
        self._masters = [f.master for f in self.fragments if f.master is not None]
        self.partitioned = any(_zero3(f.param) or hasattr(f.param, "_hp_mapping") for f in self.fragments)

    def _sources(self) -> list[torch.Tensor]:
        return [m.float() for m in self._masters]

    # ------------------------------------------------------------------------------------------ gather / load

    def _gather(self, fragment: _Fragment, everywhere: bool) -> torch.Tensor | None:
        if not self.partitioned:
            return fragment.ema.view(fragment.shape).clone()
        device = fragment.ema.device if fragment.ema is not None else _device_of(fragment.param)
        full = torch.zeros(fragment.shape.numel(), dtype=torch.float32, device=device)
        if fragment.ema is not None:
            full.narrow(0, fragment.start, fragment.ema.numel()).copy_(fragment.ema)
        return full.view(fragment.shape) if sum_over_ranks(full, everywhere, self.group) else None

    def state_dict(self, everywhere: bool = True) -> dict[str, torch.Tensor]:
        """Frozen parameters and buffers are taken from the module."""
        keep = everywhere or self._rank == 0
        out = {}
        for f in self.fragments:
            full = self._gather(f, everywhere)
            if keep:
                out[f.name] = full.cpu()
        frozen = [(n, p) for n, p in self.module.named_parameters() if not p.requires_grad]
        with _gathered([p for _, p in frozen]):
            if keep:
                out.update({n: p.detach().float().cpu().clone() for n, p in frozen})
        if keep:
            out.update({n: b.detach().cpu().clone() for n, b in self.module.named_buffers()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Each rank keeps its piece, so an EMA saved on any world size loads on any other."""
        check_ema_state(state, {f.name: f.shape for f in self.fragments}, "trained parameter")
        for f in self.fragments:
            if f.ema is not None:
                piece = state[f.name].reshape(-1).narrow(0, f.start, f.ema.numel())
                f.ema.copy_(piece.to(device=f.ema.device, dtype=f.ema.dtype))


def _device_of(param: nn.Parameter) -> torch.device:
    return param.ds_tensor.device if _zero3(param) else param.device


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    if any(_zero3(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
