"""Helpers shared by the Triton alignment kernels (validation, buffer allocation, launch settings)."""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

# Same eps as `torch.nn.functional.normalize`: q = x / max(||x||, EPS), norms taken in fp32.
EPS = 1e-12

# dtypes `tl.dot` takes directly; anything else (fp64, ...) is cast to fp32 before the kernels run.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_runnable(device: torch.device, interpreted: bool) -> None:
    """Fail clearly where the kernels cannot launch: a non-CUDA tensor with kernels compiled for a GPU.

    `interpreted` is whether the calling module's kernels were decorated under TRITON_INTERPRET=1 (Triton
    reads the switch then, so setting it after the import has no effect).
    """
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device.type}); to run them on the CPU set "
            "TRITON_INTERPRET=1 before erw_fast.kernels.nt_xent / .cosine are first imported"
        )


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a kernel writes is allocated here.

    Tests swap this for a NaN-filled allocation, so an element a kernel forgets to write poisons the
    result instead of silently reading whatever memory `torch.empty` happened to return.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def check_temperature(temperature: float) -> float:
    """The softmax temperature of NT-Xent: a finite number > 0 (every layer that takes one checks it here)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return temperature


def check_pair(proj: Tensor, target: Tensor) -> None:
    """Both inputs must be floating (B, T, D) tensors of one shape on one device."""
    if proj.dim() != 3 or target.dim() != 3 or proj.shape != target.shape:
        raise ValueError(
            "proj and target must both be (B, T, D) with identical shapes, got "
            f"proj {tuple(proj.shape)} and target {tuple(target.shape)}"
        )
    if proj.numel() == 0:
        raise ValueError(f"proj and target must be non-empty, got shape {tuple(proj.shape)}")
    if not (proj.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"proj and target must be floating point, got {proj.dtype} and {target.dtype}")
    if proj.device != target.device:
        raise ValueError(f"proj and target must be on one device, got {proj.device} and {target.device}")


def kernel_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both operands are brought to: their promotion, or fp32 when `tl.dot` can't take it."""
    dtype = torch.promote_types(a, b)
    return dtype if dtype in KERNEL_DTYPES else torch.float32


@torch.compiler.assume_constant_result
def _torch_fp32_matmul_precision() -> str:
    # Dynamo can't trace this getter (non-tensor torch.* result); as a compile-time constant it can.
    return torch.get_float32_matmul_precision()


def resolve_input_precision(input_precision: str | None) -> str:
    """`tl.dot` precision for fp32 operands (ignored for 16-bit ones).

    None follows PyTorch's own fp32 matmul setting, so the kernel is as exact as the matmul it replaces:
    "highest" (PyTorch's default) means IEEE, "high"/"medium" allow TF32.
    """
    if input_precision is None:
        return "ieee" if _torch_fp32_matmul_precision() == "highest" else "tf32"
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS} or None, got {input_precision!r}")
    return input_precision


def dot_settings(dtype: torch.dtype, input_precision: str) -> tuple[str | None, bool]:
    """(INPUT_PRECISION, UPCAST) constexprs for the kernels' dot helper.

    The interpreter multiplies the raw uint16 bit patterns of bfloat16 operands in `tl.dot`
    (triton-lang/triton#11584, unsupported upstream), so there bf16 tiles are upcast to fp32 first. The
    result is the same maths: bf16 x bf16 products are exact in fp32 and the GPU accumulates in fp32.
    """
    if dtype == torch.float32:
        return input_precision, False
    if dtype == torch.bfloat16 and interpreting():
        return "ieee", True
    return None, False


def check_key_form(has_target: bool, has_keys: bool, key_offset: object, symmetric: bool) -> None:
    """NT-Xent's two call forms: ``target`` (the local batch's keys, positives on the diagonal) or ``keys`` (a
    larger key set, the positive of query (b, n) at keys[key_offset + b, n]); the rules both backends share."""
    if not has_keys:
        if not has_target:
            raise ValueError("NT-Xent needs the keys: target (the local batch's, proj's shape) or keys=")
        if key_offset != 0:
            raise ValueError(f"key_offset ({key_offset}) places the positives inside keys=; target has none to place")
        return
    if has_target:
        raise ValueError("pass target (the local batch's keys) or keys= (a key set holding the positives at "
                         "keys[key_offset : key_offset + B]), not both")
    if symmetric:
        raise ValueError(
            "symmetric NT-Xent takes the local batch's keys; with keys= the key-side loss would need every "
            "rank's queries (use target=, or symmetric=False)"
        )
    if not isinstance(key_offset, (int, torch.SymInt)) or isinstance(key_offset, bool):
        raise ValueError(f"key_offset must be an int, got {key_offset!r}")
