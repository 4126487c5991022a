"""ERW's hand-over: Phase-1 (L2R) weights → the full SiT for Phase 2."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TransferReport:
    """Which keys of the full model were copied from Phase 1 and which stayed freshly initialised."""

    copied: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # Phase-1 keys deliberately not carried over

    def summary(self) -> str:
        def blocks(keys: list[str]) -> str:
            ids = sorted({int(k.split(".")[1]) for k in keys if k.startswith("blocks.")})
            return f"blocks {ids[0]}..{ids[-1]}" if ids else "no blocks"

        return (
            f"copied {len(self.copied)} tensors ({blocks(self.copied)}, "
            f"projectors={'yes' if any(k.startswith('projectors.') for k in self.copied) else 'no'}); "
            f"{len(self.fresh)} fresh ({blocks(self.fresh)}, final_layer); "
            f"{len(self.skipped)} Phase-1 tensors not carried over"
        )


def transfer_phase1_weights(
    phase1: nn.Module | Mapping[str, torch.Tensor],
    full_model: nn.Module,
    include_projectors: bool = True,
) -> TransferReport:
    """Copy embedders, blocks 0..L−1 (and, by default, the projectors) from Phase 1 into ``full_model``.

    Every Phase-1 key must exist in the full model with the same shape — a mismatch (another width, a
    projector for another encoder) is an error naming the key and both shapes, raised before anything is copied.
    """
    source = phase1.state_dict() if isinstance(phase1, nn.Module) else dict(phase1)
    target = full_model.state_dict()
    report = TransferReport()
    plan: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in source.items():
        if key.startswith("projectors.") and not include_projectors:
            report.skipped.append(key)
            continue
        if key not in target:
            problems.append(f"{key}: not in the full model")
        elif target[key].shape != tensor.shape:
            problems.append(f"{key}: Phase-1 shape {tuple(tensor.shape)} vs full-model {tuple(target[key].shape)}")
        else:
            plan[key] = tensor
    if problems:
        raise ValueError("cannot transfer Phase-1 weights into the full model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        params = dict(full_model.named_parameters())
        params.update(dict(full_model.named_buffers()))
        for key, tensor in plan.items():
            params[key].copy_(tensor)
    report.copied = sorted(plan, key=list(target).index)
    report.fresh = [k for k in target if k not in plan]
    return report
