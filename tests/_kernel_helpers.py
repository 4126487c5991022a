"""Shared pieces of the Triton kernel tests: a NaN-poisoning allocator and a scale-aware comparison."""

from __future__ import annotations

import pytest
import torch

# Max abs error allowed, relative to the largest reference magnitude, per input dtype. fp32 runs the dot in
# IEEE precision; 16-bit inputs round the gradients (and, in the backward, the probabilities) to 8/11
# mantissa bits, so their errors sit near 1e-2 / 1e-3.
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# Where the kernels run: compiled on a GPU, else under the interpreter on the CPU (conftest sets it).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_kernel_device():
    """Context in which tensor factories default to DEVICE (a test module's autouse fixture enters it)."""
    return torch.device(DEVICE)


def poison_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every kernel output/scratch buffer start as NaN, so an element no kernel writes shows up."""
    from erw_fast.kernels import _utils

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_utils, "empty", nan_empty)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str, atol: float = 1e-12
) -> None:
    """max |actual - expected| <= rel * max |expected| + atol (for all-zero references); NaN fails."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten buffer element?)"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale + atol, (
        f"{what}: max abs err {err:.3e} > {rel:.0e} x max |ref| {scale:.3e} + {atol:.0e}"
    )
