"""Fréchet distance (FID / sFID) and Inception Score, in float64 with the ADM evaluator's definitions."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "GaussianStats",
    "frechet_distance",
    "inception_score",
    "inception_score_from_probs",
    "trace_sqrt_product",
]


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set (ADM: ``np.mean`` and ``np.cov(rowvar=False)``, i.e. ddof = 1).

    ``factor`` (set by :meth:`from_features` when N ≤ D) is F = centred features / sqrt(N − 1), so Σ = FᵀF;
    the Fréchet distance then needs only an N×N eigenproblem instead of D×D ones.
    """

    mu: np.ndarray
    sigma: np.ndarray
    factor: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_features(cls, features: np.ndarray) -> GaussianStats:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need (N ≥ 2, D) features for a covariance, got shape {x.shape}")
        mu = x.mean(axis=0)
        factor = (x - mu) / np.sqrt(len(x) - 1) if len(x) <= x.shape[1] else None
        return cls(mu, np.cov(x, rowvar=False), factor)

    def frechet_distance(self, other: GaussianStats) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, factor1=self.factor,
                                factor2=other.factor)


def _clip_noise(w: np.ndarray) -> np.ndarray:
    """Eigenvalues at the rounding-noise level (|λ| ≤ n·eps·max|λ|) → 0: a square root would amplify that noise
    (sqrt(1e-16) = 1e-8) on rank-deficient covariances; negative ones are noise too."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    return np.where(w > tol, w, 0.0)


def _symmetric_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_clip_noise(w))) @ v.T


def _sum_sqrt_eig(m: np.ndarray) -> float:
    return float(np.sqrt(_clip_noise(np.linalg.eigvalsh((m + m.T) / 2))).sum())


def trace_sqrt_product(
    sigma1: np.ndarray, sigma2: np.ndarray, factor1: np.ndarray | None = None, factor2: np.ndarray | None = None
) -> float:
    """tr sqrt(Σ1·Σ2) for PSD Σ1, Σ2, as Σ sqrt(eig(√Σ1 · Σ2 · √Σ1)).

    √Σ1·Σ2·√Σ1 is symmetric PSD and similar to Σ1·Σ2, so both have the same (real, ≥ 0) eigenvalues; a
    symmetric eigensolver is stable where a general matrix square root (scipy's sqrtm) can return complex
    noise on rank-deficient covariances (N < D). Eigenvalues at rounding-noise level count as 0.
    With a factor Σ2 = F2ᵀF2 (N2 × D), the nonzero eigenvalues of Σ1·F2ᵀ·F2 are those of F2·Σ1·F2ᵀ (N2 × N2).
    """
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    factors = [(f, other) for f, other in ((factor2, sigma1), (factor1, sigma2)) if f is not None]
    if factors:
        f, other = min(factors, key=lambda pair: len(pair[0]))
        return _sum_sqrt_eig(f @ other @ f.T)
    s1 = _symmetric_sqrt(sigma1)
    return _sum_sqrt_eig(s1 @ sigma2 @ s1)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
    factor1: np.ndarray | None = None, factor2: np.ndarray | None = None,
) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·tr sqrt(Σ1·Σ2), in float64 (factors: see :func:`trace_sqrt_product`)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2, factor1, factor2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score_from_probs(probs: np.ndarray, split_size: int = 5000) -> float:
    """ADM's Inception Score: exp(mean_i KL(p(y|x_i) ‖ p(y))) per split of ``split_size`` rows, averaged.

    ADM splits by a fixed size (5000), which gives the customary 10 splits at N = 50 000. 0·log 0 counts as 0.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs must be (N ≥ 1, classes), got shape {p.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be ≥ 1, got {split_size}")
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score from logits (the softmax is taken here, in float64)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return inception_score_from_probs(p / p.sum(axis=1, keepdims=True), split_size)
