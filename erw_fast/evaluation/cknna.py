"""CKNNA: centered kernel nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation Hypothesis").

Follows the platonic-rep implementation that REPA's and ERW's alignment plots use: linear kernels K = A·Aᵀ and
L = B·Bᵀ of L2-normalised per-sample features; for each row i the top-k neighbours j ≠ i under K and under L;
α_ij = 1 when j is a neighbour of i in both; the score is the unbiased HSIC (Song et al. 2012, eq. 5) of the
masked kernels α∘K and α∘L, normalised by the same quantity of each kernel with itself:

    CKNNA(A, B) = HSIC(α_KL∘K, α_KL∘L) / sqrt(HSIC(α_KK∘K, α_KK∘K) · HSIC(α_LL∘L, α_LL∘L)).

Differences from platonic-rep: no ``+ 1e-6`` in the denominator (so CKNNA(A, A) = 1 exactly) and float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["cknna", "hsic_unbiased", "pool_features"]


def pool_features(tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(N, T, D) token features → (N, D) per-sample features: the token mean, then (optionally) L2-normalised."""
    x = tokens.mean(dim=1) if tokens.ndim == 3 else tokens
    if x.ndim != 2:
        raise ValueError(f"expected (N, T, D) tokens or (N, D) features, got {tuple(tokens.shape)}")
    x = x.to(torch.float64)
    return F.normalize(x, dim=-1) if normalize else x


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 - the paper's names
    """Unbiased HSIC estimator of Song et al. (2012), eq. 5, with diagonals zeroed; needs m > 3."""
    m = k.shape[0]
    if m <= 3:
        raise ValueError(f"the unbiased HSIC needs more than 3 samples, got {m}")
    kt = k - torch.diag_embed(torch.diagonal(k))
    lt = l - torch.diag_embed(torch.diagonal(l))
    value = (
        (kt * lt.T).sum()  # tr(K̃ L̃)
        + kt.sum() * lt.sum() / ((m - 1) * (m - 2))
        - 2.0 * (kt @ lt).sum() / (m - 2)
    )
    return value / (m * (m - 3))


def _knn_mask(kernel: torch.Tensor, topk: int) -> torch.Tensor:
    """(N, N) 0/1 mask of each row's top-k entries, the diagonal excluded."""
    n = kernel.shape[0]
    masked = kernel.clone().fill_diagonal_(float("-inf"))
    idx = torch.topk(masked, topk, dim=1).indices
    return torch.zeros(n, n, dtype=kernel.dtype, device=kernel.device).scatter_(1, idx, 1.0)


def cknna(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int = 10) -> float:
    """CKNNA between two (N, D_a), (N, D_b) feature sets of the same N samples (rows aligned).

    Features are used as given (pass :func:`pool_features` output for the platonic-rep setting). Returns NaN
    when a self-similarity term is not positive (degenerate features).
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(
            f"need (N, D) features for the same N samples, got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}"
        )
    n = feats_a.shape[0]
    if not 2 <= topk <= n - 1:
        raise ValueError(f"topk must be in [2, N−1] for N = {n} samples, got {topk}")
    a, b = feats_a.to(torch.float64), feats_b.to(torch.float64)
    k, l = a @ a.T, b @ b.T  # noqa: E741
    mask_k, mask_l = _knn_mask(k, topk), _knn_mask(l, topk)

    def aligned(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
        return hsic_unbiased(mask * x, mask * y).item()

    kl = aligned(k, l, mask_k * mask_l)
    kk, ll = aligned(k, k, mask_k), aligned(l, l, mask_l)
    if kk <= 0 or ll <= 0:
        return math.nan
    return kl / math.sqrt(kk * ll)
