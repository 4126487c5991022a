"""What the golden-tensor tests share: "≤ 1e-5 relative" = the largest absolute difference over the largest absolute
reference value, in float64."""

from __future__ import annotations

import torch

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()
