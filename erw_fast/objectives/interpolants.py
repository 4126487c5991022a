"""The stochastic interpolant x_t = α_t·x0 + σ_t·ε (t = 0 data, t = 1 noise) and its velocity target."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PATH_TYPES = ("linear", "cosine")
TIME_WEIGHTINGS = ("uniform", "lognormal")


def _broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() == 1 else t


@dataclass(frozen=True)
class Interpolant:
    path_type: str = "linear"

    def __post_init__(self) -> None:
        if self.path_type not in PATH_TYPES:
            raise ValueError(f"unknown path_type {self.path_type!r}; choose one of {PATH_TYPES}")

    def coefficients(
        self, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α_t, σ_t, α′_t, σ′_t), each shaped like t."""
        if self.path_type == "linear":
            return 1 - t, t, torch.full_like(t, -1.0), torch.ones_like(t)
        half_pi = math.pi / 2
        return (
            torch.cos(t * half_pi),
            torch.sin(t * half_pi),
            -half_pi * torch.sin(t * half_pi),
            half_pi * torch.cos(t * half_pi),
        )

    def interpolate(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy input x_t and the v-prediction target α′_t·x0 + σ′_t·ε; t is (B,) or broadcastable."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_broadcast(t, x0))
        return alpha * x0 + sigma * noise, d_alpha * x0 + d_sigma * noise

    def sample_time(
        self,
        batch_size: int,
        weighting: str = "uniform",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """t ~ U(0, 1), or the reference's "lognormal": σ = exp(n), n ~ N(0, 1), mapped to t by the path
        (linear: σ/(1+σ), i.e. logit-normal t; cosine: (2/π)·atan σ)."""
        if weighting == "uniform":
            return torch.rand(batch_size, device=device, generator=generator).to(dtype)
        if weighting == "lognormal":
            sigma = torch.randn(batch_size, device=device, generator=generator).exp()
            t = sigma / (1 + sigma) if self.path_type == "linear" else (2 / math.pi) * torch.atan(sigma)
            return t.to(dtype)
        raise ValueError(f"unknown time weighting {weighting!r}; choose one of {TIME_WEIGHTINGS}")
