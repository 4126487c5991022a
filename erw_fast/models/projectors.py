"""The alignment projectors: the SiT hidden state (B, T, D) → one (B, T, z) tensor per encoder.

- ``mlp`` (REPA): Linear D→P, SiLU, Linear P→P, SiLU, Linear P→z, token by token. Keys ``projectors.{i}.0.weight``
  … as REPA's, so its checkpoints load strictly.
- ``conv`` (iREPA, arXiv 2512.10794): one Conv2d D→z over the token grid (tokens row-major on an H×W = T grid,
  kernel k, stride 1, zero 'same' padding k // 2), so neighbouring tokens mix for k > 1; k = 1 is a per-token
  linear map. Keys ``projectors.{i}.projection_layer.{weight,bias}`` as iREPA's ``ProjectionLayer("conv")``, so
  its checkpoints load strictly. It keeps PyTorch's default Conv2d initialisation: SiT's weight init only
  re-initialises ``nn.Linear`` (as the reference's does).
"""

from __future__ import annotations

import math

import torch
from torch import nn

PROJECTOR_KINDS = ("mlp", "conv")


def check_kernel_size(kernel_size: int) -> int:
    """An odd kernel ≥ 1: 'same' padding k // 2 keeps the grid only for odd k."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"projector_kernel_size must be an odd integer ≥ 1 (1 or 3 in iREPA), got {kernel_size!r}")
    return kernel_size


class ConvProjector(nn.Module):
    """iREPA's convolutional projector on the square token grid (see the module docstring)."""

    def __init__(self, hidden_size: int, z_dim: int, kernel_size: int = 1) -> None:
        super().__init__()
        k = check_kernel_size(kernel_size)
        self.projection_layer = nn.Conv2d(hidden_size, z_dim, kernel_size=k, stride=1, padding=k // 2)

    @property
    def kernel_size(self) -> int:
        return int(self.projection_layer.kernel_size[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        side = math.isqrt(t)
        if side * side != t:
            raise ValueError(f"the conv projector needs a square token grid, got {t} tokens (a class token in front? "
                             "REG's class token has no grid position: use the MLP projector)")
        grid = x.reshape(b, side, side, d).permute(0, 3, 1, 2)
        return self.projection_layer(grid).permute(0, 2, 3, 1).reshape(b, t, -1)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int, kind: str = "mlp",
                    kernel_size: int = 1) -> nn.Module:
    """One encoder's projector: REPA's MLP (``projector_dim`` wide) or iREPA's conv (``kernel_size``)."""
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, z_dim),
        )
    if kind == "conv":
        return ConvProjector(hidden_size, z_dim, kernel_size)
    raise ValueError(f"unknown projector {kind!r}; choose one of {PROJECTOR_KINDS}")
