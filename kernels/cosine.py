"""Fused cosine alignment (REPA's projection loss): loss = -mean over all B*T tokens of cos(proj, target).

One row-wise kernel reads each (proj, target) token pair once and writes the two fp32 norms and the cosine;
the backward kernel reads the pair once more and writes both gradients, using the saved norms and cosine so
it needs no second pass over D. `row_stats` is shared with the NT-Xent kernel, which needs the same norms
and the same cosines (its positive logits).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _utils
from ._utils import EPS
from .launch import Launch

# Triton picks interpreter or compiler when a kernel is decorated, i.e. at this module's import.
_INTERPRETED = _utils.interpreting()

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _row_stats_kernel(
    X,
    Y,
    NORM_X,
    NORM_Y,
    COS,
    n_rows,
    D,
    EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row r: ||x_r||, ||y_r|| and cos_r = x_r.y_r / (max(||x_r||, eps) max(||y_r||, eps)), in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    base = rows.to(tl.int64)[:, None] * D
    xx = tl.zeros((BLOCK_R,), dtype=tl.float32)
    yy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    xy = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xx += tl.sum(x * x, axis=1)
        yy += tl.sum(y * y, axis=1)
        xy += tl.sum(x * y, axis=1)
    nx = tl.sqrt(xx)
    ny = tl.sqrt(yy)
    tl.store(NORM_X + rows, nx, mask=row_mask)
    tl.store(NORM_Y + rows, ny, mask=row_mask)
    tl.store(COS + rows, xy / (tl.maximum(nx, EPS) * tl.maximum(ny, EPS)), mask=row_mask)


@triton.jit
def _cosine_bwd_kernel(
    X,
    Y,
    NORM_X,
    NORM_Y,
    COS,
    GRAD,
    DX,
    DY,
    n_rows,
    D,
    scale,
    EPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dL/dx and dL/dy for L = -scale * sum_r cos_r, chained through x / max(||x||, eps).

    With q = x/|x|, k = y/|y|: dL/dq = -g k, so dL/dx = -g (k - q cos) / |x|. Where the norm is clamped to
    eps the projection term vanishes (the clamp has no gradient), exactly as in F.normalize.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    base = rows.to(tl.int64)[:, None] * D
    nx = tl.load(NORM_X + rows, mask=row_mask, other=1.0)
    ny = tl.load(NORM_Y + rows, mask=row_mask, other=1.0)
    cos = tl.load(COS + rows, mask=row_mask, other=0.0)
    g = -tl.load(GRAD).to(tl.float32) * scale
    rx = 1.0 / tl.maximum(nx, EPS)
    ry = 1.0 / tl.maximum(ny, EPS)
    proj_x = tl.where(nx >= EPS, cos, 0.0)[:, None]
    proj_y = tl.where(ny >= EPS, cos, 0.0)[:, None]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        q = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32) * rx[:, None]
        k = tl.load(Y + base + cols[None, :], mask=mask, other=0.0).to(tl.float32) * ry[:, None]
        dx = (g * rx)[:, None] * (k - q * proj_x)
        dy = (g * ry)[:, None] * (q - k * proj_y)
        tl.store(DX + base + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + base + cols[None, :], dy.to(DY.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers


def row_launch_config(n_rows: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for the row-wise kernels: about 4K elements per tile on a GPU.

    The interpreter runs programs one after another in Python, so there fewer, larger tiles are cheaper.
    """
    block_d = min(triton.next_power_of_2(d), 512)
    budget = 16384 if _utils.interpreting() else 4096
    block_r = max(1, min(budget // block_d, triton.next_power_of_2(n_rows)))
    return block_r, block_d, 4


def row_launch(name: str, kernel: Any, n_rows: int, d: int, args: dict[str, Any],
               constexprs: dict[str, Any] | None = None) -> None:
    """Launch a row-wise kernel on (n_rows, d) inputs: a program per BLOCK_R rows, D walked in BLOCK_D chunks.

    Adds the arguments every row kernel takes (n_rows, D, EPS and the tiles) to the kernel's own.
    """
    block_r, block_d, warps = row_launch_config(n_rows, d)
    Launch(
        name,
        kernel,
        (triton.cdiv(n_rows, block_r),),
        {**args, "n_rows": n_rows, "D": d},
        {"EPS": EPS, **(constexprs or {}), "BLOCK_R": block_r, "BLOCK_D": block_d},
        {"num_warps": warps},
    ).run()


def row_stats(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 (||x_r||, ||y_r||, cos_r) for contiguous (N, D) inputs."""
    n, d = x.shape
    norm_x = _utils.empty((n,), torch.float32, x.device)
    norm_y = _utils.empty((n,), torch.float32, x.device)
    cos = _utils.empty((n,), torch.float32, x.device)
    row_launch("cosine.row_stats", _row_stats_kernel, n, d, dict(X=x, Y=y, NORM_X=norm_x, NORM_Y=norm_y, COS=cos))
    return norm_x, norm_y, cos


# --------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("erw_fast::cosine_align_fwd", mutates_args=())
def cosine_align_fwd(proj: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, ||proj||, ||target||, cos) for contiguous (B, T, D) inputs of one dtype."""
    d = proj.shape[-1]
    norm_p, norm_t, cos = row_stats(proj.contiguous().view(-1, d), target.contiguous().view(-1, d))
    return -cos.mean(), norm_p, norm_t, cos


@cosine_align_fwd.register_fake
def _(proj: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m = proj.numel() // proj.shape[-1]
    stats = [proj.new_empty((m,), dtype=torch.float32) for _ in range(3)]
    return proj.new_empty((), dtype=torch.float32), *stats


@torch.library.custom_op("erw_fast::cosine_align_bwd", mutates_args=())
def cosine_align_bwd(
    grad: Tensor, proj: Tensor, target: Tensor, norm_p: Tensor, norm_t: Tensor, cos: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of `grad * loss` with respect to proj and target (in their dtype)."""
    proj, target = proj.contiguous(), target.contiguous()
    d = proj.shape[-1]
    n = proj.numel() // d
    grad_p = _utils.empty(tuple(proj.shape), proj.dtype, proj.device)
    grad_t = _utils.empty(tuple(target.shape), target.dtype, target.device)
    row_launch(
        "cosine.bwd",
        _cosine_bwd_kernel,
        n,
        d,
        dict(X=proj, Y=target, NORM_X=norm_p, NORM_Y=norm_t, COS=cos, GRAD=grad.to(torch.float32), DX=grad_p,
             DY=grad_t, scale=1.0 / n),
    )
    return grad_p, grad_t


@cosine_align_bwd.register_fake
def _(grad, proj, target, norm_p, norm_t, cos):
    return torch.empty_like(proj), torch.empty_like(target)


def _setup_context(ctx, inputs, output) -> None:
    proj, target = inputs
    _, norm_p, norm_t, cos = output
    ctx.save_for_backward(proj, target, norm_p, norm_t, cos)


def _backward(ctx, grad_loss, *_unused_grads):
    # Only the loss is differentiable; the norms and cosines are saved statistics.
    grad_p, grad_t = cosine_align_bwd(grad_loss, *ctx.saved_tensors)
    return grad_p, grad_t


cosine_align_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- public API


def cosine_alignment_triton(proj: Tensor, target: Tensor) -> Tensor:
    """-mean over all B*T tokens of cos(proj_bt, target_bt) as an fp32 scalar, differentiable in both.

    proj and target are (B, T, D) of one shape; each token is L2-normalised in fp32 with F.normalize's
    eps (1e-12). Mixed or non-kernel dtypes (e.g. fp64) are cast to a common kernel dtype first.
    """
    _utils.check_pair(proj, target)
    _utils.check_runnable(proj.device, _INTERPRETED)
    dtype = _utils.kernel_dtype(proj.dtype, target.dtype)
    proj = proj.to(dtype).contiguous()
    target = target.to(dtype).contiguous()
    return cosine_align_fwd(proj, target)[0]
