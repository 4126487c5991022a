"""Normalisation of the teacher's patch tokens before they become alignment targets.

- ``none``: the features as the encoder gives them (REPA, ERW, REG).
- ``spatial_zscore`` (iREPA, arXiv 2512.10794): per image and channel, over the T patch tokens,
  ``(f − α·mean_T f) / (std_T f + eps)`` with the unbiased std (N − 1) of the raw features and eps = 1e-6. It
  removes (a share α of) what all tokens of an image share, so the alignment weighs the spatial structure. α is
  iREPA's ``--zscore-alpha`` (0.6 in its LDM code, 0.8 in its pixel-space code, 1.0 a full z-score).

Applied in one place, ``Teacher.targets``, to online and precomputed features alike, under no_grad in fp32. With
REG's class token in front of the targets only the patch tokens are normalised: the CLS token stays as it is (it
is also REG's class-token input, and it has no position on the grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TARGET_NORMS = ("none", "spatial_zscore")
ZSCORE_EPS = 1e-6  # iREPA's


def spatial_zscore(features: torch.Tensor, alpha: float = 0.6, eps: float = ZSCORE_EPS) -> torch.Tensor:
    """iREPA's spatial z-score of (B, T, D) patch tokens over the token axis, in fp32 (see the module docstring)."""
    if features.dim() != 3:
        raise ValueError(f"spatial_zscore takes (B, T, D) patch tokens, got shape {tuple(features.shape)}")
    if features.shape[1] < 2:
        raise ValueError(f"spatial_zscore needs at least 2 tokens for the unbiased std, got {features.shape[1]}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        f = features.float()
        mean = f.mean(dim=1, keepdim=True)
        std = f.std(dim=1, keepdim=True)  # unbiased; of the raw features (subtracting α·mean does not change it)
        return (f - alpha * mean) / (std + eps)


@dataclass(frozen=True)
class TargetNorm:
    """The run's target normalisation (``alignment.target_norm``, ``alignment.zscore_alpha``)."""

    kind: str = "none"
    alpha: float = 0.6

    def __post_init__(self) -> None:
        if self.kind not in TARGET_NORMS:
            raise ValueError(f"unknown target normalisation {self.kind!r}; choose one of {TARGET_NORMS}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
        """Normalise the patch tokens of (B, prefix + T, D) features; the first ``prefix_tokens`` (REG's CLS)
        pass through unchanged (in fp32 with the rest)."""
        if not self.active:
            return features
        patches = spatial_zscore(features[:, prefix_tokens:], self.alpha)
        if not prefix_tokens:
            return patches
        return torch.cat([features[:, :prefix_tokens].float(), patches], dim=1)

    def describe(self) -> str:
        return f"spatial z-score (α {self.alpha:g})" if self.active else "none"
