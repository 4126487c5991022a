"""Improved precision and recall (Kynkäänniemi et al. 2019) with the semantics of ADM's ``ManifoldEstimator``.

Each feature set spans a manifold: the union of balls around its points whose radius is the distance to the
point's k-th nearest neighbour within the set (the point itself counts as the 0-th, so k = 3 means the third
other point). Precision = fraction of samples inside the reference manifold; recall = fraction of reference
points inside the sample manifold. A point on a ball's boundary counts as inside (``≤``).

ADM computes the pairwise distances in float16 (float32 when that overflows); here they are float64, so points
within float16 rounding of a boundary may be classified differently.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["manifold_precision_recall", "manifold_radii", "pairwise_sq_distances"]

_BLOCK = 2048  # rows per distance block: memory ≈ _BLOCK × N × 8 bytes (0.8 GB at N = 50 000)


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device=device, dtype=torch.float64)


def pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, M) = ‖a‖² − 2·a·bᵀ + ‖b‖², clamped at 0 (ADM's formula)."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    return d.clamp_min_(0.0)


def manifold_radii(
    features: np.ndarray | torch.Tensor, k: int = 3, device: torch.device | str | None = None
) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the set (self = 0-th), float64 (N,)."""
    x = _as_tensor(features, device)
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in [1, N−1] for N = {len(x)} points, got {k}")
    radii = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for start in range(0, len(x), _BLOCK):
        d = pairwise_sq_distances(x[start : start + _BLOCK], x)
        radii[start : start + _BLOCK] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Bool (len(points),): whether each point lies in at least one ball (centre, radius)."""
    out = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for start in range(0, len(points), _BLOCK):
        d = pairwise_sq_distances(points[start : start + _BLOCK], centres)
        out[start : start + _BLOCK] = (d <= radii[None, :]).any(dim=1)
    return out


def manifold_precision_recall(
    reference: np.ndarray | torch.Tensor,
    samples: np.ndarray | torch.Tensor,
    k: int = 3,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference`` features (rows = points)."""
    ref, gen = _as_tensor(reference, device), _as_tensor(samples, device)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {tuple(ref.shape)} and {tuple(gen.shape)}")
    ref_radii, gen_radii = manifold_radii(ref, k), manifold_radii(gen, k)
    precision = _inside(gen, ref, ref_radii).double().mean().item()
    recall = _inside(ref, gen, gen_radii).double().mean().item()
    return precision, recall
