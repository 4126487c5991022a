"""Exponential moving average of model weights, updated with one multi-tensor lerp per step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema ← decay·ema + (1 − decay)·θ for every parameter and floating buffer, initialised as a copy.

    The EMA model has the same state-dict keys as the model, so it exports in the reference layout.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema_tensors, self._src_tensors = self._pair(model)

    def _pair(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema_state = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        src_state = dict(model.named_parameters()) | dict(model.named_buffers())
        keys = [k for k, v in src_state.items() if v.is_floating_point()]
        return [ema_state[k] for k in keys], [src_state[k] for k in keys]

    @torch.no_grad()
    def update(self, applied: torch.Tensor | None = None) -> None:
        """One lerp over all tensors. ``applied`` (0-dim, 1 = the optimizer step was applied) makes a skipped step
        leave the EMA untouched without reading the flag on the host."""
        src = [t.detach() for t in self._src_tensors]
        if applied is None:
            torch._foreach_lerp_(self._ema_tensors, src, 1.0 - self.decay)
        else:
            torch._foreach_lerp_(self._ema_tensors, src, (1.0 - self.decay) * applied.to(torch.float32))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
