"""Fused Triton kernels for the alignment objectives (installed as `erw_fast.kernels`).

Importing this package is cheap and works without Triton: the kernel modules (which need Triton, and read
TRITON_INTERPRET when their kernels are decorated) load on first use of `nt_xent_triton` or
`cosine_alignment_triton`. Check `triton_available()` before calling them.

Modules: `nt_xent` and `cosine` (each kernel beside its custom op and autograd wrapper), `tiles` (tile sizes and
key splits), `launch` (a launch as data), `aot` (compile every launch for sm_80/sm_90 without a GPU and report
registers, spills, shared memory and pipelining: `python -m erw_fast.kernels.aot`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

__all__ = ["cosine_alignment_triton", "nt_xent_triton", "triton_available"]

_LAZY = {"nt_xent_triton": ".nt_xent", "cosine_alignment_triton": ".cosine"}


def triton_available() -> bool:
    """Triton is importable and can run here: on a CUDA device, or in its interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
