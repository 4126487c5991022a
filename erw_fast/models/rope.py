"""2-D rotary position embedding as ERW's Phase-2 SiT uses it (EVA-02 `VisionRotaryEmbeddingFast` convention).

The head dimension is split in two halves: the first is rotated by the token's row index, the second by its
column index. Within a half, adjacent channels (2i, 2i+1) form a rotated pair with frequency θ^(−2i/d_half).
It is applied to q and k on top of the absolute sin-cos embedding that is added to the tokens.

The tables are persistent buffers named as the reference's (``feat_rope.freqs_cos`` / ``freqs_sin`` in a SiT):
released ERW Phase-2 checkpoints carry them and its ``inference.py`` loads strictly.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, …) → (−x1, x0, −x3, x2, …): multiplication by i on each adjacent pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class Rope2D(nn.Module):
    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)  # (half/2,)
        pos = torch.arange(grid_size, dtype=torch.float32)
        angles = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (grid, half), pairs share an angle
        rows = angles[:, None, :].expand(grid_size, grid_size, half)
        cols = angles[None, :, :].expand(grid_size, grid_size, half)
        table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, heads, T, head_dim). Tokens in front of the grid (REG's class token: T = 1 + grid²) have no grid
        position and are not rotated (this project's choice: neither ERW nor REG combines the two)."""
        prefix = x.shape[-2] - self.freqs_cos.shape[0]
        if prefix:
            return torch.cat([x[..., :prefix, :], self(x[..., prefix:, :])], dim=-2)
        cos, sin = self.freqs_cos.to(x.dtype), self.freqs_sin.to(x.dtype)
        return x * cos + rotate_pairs(x) * sin

    def fill_missing(self, state_dict: dict, prefix: str) -> None:
        """Add this module's tables to a state dict that lacks them (checkpoints written before they were
        persistent): they are a function of the shape, so nothing is lost."""
        for name in ("freqs_cos", "freqs_sin"):
            state_dict.setdefault(prefix + name, getattr(self, name))
