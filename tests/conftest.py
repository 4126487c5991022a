"""Test-wide setup.

Triton kernels run under the interpreter on machines without CUDA. The switch is read when a kernel is
decorated, so it must be set before any `erw_fast.kernels` module is imported.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden tensors not found at {GOLDEN_DIR} (expected ../shared/golden beside the checkout)")
    return GOLDEN_DIR
