"""Fused token-level NT-Xent (InfoNCE) with flash-style tiling: the M x M logit matrix is never materialised.

Notation: x = proj rows (queries), y = target rows (keys), M = B*T rows of dim D, q = x/|x|, k = y/|y|
(F.normalize semantics, eps 1e-12, fp32), s_ij = q_i.k_j / tau. Each query i has a candidate set C(i):
all M keys ("batch" negatives) or the B keys at its token position ("position" negatives). Then

    loss = mean_i (lse_i - s_ii),                 lse_i = logsumexp_{j in C(i)} s_ij
    symmetric: 0.5 * (that + mean_j (lse'_j - s_jj)), lse'_j = logsumexp_{i in C(j)} s_ij

Candidate sets are described by a "group" indexing shared by all kernels: group g, member r is row
g * group_stride + r * elem_stride. Batch negatives are one group of M members (stride 0, 1); position
negatives are T groups of B members (stride 1, T), so the (B, T, D) layout is used as is, with no permute.

A larger key set (global negatives): local queries x (B*T rows) against keys y of B_k >= B images (B_k*T rows,
e.g. the teacher features of the whole global batch), the positive of query row r being key row o*T + r
(o = key_offset, the local images' place in the key set). The key groups share the queries' strides and only
hold more members (`key_group_size`: B_k*T or B_k), so every logit kernel takes both counts; the positives
are the key slice y[o*T : o*T + B*T] (row_stats' cosines and the -k term of the gradient). One-sided only,
no gradient for such keys; the square case (B_k = B, o = 0) is the in-batch loss, launched as before.

Kernels
  forward  row_stats (norms, cosines = positive logits; see cosine.py), then `_lse_kernel` per query block:
           loop over key blocks, each logit tile built by a loop over D in BLOCK_D chunks (no power-of-two
           D needed), online max / sum in base 2. Only the per-row LSE (fp32) is written. The symmetric
           loss runs the same kernel again with x and y swapped for the column LSEs.
  backward with g = upstream grad and c = g / (M tau),
             dL/dq_i = c (sum_j G_ij k_j - k_i),   dL/dk_j = c (sum_i G_ij q_i - q_j),
             G_ij = a exp(s_ij - lse_i) + b exp(s_ij - lse'_j),  (a, b) = (1, 0) or (0.5, 0.5).
           `_grad_kernel` recomputes logit tiles from x, y and the saved LSEs and accumulates sum_j G_ij k_j
           into an fp32 (M, D) buffer; with x and y swapped (and a, b swapped) the same kernel gives the
           key side. D is too large (768-1536) to keep a BLOCK_M x D accumulator in registers, so each
           program read-modify-writes its own rows of that buffer once per key block (no atomics: a
           program owns its rows). `_normalize_bwd_kernel` then adds the -k_i term and chains through the
           normalisation. The key-side pass is skipped when target needs no gradient (REPA's frozen
           encoder features).
  one pass for the one-sided loss when proj needs a gradient (always, in training), `_lse_grad_kernel`
           accumulates sum_j P_ij k_j during the forward itself, rescaling with the online max as flash
           attention does its output (the keys are also the values), so the query side's logits are not
           computed twice. The forward returns d proj; the backward scales it, and runs the key-side pass
           only for a target that needs a gradient (REPA/ERW's frozen teacher does not): 2 logit-sized
           products per step instead of 3 for a frozen target, 4 instead of 5 for a trained one.
  splits   when query blocks alone are too few programs for the GPU (M = 8192, one local batch of 32 images,
           is 64 programs of 128 rows on 132 SMs), both logit kernels also split the keys over a third grid
           axis: forward partial max/sum merged afterwards, backward one (M, D) partial per split, summed by
           `_normalize_bwd_kernel` (see `tiles.key_splits`).
Tile sizes come from `tiles.py`; `aot.py` compiles these launches for sm_80/sm_90 without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _utils
from ._utils import EPS
from .cosine import _INTERPRETED as _ROW_KERNELS_INTERPRETED
from .cosine import row_launch, row_stats
from .launch import Launch
from .tiles import key_splits, logit_tiles

LOG2E = 1.4426950408889634  # the kernels spell out log2(e) and ln(2) as literals (no globals in @jit)

NEGATIVES = ("batch", "position")

# Triton picks interpreter or compiler when a kernel is decorated: at this module's (and cosine's) import.
_INTERPRETED = _utils.interpreting() and _ROW_KERNELS_INTERPRETED

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST only works around the interpreter's broken bf16 dot (see _utils.dot_settings).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _raw_logits(
    X,
    Y,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """x_i . y_j (fp32) for one BLOCK_M x BLOCK_N tile; masked rows/columns/features contribute 0.

    Raw (unnormalised) operands go into the dot and the inverse norms are applied to the fp32 result,
    which is more accurate than rounding normalised vectors back to bf16 and saves writing q and k.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_base = rows.to(tl.int64)[:, None] * D
    y_base = cols.to(tl.int64)[None, :] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(X + x_base + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        y_t = tl.load(Y + y_base + offs_d[:, None], mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _mma(x, y_t, acc, INPUT_PRECISION, UPCAST)
    return acc


@triton.jit
def _query_block(NORM_X, group_size, group_stride, elem_stride, scale_log2, EPS: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query rows (of group program_id(1)), their mask, and their logit scale log2(e) / (tau |x|)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < group_size
    rows = tl.program_id(1) * group_stride + offs_m * elem_stride
    # log2(e)/tau folded into the row scale: the softmax runs on exp2, the cheap hardware op.
    row_scale = scale_log2 / tl.maximum(tl.load(NORM_X + rows, mask=row_mask, other=1.0), EPS)
    return rows, row_mask, row_scale


@triton.jit
def _key_range(blocks_per_split, key_group_size, BLOCK_N: tl.constexpr):
    """[n_lo, n_hi): the key positions of this program's split (program_id(2)) within its group."""
    n_lo = tl.program_id(2) * blocks_per_split * BLOCK_N
    return n_lo, tl.minimum(n_lo + blocks_per_split * BLOCK_N, key_group_size)


@triton.jit
def _logit_tile(
    X,
    Y,
    NORM_Y,
    rows,
    row_mask,
    row_scale,
    n0,
    key_group_size,
    group_stride,
    elem_stride,
    D,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Base-2 logits s_ij * log2(e) of the key block starting at n0, with its key rows, mask and 1/|y|."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_mask = offs_n < key_group_size
    cols = tl.program_id(1) * group_stride + offs_n * elem_stride
    col_scale = 1.0 / tl.maximum(tl.load(NORM_Y + cols, mask=col_mask, other=1.0), EPS)
    s = _raw_logits(X, Y, rows, cols, row_mask, col_mask, D, BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, UPCAST)
    return s * row_scale[:, None] * col_scale[None, :], cols, col_mask, col_scale


@triton.jit
def _lse_kernel(
    X,
    Y,
    NORM_X,
    NORM_Y,
    OUT_M,
    OUT_L,
    n_rows,
    group_size,
    key_group_size,
    group_stride,
    elem_stride,
    D,
    blocks_per_split,
    scale_log2,
    EPS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """LSE_i = logsumexp_{j in group} q_i.k_j / tau for one block of query rows of one group.

    Without SPLIT the program sweeps every key block and writes LSE (natural log) to OUT_M. With SPLIT,
    program_id(2) = s sweeps only key blocks [s * blocks_per_split, (s + 1) * blocks_per_split) and writes
    its running max and sum (base 2) to row s of OUT_M / OUT_L, (splits, n_rows) each; the caller merges
    them. Splitting keys gives small problems enough programs to fill the GPU (flash-decoding's idea).
    """
    split = tl.program_id(2)
    n_lo, n_hi = _key_range(blocks_per_split, key_group_size, BLOCK_N)
    rows, row_mask, row_scale = _query_block(NORM_X, group_size, group_stride, elem_stride, scale_log2, EPS, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        s, _cols, col_mask, _col_scale = _logit_tile(
            X, Y, NORM_Y, rows, row_mask, row_scale, n0, key_group_size, group_stride, elem_stride, D, EPS,
            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
        # Every key block holds at least one valid column (no split is empty, see tiles.key_splits), so m_new
        # is finite and no inf - inf occurs.
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    if SPLIT:
        tl.store(OUT_M + split * n_rows + rows, m_i, mask=row_mask)
        tl.store(OUT_L + split * n_rows + rows, l_i, mask=row_mask)
    else:
        tl.store(OUT_M + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=row_mask)


@triton.jit
def _grad_kernel(
    X,
    Y,
    NORM_X,
    NORM_Y,
    LSE_X,
    LSE_Y,
    ACC,
    n_rows,
    group_size,
    key_group_size,
    group_stride,
    elem_stride,
    D,
    blocks_per_split,
    scale_log2,
    w_x,
    w_y,
    HAS_LSE_X: tl.constexpr,
    HAS_LSE_Y: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """ACC_i = sum_{j in group} (w_x exp(s_ij - LSE_X_i) + w_y exp(s_ij - LSE_Y_j)) k_j, fp32.

    ACC is (splits, n_rows, D): program_id(2) = s sums key blocks [s * blocks_per_split, ...) into ACC[s]
    (partials, summed by `_normalize_bwd_kernel`), so no two programs write the same element.
    """
    split = tl.program_id(2)
    n_lo, n_hi = _key_range(blocks_per_split, key_group_size, BLOCK_N)
    rows, row_mask, row_scale = _query_block(NORM_X, group_size, group_stride, elem_stride, scale_log2, EPS, BLOCK_M)
    if HAS_LSE_X:
        lse_x = tl.load(LSE_X + rows, mask=row_mask, other=0.0) * 1.4426950408889634
    else:
        lse_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_base = (split.to(tl.int64) * n_rows + rows.to(tl.int64))[:, None] * D
    for n0 in range(n_lo, n_hi, BLOCK_N):
        s, cols, col_mask, col_scale = _logit_tile(
            X, Y, NORM_Y, rows, row_mask, row_scale, n0, key_group_size, group_stride, elem_stride, D, EPS,
            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
        p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_LSE_X:
            p += w_x * tl.exp2(s - lse_x[:, None])
        if HAS_LSE_Y:
            lse_y = tl.load(LSE_Y + cols, mask=col_mask, other=0.0) * 1.4426950408889634
            p += w_y * tl.exp2(s - lse_y[None, :])
        p = tl.where(col_mask[None, :], p, 0.0)
        _add_p_times_keys(
            ACC, acc_base, Y, cols, col_mask, col_scale, row_mask, p, p, n0 > n_lo, D, False,  # (no alpha)
            BLOCK_M, BLOCK_D, INPUT_PRECISION, UPCAST,
        )  # fmt: skip


@triton.jit
def _add_p_times_keys(
    ACC,
    acc_base,
    Y,
    cols,
    col_mask,
    col_scale,
    row_mask,
    p,
    alpha,
    accumulate,
    D,
    RESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """ACC rows <- (ACC rows [* alpha if RESCALE] if accumulate else 0) + p @ k over D in BLOCK_D chunks.

    D is too large (768-1536) for a BLOCK_M x D accumulator in registers, so the rows are read and written
    once per key block (a program owns its rows: no atomics).
    """
    # Probabilities (<= 1) go into the second dot in the input dtype, as in flash attention.
    p = p.to(Y.dtype.element_ty)
    y_base = cols.to(tl.int64)[:, None] * D
    # The split's first key block initialises its rows (the buffer starts uninitialised), later ones add.
    # (A row vector, not a scalar: the interpreter mistypes `block_mask & scalar_bool`.)
    keep = (tl.zeros((BLOCK_M,), dtype=tl.int32) + accumulate.to(tl.int32)) > 0
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        y = tl.load(Y + y_base + offs_d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        # Normalise the key chunk before the dot (not fold 1/|y| into p): 1/|y| can overflow fp16.
        k = (y.to(tl.float32) * col_scale[:, None]).to(Y.dtype.element_ty)
        ptrs = ACC + acc_base + offs_d[None, :]
        out_mask = row_mask[:, None] & d_mask[None, :]
        prev = tl.load(ptrs, mask=out_mask & keep[:, None], other=0.0)
        if RESCALE:
            prev = prev * alpha[:, None]
        tl.store(ptrs, _mma(p, k, prev, INPUT_PRECISION, UPCAST), mask=out_mask)


@triton.jit
def _lse_grad_kernel(
    X,
    Y,
    NORM_X,
    NORM_Y,
    OUT_M,
    OUT_L,
    ACC,
    n_rows,
    group_size,
    key_group_size,
    group_stride,
    elem_stride,
    D,
    blocks_per_split,
    scale_log2,
    EPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One pass for the one-sided loss: the row LSE and the softmax-weighted key sum d proj needs.

    The softmax-weighted key sum the gradient needs, sum_j P_ij k_j, is attention's output with the keys as
    values, so it accumulates with the online LSE as in flash attention's forward: ACC_i is rescaled by
    2^(m_old - m_new) whenever the running max grows. Program_id(2) = s writes its running max m and sum l
    (base 2) to row s of OUT_M / OUT_L and its unnormalised ACC to ACC[s]; `_merge_splits` gives the LSE
    and each split's weight 2^(m_s - m) / L. No logit tile is computed twice (the two-pass form recomputes
    every one in the backward).
    """
    split = tl.program_id(2)
    n_lo, n_hi = _key_range(blocks_per_split, key_group_size, BLOCK_N)
    rows, row_mask, row_scale = _query_block(NORM_X, group_size, group_stride, elem_stride, scale_log2, EPS, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_base = (split.to(tl.int64) * n_rows + rows.to(tl.int64))[:, None] * D
    for n0 in range(n_lo, n_hi, BLOCK_N):
        s, cols, col_mask, col_scale = _logit_tile(
            X, Y, NORM_Y, rows, row_mask, row_scale, n0, key_group_size, group_stride, elem_stride, D, EPS,
            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
        s = tl.where(col_mask[None, :], s, float("-inf"))  # no split is empty: m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # 0 at the first block (m_i = -inf), where ACC is not read
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        _add_p_times_keys(
            ACC, acc_base, Y, cols, col_mask, col_scale, row_mask, p, alpha, n0 > n_lo, D, True,
            BLOCK_M, BLOCK_D, INPUT_PRECISION, UPCAST,
        )  # fmt: skip
    tl.store(OUT_M + split * n_rows + rows, m_i, mask=row_mask)
    tl.store(OUT_L + split * n_rows + rows, l_i, mask=row_mask)


@triton.jit
def _sum_partials(ACC, offs, mask, n_splits, split_stride, WEIGHTS, rows, row_mask, n_rows, WEIGHTED: tl.constexpr):
    """sum_s ACC[s] over the (rows, chunk) block at offs, each split times WEIGHTS[s, row] if WEIGHTED."""
    a = tl.load(ACC + offs, mask=mask, other=0.0)
    if WEIGHTED:
        a = a * tl.load(WEIGHTS + rows, mask=row_mask, other=0.0)[:, None]
    for s in range(1, n_splits):
        part = tl.load(ACC + s * split_stride + offs, mask=mask, other=0.0)
        if WEIGHTED:
            part = part * tl.load(WEIGHTS + s * n_rows + rows, mask=row_mask, other=0.0)[:, None]
        a += part
    return a


@triton.jit
def _normalize_bwd_kernel(
    X,
    NORM_X,
    ACC,
    WEIGHTS,
    Y,
    NORM_Y,
    GRAD,
    DX,
    n_rows,
    n_splits,
    D,
    scale,
    EPS: tl.constexpr,
    WEIGHTED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dL/dx for dL/dq = c (ACC - k), c = GRAD * scale, through q = x / max(|x|, eps), k = y / max(|y|, eps).

    ACC holds n_splits partial sums (splits, n_rows, D), added here (WEIGHTED: each times its split's
    per-row weight, (splits, n_rows), the one-pass kernel's normalisation).

    dL/dx = (dq - q (q.dq)) / |x|, or dq / eps where the norm is clamped (the clamp has no gradient).
    Two passes over D: the first for q.dq, the second to write.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    base = rows.to(tl.int64)[:, None] * D
    nx = tl.load(NORM_X + rows, mask=row_mask, other=1.0)
    rx = 1.0 / tl.maximum(nx, EPS)
    ry = 1.0 / tl.maximum(tl.load(NORM_Y + rows, mask=row_mask, other=1.0), EPS)
    c = tl.load(GRAD).to(tl.float32) * scale
    x_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    x_y = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = _sum_partials(
            ACC, base + cols[None, :], mask, n_splits, n_rows.to(tl.int64) * D, WEIGHTS, rows, row_mask, n_rows,
            WEIGHTED,
        )  # fmt: skip
        y = tl.load(Y + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x_acc += tl.sum(x * a, axis=1)
        x_y += tl.sum(x * y, axis=1)
    q_dq = c * rx * (x_acc - ry * x_y)
    q_dq = tl.where(nx >= EPS, q_dq, 0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols[None, :] < D)
        x = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = _sum_partials(
            ACC, base + cols[None, :], mask, n_splits, n_rows.to(tl.int64) * D, WEIGHTS, rows, row_mask, n_rows,
            WEIGHTED,
        )  # fmt: skip
        y = tl.load(Y + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dq = c * (a - y * ry[:, None])
        dx = (dq - x * (rx * q_dq)[:, None]) * rx[:, None]
        tl.store(DX + base + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers


def _groups(b: int, t: int, position: bool) -> tuple[int, int, int, int]:
    """(group_size, n_groups, group_stride, elem_stride) of the candidate sets for (B, T, D) rows."""
    if position:
        return b, t, 1, t
    return b * t, 1, 0, 1


def _key_group_size(b_keys: int, t: int, position: bool) -> int:
    """Keys per candidate set for (B_k, T, D) key rows. The keys' groups share the queries' strides (the (B, T, D)
    layout, T tokens per image), so a larger key set changes only this count: the B_k keys at one token position,
    or all B_k * T keys."""
    return b_keys if position else b_keys * t


class _LogitPlan:
    """Tiles, grid (query blocks, groups, key splits) and the shared arguments of one logit-kernel launch.

    `groups` describes the query rows x; `key_group_size` (default: the query group size) the keys per group,
    larger when local queries meet a larger key set. Tiles follow the query group size.
    """

    def __init__(
        self,
        kernel: str,
        x: Tensor,
        groups: tuple[int, int, int, int],
        temperature: float,
        input_precision: str,
        bytes_per_split: int = 0,
        key_group_size: int | None = None,
    ) -> None:
        group_size, n_groups, group_stride, elem_stride = groups
        key_group_size = group_size if key_group_size is None else key_group_size
        n, d = x.shape
        self.kernel = kernel
        self.tiles = logit_tiles(kernel, group_size, d, x.dtype, x.device)
        query_blocks = triton.cdiv(group_size, self.tiles.block_m)
        key_blocks = triton.cdiv(key_group_size, self.tiles.block_n)
        self.splits = key_splits(query_blocks * n_groups, key_blocks, x.device, bytes_per_split)
        self.grid = (query_blocks, n_groups, self.splits)
        precision, upcast = _utils.dot_settings(x.dtype, input_precision)
        self.geometry = dict(
            n_rows=n,
            group_size=group_size,
            key_group_size=key_group_size,
            group_stride=group_stride,
            elem_stride=elem_stride,
            D=d,
            blocks_per_split=triton.cdiv(key_blocks, self.splits),
            scale_log2=LOG2E / temperature,
        )
        self.flags = dict(EPS=EPS, INPUT_PRECISION=precision, UPCAST=upcast, **self.tiles.constexprs())

    def run(self, fn: triton.JITFunction, args: dict, flags: dict | None = None) -> None:
        Launch(f"nt_xent.{self.kernel}", fn, self.grid, {**args, **self.geometry}, {**(flags or {}), **self.flags},
               self.tiles.options()).run()


def _lse(
    x: Tensor,
    y: Tensor,
    norm_x: Tensor,
    norm_y: Tensor,
    groups: tuple[int, int, int, int],
    temperature: float,
    input_precision: str,
    key_group_size: int | None = None,
) -> Tensor:
    """Per-row LSE over each row's candidate keys (fp32, natural log)."""
    n = x.shape[0]
    plan = _LogitPlan("lse", x, groups, temperature, input_precision, key_group_size=key_group_size)
    out_m = _utils.empty((plan.splits, n), torch.float32, x.device)
    out_l = _utils.empty((plan.splits, n), torch.float32, x.device) if plan.splits > 1 else out_m
    plan.run(_lse_kernel, dict(X=x, Y=y, NORM_X=norm_x, NORM_Y=norm_y, OUT_M=out_m, OUT_L=out_l),
             dict(SPLIT=plan.splits > 1))
    if plan.splits == 1:
        return out_m[0]
    return _merge_splits(out_m, out_l)[0]


def _merge_splits(out_m: Tensor, out_l: Tensor) -> tuple[Tensor, Tensor]:
    """Per-split base-2 running max / sum (splits, n) -> (LSE (natural log), each split's weight).

    lse = ln2 (m + log2 L) with m = max_s m_s and L = sum_s l_s 2^(m_s - m); split s's softmax-weighted
    partial sum counts 2^(m_s - m) / L of the total.
    """
    m = out_m.amax(dim=0)
    rescale = torch.exp2(out_m - m)
    total = (out_l * rescale).sum(dim=0)
    return (m + torch.log2(total)) * math.log(2.0), rescale / total


def _lse_grad(
    x: Tensor,
    y: Tensor,
    norm_x: Tensor,
    norm_y: Tensor,
    groups: tuple[int, int, int, int],
    temperature: float,
    input_precision: str,
    key_group_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass: (row LSE, (splits, M, D) fp32 partials of sum_j P_ij k_j, (splits, M) weights of the partials)."""
    n, d = x.shape
    plan = _LogitPlan("lse_grad", x, groups, temperature, input_precision, bytes_per_split=n * d * 4,
                      key_group_size=key_group_size)
    out_m = _utils.empty((plan.splits, n), torch.float32, x.device)
    out_l = _utils.empty((plan.splits, n), torch.float32, x.device)
    acc = _utils.empty((plan.splits, n, d), torch.float32, x.device)
    plan.run(_lse_grad_kernel, dict(X=x, Y=y, NORM_X=norm_x, NORM_Y=norm_y, OUT_M=out_m, OUT_L=out_l, ACC=acc))
    lse, weights = _merge_splits(out_m, out_l)
    return lse, acc, weights


def _grad_partials(
    x: Tensor,
    y: Tensor,
    norm_x: Tensor,
    norm_y: Tensor,
    lse_x: Tensor | None,
    w_x: float,
    lse_y: Tensor | None,
    w_y: float,
    groups: tuple[int, int, int, int],
    temperature: float,
    input_precision: str,
    key_group_size: int | None = None,
) -> Tensor:
    """(splits, M, D) fp32 partial sums whose sum is sum_j G_ij k_j; a missing LSE drops its term (the column
    LSE, indexed by key row, only exists for a square problem)."""
    n, d = x.shape
    plan = _LogitPlan("grad", x, groups, temperature, input_precision, bytes_per_split=n * d * 4,
                      key_group_size=key_group_size)
    acc = _utils.empty((plan.splits, n, d), torch.float32, x.device)
    plan.run(
        _grad_kernel,
        dict(
            X=x,
            Y=y,
            NORM_X=norm_x,
            NORM_Y=norm_y,
            LSE_X=norm_x if lse_x is None else lse_x,  # dummies when absent
            LSE_Y=norm_y if lse_y is None else lse_y,
            ACC=acc,
            w_x=w_x,
            w_y=w_y,
        ),
        dict(HAS_LSE_X=lse_x is not None, HAS_LSE_Y=lse_y is not None),
    )
    return acc


def _normalize_bwd(
    x: Tensor,
    norm_x: Tensor,
    acc: Tensor,
    y: Tensor,
    norm_y: Tensor,
    grad: Tensor,
    scale: float,
    weights: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    n, d = x.shape
    dx = _utils.empty((n, d), out_dtype or x.dtype, x.device)
    row_launch(
        "nt_xent.normalize_bwd",
        _normalize_bwd_kernel,
        n,
        d,
        dict(
            X=x,
            NORM_X=norm_x,
            ACC=acc,
            WEIGHTS=norm_x if weights is None else weights,  # a dummy when unweighted
            Y=y,
            NORM_Y=norm_y,
            GRAD=grad,
            DX=dx,
            n_splits=acc.shape[0],
            scale=scale,
        ),
        dict(WEIGHTED=weights is not None),
    )
    return dx


# --------------------------------------------------------------------------------------------- custom ops


def _check_key_shapes(proj: torch.Size, target: torch.Size, key_offset: int, symmetric: bool) -> None:
    """target (B_k, T, D) must hold proj's (B, T, D) positives at rows [key_offset, key_offset + B)."""
    b, t, d = proj
    if len(target) != 3 or tuple(target[1:]) != (t, d) or not 0 <= key_offset <= target[0] - b:
        raise ValueError(
            f"keys {tuple(target)} must be (B_k, T, D) = (>= key_offset + {b}, {t}, {d}) for queries {tuple(proj)} "
            f"with key_offset {key_offset}: the positive of query (b, n) is keys[key_offset + b, n]"
        )
    if symmetric and (target[0] != b or key_offset):
        raise ValueError("symmetric NT-Xent takes the local batch's keys (B_k = B, key_offset 0)")


def _rows(
    proj: Tensor, target: Tensor, position: bool, key_offset: int, symmetric: bool = False
) -> tuple[Tensor, Tensor, tuple[int, int, int, int], int, int]:
    """(x, y, query groups, keys per group, first positive key row) of (B, T, D) proj against (B_k, T, D) target."""
    _check_key_shapes(proj.shape, target.shape, key_offset, symmetric)
    b, t, d = proj.shape
    x = proj.contiguous().view(b * t, d)
    y = target.contiguous().view(target.shape[0] * t, d)
    return x, y, _groups(b, t, position), _key_group_size(target.shape[0], t, position), key_offset * t


def _stats(x: Tensor, y: Tensor, first: int) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 (||x_r||, ||y_j|| of every key row, cos(x_r, y_{first + r}) = the positive logits times tau)."""
    m = x.shape[0]
    if y.shape[0] == m:  # the in-batch (square) loss: every key is some query's positive
        return row_stats(x, y)
    norm_y = row_stats(y, y)[0]  # every key's norm (its "cosines" with itself are not used)
    norm_x, _, cos = row_stats(x, y[first : first + m])
    return norm_x, norm_y, cos


@torch.library.custom_op("erw_fast::nt_xent_fwd", mutates_args=())
def nt_xent_fwd(
    proj: Tensor,
    target: Tensor,
    temperature: float,
    position: bool,
    symmetric: bool,
    input_precision: str,
    key_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse_row, lse_col, ||proj||, ||target||); lse_col is empty unless symmetric.

    proj: (B, T, D) queries; target: (B, T, D) keys, or (B_k, T, D) with B_k >= key_offset + B, a larger key set
    holding the positives at target[key_offset : key_offset + B] (one-sided only). One kernel dtype
    (fp32/fp16/bf16). Everything returned is fp32; ||target|| has one entry per key row.
    """
    if proj.dtype != target.dtype:
        raise ValueError(f"nt_xent_fwd needs one dtype, got {proj.dtype} and {target.dtype}")
    x, y, groups, key_groups, first = _rows(proj, target, position, key_offset, symmetric)
    norm_p, norm_t, cos = _stats(x, y, first)
    positive = cos / temperature
    lse_row = _lse(x, y, norm_p, norm_t, groups, temperature, input_precision, key_groups)
    loss = (lse_row - positive).mean()
    if symmetric:
        lse_col = _lse(y, x, norm_t, norm_p, groups, temperature, input_precision)
        loss = 0.5 * (loss + (lse_col - positive).mean())
    else:
        lse_col = _utils.empty((0,), torch.float32, x.device)
    return loss, lse_row, lse_col, norm_p, norm_t


@nt_xent_fwd.register_fake
def _(proj, target, temperature, position, symmetric, input_precision, key_offset=0):
    m = proj.shape[0] * proj.shape[1]
    rows = proj.new_empty((m,), dtype=torch.float32)
    lse_col = proj.new_empty((m if symmetric else 0,), dtype=torch.float32)
    return (
        proj.new_empty((), dtype=torch.float32),
        rows,
        lse_col,
        torch.empty_like(rows),
        proj.new_empty((target.shape[0] * target.shape[1],), dtype=torch.float32),
    )


@torch.library.custom_op("erw_fast::nt_xent_bwd", mutates_args=())
def nt_xent_bwd(
    grad: Tensor,
    proj: Tensor,
    target: Tensor,
    lse_row: Tensor,
    lse_col: Tensor,
    norm_p: Tensor,
    norm_t: Tensor,
    temperature: float,
    position: bool,
    symmetric: bool,
    input_precision: str,
    need_proj: bool,
    need_target: bool,
    key_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """(d loss/d proj, d loss/d target) times grad; an unneeded gradient comes back as an empty tensor.

    With a larger key set (see `nt_xent_fwd`) only d proj is implemented: the keys are the frozen teacher's.
    """
    b, t, d = proj.shape
    m = b * t
    x, y, groups, key_groups, first = _rows(proj, target, position, key_offset, symmetric)
    if need_target and y.shape[0] != m:
        raise ValueError("the Triton NT-Xent has no gradient for a larger key set (keys=): pass constant keys")
    grad = grad.to(torch.float32)
    scale = 1.0 / (m * temperature)
    w_own = 0.5 if symmetric else 1.0  # weight of the query-side softmax in G
    lse_other = lse_col if symmetric else None
    grad_p = _utils.empty((0,), proj.dtype, x.device)  # two tensors: custom-op outputs may not alias
    grad_t = _utils.empty((0,), proj.dtype, x.device)
    if need_proj:
        acc = _grad_partials(x, y, norm_p, norm_t, lse_row, w_own, lse_other, 0.5, groups, temperature, input_precision,
                             key_groups)
        # the -k term: each query's positive key (all keys, in order, in the square case)
        grad_p = _normalize_bwd(x, norm_p, acc, y[first : first + m], norm_t[first : first + m], grad, scale)
        grad_p = grad_p.view(b, t, d)
        del acc  # before the key side allocates its own
    if need_target:
        # Keys as rows: their own softmax is the column one (weight 0.5 or absent), the row one is "other".
        acc = _grad_partials(y, x, norm_t, norm_p, lse_other, 0.5, lse_row, w_own, groups, temperature, input_precision)
        grad_t = _normalize_bwd(y, norm_t, acc, x, norm_p, grad, scale).view(b, t, d)
    return grad_p, grad_t


@nt_xent_bwd.register_fake
def _(
    grad,
    proj,
    target,
    lse_row,
    lse_col,
    norm_p,
    norm_t,
    temperature,
    position,
    symmetric,
    input_precision,
    need_proj,
    need_target,
    key_offset=0,
):
    grad_p = torch.empty_like(proj) if need_proj else proj.new_empty((0,))
    grad_t = torch.empty_like(target) if need_target else target.new_empty((0,))
    return grad_p, grad_t


def _setup_context(ctx, inputs, output) -> None:
    proj, target, temperature, position, symmetric, input_precision, key_offset = inputs
    _, lse_row, lse_col, norm_p, norm_t = output
    ctx.save_for_backward(proj, target, lse_row, lse_col, norm_p, norm_t)
    ctx.settings = (temperature, position, symmetric, input_precision)
    ctx.key_offset = key_offset


def _backward(ctx, grad_loss, *_unused_grads):
    # Only the loss is differentiable; LSEs and norms are saved statistics.
    need_proj, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_p, grad_t = nt_xent_bwd(grad_loss, *ctx.saved_tensors, *ctx.settings, need_proj, need_target, ctx.key_offset)
    return (grad_p if need_proj else None, grad_t if need_target else None, None, None, None, None, None)


nt_xent_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("erw_fast::nt_xent_one_pass", mutates_args=())
def nt_xent_one_pass(
    proj: Tensor, target: Tensor, temperature: float, position: bool, input_precision: str, key_offset: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, d loss/d proj in fp32, lse_row, ||proj||, ||target||) of the one-sided loss from one pass.

    The gradient for proj is computed with the loss, so the backward only scales it by the upstream gradient;
    a target that needs a gradient gets it from one key-side pass in the backward (the row LSEs are saved).
    proj (B, T, D) and target (B, T, D), or a larger (B_k, T, D) key set with the positives at
    target[key_offset : key_offset + B] (see `nt_xent_fwd`; no gradient for such keys); one kernel dtype.
    """
    if proj.dtype != target.dtype:
        raise ValueError(f"nt_xent_one_pass needs one dtype, got {proj.dtype} and {target.dtype}")
    b, t, d = proj.shape
    m = b * t
    x, y, groups, key_groups, first = _rows(proj, target, position, key_offset)
    norm_p, norm_t, cos = _stats(x, y, first)
    lse, acc, weights = _lse_grad(x, y, norm_p, norm_t, groups, temperature, input_precision, key_groups)
    loss = (lse - cos / temperature).mean()
    unit = torch.ones((), dtype=torch.float32, device=x.device)  # d loss / d loss
    grad = _normalize_bwd(x, norm_p, acc, y[first : first + m], norm_t[first : first + m], unit,
                          1.0 / (m * temperature), weights, torch.float32)
    return loss, grad.view(b, t, d), lse, norm_p, norm_t


@nt_xent_one_pass.register_fake
def _(proj, target, temperature, position, input_precision, key_offset=0):
    rows = proj.new_empty((proj.shape[0] * proj.shape[1],), dtype=torch.float32)
    keys = proj.new_empty((target.shape[0] * target.shape[1],), dtype=torch.float32)
    return (proj.new_empty((), dtype=torch.float32), torch.empty_like(proj, dtype=torch.float32), rows,
            torch.empty_like(rows), keys)


def _setup_one_pass_context(ctx, inputs, output) -> None:
    proj, target, temperature, position, input_precision, key_offset = inputs
    _, grad_proj, lse_row, norm_p, norm_t = output
    if ctx.needs_input_grad[1]:  # the key side's pass needs the inputs and the row statistics
        ctx.save_for_backward(grad_proj, proj, target, lse_row, norm_p, norm_t)
    else:
        ctx.save_for_backward(grad_proj)
    ctx.settings = (temperature, position, input_precision, key_offset)
    ctx.proj_dtype = proj.dtype


def _one_pass_backward(ctx, grad_loss, *_unused_grads):
    grad_proj, *saved = ctx.saved_tensors
    grad_p = (grad_loss * grad_proj).to(ctx.proj_dtype) if ctx.needs_input_grad[0] else None
    grad_t = None
    if ctx.needs_input_grad[1]:
        proj, target, lse_row, norm_p, norm_t = saved
        temperature, position, input_precision, key_offset = ctx.settings
        no_lse_col = lse_row.new_empty((0,))
        _, grad_t = nt_xent_bwd(grad_loss, proj, target, lse_row, no_lse_col, norm_p, norm_t, temperature, position,
                                False, input_precision, False, True, key_offset)
    return grad_p, grad_t, None, None, None, None


nt_xent_one_pass.register_autograd(_one_pass_backward, setup_context=_setup_one_pass_context)


# --------------------------------------------------------------------------------------------- public API


def _check_keys(proj: Tensor, target: Tensor | None, keys: Tensor | None, key_offset: int, symmetric: bool) -> Tensor:
    """The keys of the call: target (the in-batch form, key_offset 0) or `keys` (target None); checked."""
    _utils.check_key_form(target is not None, keys is not None, key_offset, symmetric)
    if keys is None:
        _utils.check_pair(proj, target)
        return target
    if torch.is_grad_enabled() and keys.requires_grad:
        raise ValueError("keys= must be constants (the frozen teacher's features; detach them): the kernels "
                         "compute no gradient for a larger key set")
    if proj.dim() != 3 or proj.numel() == 0:
        raise ValueError(f"proj must be a non-empty (B, T, D) tensor, got {tuple(proj.shape)}")
    _check_key_shapes(proj.shape, keys.shape, key_offset, False)
    if not (proj.is_floating_point() and keys.is_floating_point()):
        raise ValueError(f"proj and keys must be floating point, got {proj.dtype} and {keys.dtype}")
    if proj.device != keys.device:
        raise ValueError(f"proj and keys must be on one device, got {proj.device} and {keys.device}")
    return keys


def nt_xent_triton(
    proj: Tensor,
    target: Tensor | None = None,
    temperature: float = 0.1,
    negatives: str = "batch",
    symmetric: bool = False,
    *,
    input_precision: str | None = None,
    keys: Tensor | None = None,
    key_offset: int = 0,
) -> Tensor:
    """Token-level NT-Xent between (B, T, D) proj (queries) and target (keys); fp32 scalar.

    negatives: "batch" (every one of the B*T keys is a candidate) or "position" (the B keys at the
    query's token position). symmetric averages with the keys-as-queries loss. input_precision sets the
    tl.dot precision for fp32 inputs ("ieee", "tf32", "tf32x3"); None follows
    torch.get_float32_matmul_precision() ("highest" -> "ieee", else "tf32"). Mixed or non-kernel
    dtypes (e.g. fp64) are cast to a common kernel dtype first. Under autocast both go to the autocast dtype,
    as matmuls do: a bf16 projector output meets fp32 teacher features (their final LayerNorm runs in fp32
    under autocast), and promoting both to fp32 would halve the kernels' tile sizes and tensor-core rate.
    Norms, exponentials and accumulation stay fp32 either way.

    keys (instead of target): a (B_k, T, D) key set, B_k >= key_offset + B, e.g. the teacher features of the whole
    global batch. Query (b, n)'s positive is keys[key_offset + b, n]; its candidates are all B_k*T keys ("batch")
    or the B_k keys at position n ("position"); the loss is the mean over the B*T queries. One-sided only, and
    keys get no gradient (ValueError if they require one).
    """
    target = _check_keys(proj, target, keys, key_offset, symmetric)
    _utils.check_runnable(proj.device, _INTERPRETED)
    _utils.check_temperature(temperature)
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    precision = _utils.resolve_input_precision(input_precision)
    dtype = _utils.kernel_dtype(proj.dtype, target.dtype)
    device_type = proj.device.type
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in _utils.KERNEL_DTYPES:
        dtype = torch.get_autocast_dtype(device_type)
    proj = proj.to(dtype).contiguous()
    target = target.to(dtype).contiguous()
    position = negatives == "position"
    if not symmetric and torch.is_grad_enabled() and proj.requires_grad:
        # d proj comes with the loss from one pass (no recomputation); REPA/ERW's frozen teacher needs nothing
        # more, a trained target one key-side pass in the backward.
        return nt_xent_one_pass(proj, target, float(temperature), position, precision, key_offset)[0]
    return nt_xent_fwd(proj, target, float(temperature), position, bool(symmetric), precision, key_offset)[0]
