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

        text = (
            f"copied {len(self.copied)} tensors ({blocks(self.copied)}, "
            f"projectors={'yes' if any(k.startswith('projectors.') for k in self.copied) else 'no'}); "
            f"{len(self.fresh)} fresh ({blocks(self.fresh)}, final_layer); "
            f"{len(self.skipped)} Phase-1 tensors not carried over"
        )
        if any(k.startswith(_CLASS_TOKEN_KEYS) for k in self.copied + self.fresh):
            carried = any(k.startswith(_CLASS_TOKEN_KEYS) for k in self.copied)
            text += f"; class-token embedder {'copied' if carried else 'fresh'}"
        return text


_CLASS_TOKEN_KEYS = ("cls_projectors2.", "wg_norm.")  # REG's class-token input embedder


def transfer_phase1_weights(
    phase1: nn.Module | Mapping[str, torch.Tensor],
    full_model: nn.Module,
    include_projectors: bool = True,
) -> TransferReport:
    """Copy embedders, blocks 0..L−1 (and, by default, the projectors) from Phase 1 into ``full_model``.

    Every Phase-1 key must exist in the full model with the same shape — a mismatch (another width, a
    projector for another encoder) is an error naming the key and both shapes, raised before anything is copied.
    The one exception is the fixed ``pos_embed`` of a warmup without REG's class token going into a class-token
    model: its N rows are the full model's patch rows (row 0, the class token's, stays zero). A class-token
    warmup carries its class-token embedder (``cls_projectors2``, ``wg_norm``) like any other tensor.
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
        elif key == "pos_embed" and _patch_rows(tensor, target[key]):
            plan[key] = torch.cat([target[key][:, : target[key].shape[1] - tensor.shape[1]], tensor], dim=1)
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


def _patch_rows(source: torch.Tensor, target: torch.Tensor) -> bool:
    """A position table of the patch tokens only, going into one that has class-token rows in front."""
    return source.shape[0] == target.shape[0] and source.shape[2] == target.shape[2] and \
        source.shape[1] < target.shape[1]
