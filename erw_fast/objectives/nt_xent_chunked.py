"""Batch-negative NT-Xent in PyTorch with the logits built a chunk of query rows at a time.

The plain form materialises the M x M logits (M = B·T tokens): 17 GB in fp32 at B = 256, T = 256. Here the
forward keeps only per-row log-sum-exps (and, for the symmetric loss, a running per-column max and sum) and the
backward recomputes each chunk's logits, so memory is O(chunk · N + (M + N) · D). It is the PyTorch backend's
form for large problems (``alignment.nt_xent_torch`` switches to it) and a second implementation beside the
Triton kernel.

Queries q are (M, D), keys k (N, D) with N >= M: the in-batch loss has N = M, a larger key set (global
negatives) holds query i's positive at key row o + i (o = ``positive_offset``). With s = q kᵀ / τ, P = softmax
over each row and P' over each column (square only), the loss is mean_i (lse_i − s_i,o+i) (symmetric: the
average with mean_j (lse'_j − s_jj)) and, with E the M x N matrix of ones at (i, o + i),

    dL/dq = (G k − E k) / (M τ),   dL/dk = (Gᵀ q − Eᵀ q) / (M τ),   G = P (symmetric: (P + P') / 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Bytes of fp32 logits one chunk may hold; the backward keeps about three such buffers alive at once.
CHUNK_BYTES = 256 * 2**20


def chunk_rows_for(m: int, chunk_bytes: int | None = None, n_keys: int | None = None) -> int:
    """Query rows per chunk so that one (rows, n_keys) fp32 block stays within `chunk_bytes` (default
    `CHUNK_BYTES`); `n_keys` defaults to `m` (the in-batch loss)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    n_keys = m if n_keys is None else n_keys
    return max(1, min(m, chunk_bytes // (4 * n_keys)))


class _ChunkedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, temperature: float, symmetric: bool, chunk_rows: int, offset: int
    ) -> Tensor:
        m, n = q.shape[0], k.shape[0]
        inv_tau = 1.0 / temperature
        lse_row = torch.empty(m, dtype=q.dtype, device=q.device)
        col_max = torch.full((n,), -math.inf, dtype=q.dtype, device=q.device)
        col_sum = torch.zeros(n, dtype=q.dtype, device=q.device)
        for r0 in range(0, m, chunk_rows):
            logits = (q[r0 : r0 + chunk_rows] @ k.T) * inv_tau
            lse_row[r0 : r0 + chunk_rows] = torch.logsumexp(logits, dim=1)
            if symmetric:  # online log-sum-exp down the columns, one chunk of rows at a time
                new_max = torch.maximum(col_max, logits.amax(dim=0))
                col_sum = col_sum * torch.exp(col_max - new_max) + torch.exp(logits - new_max).sum(dim=0)
                col_max = new_max
        positive = (q * k[offset : offset + m]).sum(dim=1) * inv_tau
        loss = (lse_row - positive).mean()
        lse_col = lse_row.new_empty(0)
        if symmetric:
            lse_col = col_max + torch.log(col_sum)
            loss = 0.5 * (loss + (lse_col - positive).mean())
        ctx.save_for_backward(q, k, lse_row, lse_col)
        ctx.settings = (inv_tau, symmetric, chunk_rows, offset)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, lse_row, lse_col = ctx.saved_tensors
        inv_tau, symmetric, chunk_rows, offset = ctx.settings
        m = q.shape[0]
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq = torch.empty_like(q) if need_q else None
        dk = torch.zeros_like(k) if need_k else None
        for r0 in range(0, m, chunk_rows):
            rows = slice(r0, r0 + chunk_rows)
            logits = (q[rows] @ k.T) * inv_tau
            g = torch.exp(logits - lse_row[rows, None])
            if symmetric:
                g = 0.5 * (g + torch.exp(logits - lse_col[None, :]))
            if need_q:
                dq[rows] = g @ k
            if need_k:
                dk += g.T @ q[rows]
        scale = grad * inv_tau / m
        if need_q:
            dq = (dq - k[offset : offset + m]) * scale
        if need_k:
            dk[offset : offset + m] -= q
            dk = dk * scale
        return dq, dk, None, None, None, None


def nt_xent_batch_chunked(
    q: Tensor,
    k: Tensor,
    temperature: float,
    symmetric: bool,
    chunk_rows: int | None = None,
    *,
    positive_offset: int = 0,
) -> Tensor:
    """NT-Xent of normalised (M, D) queries q against normalised (N, D) keys k, differentiable in both.

    Every key is a candidate of every query; query i's positive is k[positive_offset + i], so N >=
    positive_offset + M (N = M, offset 0: the in-batch loss). symmetric needs that square case. `chunk_rows`
    default: `chunk_rows_for(M, n_keys=N)`.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must be (M, D) and (N, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    m, n = q.shape[0], k.shape[0]
    if not 0 <= positive_offset <= n - m:
        raise ValueError(f"the positives k[{positive_offset} : {positive_offset + m}] are not all among {n} keys")
    if symmetric and (n != m or positive_offset):
        raise ValueError(f"symmetric NT-Xent needs one key per query at the same row, got {m} queries, {n} keys, "
                         f"positive_offset {positive_offset}")
    rows = chunk_rows if chunk_rows is not None else chunk_rows_for(m, n_keys=n)
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {rows}")
    return _ChunkedInfoNCE.apply(q, k, float(temperature), bool(symmetric), int(rows), int(positive_offset))
