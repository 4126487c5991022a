"""Deterministic per-sample randomness: the latent draw ``z = (mean + std·ε)·scale`` and the flip decision.

Every random choice about sample ``index`` at epoch ``epoch`` is a pure function of ``(seed, epoch, index)``:

    key(seed, epoch, index) = mix(mix(mix(seed + G) + epoch + G) + index + G)          (uint64, wrapping)
    flip                    = top bit of mix(key ^ FLIP_SALT)
    ε[k], k < n             = Box-Muller on the 64-bit words mix(key + (c + 1)·G), c = 0 … ⌈n/2⌉ − 1:
                              u1 = (bits 41..63 + ½)/2²³, u2 = (bits 18..40 + ½)/2²³, r = √(−2 ln u1), θ = 2π·u2;
                              ε = concat(r·cos θ, r·sin θ)[:n]

``mix`` is the SplitMix64 finaliser and ``G`` its Weyl increment, so ε of one sample is the SplitMix64 stream
started at its key. Being counter-based, ε is computed for a whole batch in one vectorised pass *on the training
device* from the int64 keys (no per-sample generator objects, nothing on the loader's CPU cores), and it does not
depend on batch composition, rank split, worker count or which loader produced the batch. 23-bit uniforms keep
``x + ½`` exact in float32. ε is bitwise reproducible on one device type; CPU and CUDA may differ in the last ulp
of ``log``/``cos``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MASK64 = (1 << 64) - 1
G = 0x9E3779B97F4A7C15  # SplitMix64 increment (2⁶⁴/φ)
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
FLIP_SALT = 0x5DEECE66DF1A9B3C


def _signed(x: int) -> int:
    """uint64 → the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64(z: int) -> int:
    """SplitMix64 finaliser on Python ints (the reference the tensor version is tested against)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The uint64 key of sample ``index`` at ``epoch``."""
    k = mix64(seed + G)
    k = mix64(k + epoch + G)
    return mix64(k + index + G)


def sample_keys(seed: int, epoch: int, indices: list[int] | np.ndarray) -> np.ndarray:
    """int64 array (the uint64 bits) of the keys of ``indices``: what loaders ship to the device."""
    return np.array([_signed(sample_key(seed, epoch, int(i))) for i in indices], dtype=np.int64)


def flip_decision(key: int) -> bool:
    """Horizontal flip of a sample with this (uint64) key: a fair coin independent of its ε."""
    return bool(mix64(key ^ FLIP_SALT) >> 63)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64_t(z: torch.Tensor) -> torch.Tensor:
    # int64 add/mul wrap modulo 2⁶⁴ in torch's CPU and CUDA kernels, which is uint64 arithmetic on the same bits.
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    return z ^ _srl(z, 31)


def stream_words(keys: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) int64: the first ``count`` SplitMix64 outputs from each key (bits as uint64)."""
    c = torch.arange(1, count + 1, dtype=torch.int64, device=keys.device)
    state = keys.to(torch.int64)[:, None] + c[None, :] * _signed(G)
    return _mix64_t(state)


def standard_normal(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float32 standard normals, row b a pure function of ``keys[b]``; computed on ``keys.device``."""
    words = stream_words(keys, (n + 1) // 2)
    scale = 2.0**-23
    u1 = (_srl(words, 41).to(torch.float32) + 0.5) * scale
    u2 = (((words >> 18) & 0x7FFFFF).to(torch.float32) + 0.5) * scale
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2.0 * math.pi) * u2
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n]


def sample_latents(moments: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, 2C, h, w) stored moments (mean, std) + int64 keys → (B, C, h, w) float32 ``(mean + std·ε)·scale``."""
    if moments.ndim != 4 or moments.shape[1] % 2:
        raise ValueError(f"moments must be (B, 2C, h, w), got {tuple(moments.shape)}")
    if keys.shape != (moments.shape[0],):
        raise ValueError(f"need one key per sample: keys {tuple(keys.shape)}, moments {tuple(moments.shape)}")
    mean, std = moments.to(torch.float32).chunk(2, dim=1)
    eps = standard_normal(keys.to(moments.device), mean[0].numel()).view_as(mean)
    return (mean + std * eps) * scale
