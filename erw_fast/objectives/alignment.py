"""Representation-alignment losses between projected SiT tokens and frozen-encoder patch features.

Both take (B, T, D) tensors — or lists of them, one per encoder, which are averaged. Normalisation and
reduction always run in fp32, whatever the autocast dtype (half-precision normalisation is a known source
of fp16 NaNs in the reference loop).

- ``repa_cosine_loss``: REPA's −cos per token, mean over tokens, batch and encoders.
- ``nt_xent_loss``: token-level InfoNCE with in-batch negatives (the objective the ERW paper states), or local
  queries against a larger key set (``keys=``, ``key_offset=``: the building block of global negatives).

``backend``: ``"torch"`` (the readable reference below), ``"triton"`` (fused kernels in
``erw_fast.kernels``), ``"auto"`` (Triton for CUDA tensors when Triton imports, else torch).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from erw_fast.kernels._utils import check_key_form, check_temperature

ALIGNMENT_BACKENDS = ("auto", "torch", "triton")
NEGATIVE_SETS = ("batch", "position")

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def _pairs(proj: TensorOrList, target: TensorOrList) -> list[tuple[torch.Tensor, torch.Tensor]]:
    projs = [proj] if isinstance(proj, torch.Tensor) else list(proj)
    targets = [target] if isinstance(target, torch.Tensor) else list(target)
    if len(projs) != len(targets) or not projs:
        raise ValueError(f"need one target per projection, got {len(projs)} projections, {len(targets)} targets")
    for i, (p, t) in enumerate(zip(projs, targets, strict=True)):
        if p.dim() != 3 or p.shape != t.shape:
            raise ValueError(
                f"encoder {i}: projection {tuple(p.shape)} and target {tuple(t.shape)} must both be (B, T, D) "
                "with equal shapes (is the encoder's token count or feature width different from the SiT's?)"
            )
    return list(zip(projs, targets, strict=True))


def _fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=x.device.type, enabled=False)


def triton_kernels_usable(x: torch.Tensor) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under its interpreter (TRITON_INTERPRET=1, used by tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_alignment_backend(backend: str, x: torch.Tensor | None = None) -> str:
    """'auto' → 'triton' for CUDA tensors when the kernels can run, else 'torch'."""
    if backend not in ALIGNMENT_BACKENDS:
        raise ValueError(f"unknown alignment backend {backend!r}; choose one of {ALIGNMENT_BACKENDS}")
    if backend == "auto":
        on_cuda = x.is_cuda if x is not None else torch.cuda.is_available()
        if not on_cuda:
            return "torch"
        return "triton" if importlib.util.find_spec("triton") is not None else "torch"
    if backend == "triton":
        probe = x if x is not None else torch.empty(0)
        if not triton_kernels_usable(probe):
            raise RuntimeError(
                "alignment backend 'triton' was requested but Triton cannot run here "
                "(needs the triton package and CUDA, or TRITON_INTERPRET=1 for the CPU interpreter)"
            )
    return backend


# ---------------------------------------------------------------------------------------------- cosine


def cosine_alignment_torch(proj: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with _fp32_region(proj):
        q = F.normalize(proj.float(), dim=-1)
        k = F.normalize(target.float(), dim=-1)
        return -(q * k).sum(dim=-1).mean()


def repa_cosine_loss(proj: TensorOrList, target: TensorOrList, backend: str = "torch") -> torch.Tensor:
    """−mean cosine similarity per token over tokens, batch and encoders (REPA's projection loss)."""
    pairs = _pairs(proj, target)
    kind = resolve_alignment_backend(backend, pairs[0][0])
    if kind == "triton":
        from erw_fast.kernels.cosine import cosine_alignment_triton as single
    else:
        single = cosine_alignment_torch
    return torch.stack([single(p, t) for p, t in pairs]).mean()


# ---------------------------------------------------------------------------------------------- NT-Xent


def _info_nce_rows(
    q: torch.Tensor, k: torch.Tensor, temperature: float, negatives: str, key_offset: int = 0
) -> torch.Tensor:
    """Per-query loss logsumexp_j s_ij − s_i,pos with s = q·kᵀ/τ over the candidate set (materialised).

    q (B, T, D), k (B_k, T, D): the positive of query (b, n) is k[key_offset + b, n] (B_k = B, offset 0: the
    in-batch loss, positives on the diagonal).
    """
    if negatives == "batch":  # every token of every key image
        qf, kf = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])
        logits = qf @ kf.T / temperature  # (B·T, B_k·T)
        first = key_offset * q.shape[1]  # query row r's positive is key row first + r
    else:  # same token position in every key image: (T, B, B_k) groups
        logits = q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) / temperature
        first = key_offset
    # The positives: the diagonal of the key columns [first, first + queries) (a slice, not diagonal(offset=):
    # torch.compile would specialise on the offset and recompile for every micro-batch's).
    positives = logits.narrow(-1, first, logits.shape[-2]).diagonal(dim1=-2, dim2=-1)
    return torch.logsumexp(logits, dim=-1) - positives


# Above this many bytes of fp32 batch-negative logits the PyTorch backend builds them in row chunks instead
# (``nt_xent_chunked``): M = 8192 tokens (32 images of 256) is exactly this, M = 65536 would need 17 GB.
MATERIALISE_LIMIT_BYTES = 256 * 2**20


def nt_xent_torch(
    proj: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    negatives: str,
    symmetric: bool,
    key_offset: int = 0,
) -> torch.Tensor:
    """NT-Xent of (B, T, D) proj against (B, T, D) target, or against a larger (B_k, T, D) key set holding the
    positives at target[key_offset : key_offset + B] (one-sided); fp32 math."""
    with _fp32_region(proj):
        q = F.normalize(proj.float(), dim=-1)
        k = F.normalize(target.float(), dim=-1)
        m, n = q.shape[0] * q.shape[1], k.shape[0] * k.shape[1]
        if negatives == "batch" and 4 * m * n > MATERIALISE_LIMIT_BYTES:
            from erw_fast.objectives.nt_xent_chunked import nt_xent_batch_chunked

            return nt_xent_batch_chunked(q.reshape(m, -1), k.reshape(n, -1), temperature, symmetric,
                                         positive_offset=key_offset * q.shape[1])
        loss = _info_nce_rows(q, k, temperature, negatives, key_offset).mean()
        if symmetric:
            loss = 0.5 * (loss + _info_nce_rows(k, q, temperature, negatives).mean())
        return loss


def _key_pairs(
    proj: TensorOrList, target: TensorOrList | None, keys: TensorOrList | None, key_offset: int, symmetric: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(queries, keys) per encoder: (proj, target) of one shape, or proj against `keys` with the positives at
    keys[key_offset : key_offset + B]."""
    check_key_form(target is not None, keys is not None, key_offset, symmetric)
    if keys is None:
        return _pairs(proj, target)
    projs = [proj] if isinstance(proj, torch.Tensor) else list(proj)
    key_sets = [keys] if isinstance(keys, torch.Tensor) else list(keys)
    if len(projs) != len(key_sets) or not projs:
        raise ValueError(f"need one key set per projection, got {len(projs)} projections, {len(key_sets)} key sets")
    for i, (p, k) in enumerate(zip(projs, key_sets, strict=True)):
        if p.dim() != 3 or k.dim() != 3 or p.shape[1:] != k.shape[1:] or not 0 <= key_offset <= k.shape[0] - p.shape[0]:
            raise ValueError(
                f"encoder {i}: keys {tuple(k.shape)} must be (B_k, T, D) with B_k >= key_offset + B for projection "
                f"{tuple(p.shape)} = (B, T, D) and key_offset {key_offset}: the positive of query (b, n) is "
                "keys[key_offset + b, n]"
            )
        if torch.is_grad_enabled() and k.requires_grad:
            raise ValueError(f"encoder {i}: keys= must be constants (the frozen teacher's features; detach them): "
                             "no backend computes gradients for a key set")
    return list(zip(projs, key_sets, strict=True))


def nt_xent_loss(
    proj: TensorOrList,
    target: TensorOrList | None = None,
    temperature: float = 0.1,
    negatives: str = "batch",
    symmetric: bool = False,
    backend: str = "torch",
    *,
    keys: TensorOrList | None = None,
    key_offset: int = 0,
) -> torch.Tensor:
    """Token-level NT-Xent (InfoNCE) with in-batch negatives, or against a larger key set.

    Query i = the L2-normalised projected SiT token, its positive = the normalised encoder feature of the same
    (image, token). ``negatives="batch"``: candidates are all B·T tokens of the local batch;
    ``"position"``: the same token position in the B images. Loss = mean_i [logsumexp_j s_ij − s_ii] with
    s_ij = q_i·k_j/τ; ``symmetric`` averages it with the loss with q and k swapped.

    ``keys`` (with ``target=None``): (B_k, T, D) keys per encoder, B_k ≥ key_offset + B — e.g. the teacher
    features of the whole global batch, in which this micro-batch's images are rows key_offset … key_offset + B − 1.
    The positive of query (b, n) is keys[key_offset + b, n]; the candidates are all B_k·T keys (``"batch"``) or the
    B_k keys at position n (``"position"``); the loss is still the mean over the B·T local queries. So for a batch
    split into n equal micro-batches, each run against the whole batch's keys at its own offset, Σ_m loss_m / n is
    the whole batch's in-batch loss, and the proj gradients of the loss_m / n, concatenated, are its gradient.
    One-sided only (symmetric raises ValueError) and the keys get no gradient: keys that require one raise
    ValueError (detach the teacher's features), in every backend.
    """
    check_temperature(temperature)
    if negatives not in NEGATIVE_SETS:
        raise ValueError(f"unknown negatives {negatives!r}; choose one of {NEGATIVE_SETS}")
    pairs = _key_pairs(proj, target, keys, key_offset, symmetric)
    kind = resolve_alignment_backend(backend, pairs[0][0])
    if kind == "triton":
        from erw_fast.kernels.nt_xent import nt_xent_triton

        if keys is None:
            losses = [nt_xent_triton(p, t, temperature, negatives, symmetric) for p, t in pairs]
        else:
            losses = [nt_xent_triton(p, None, temperature, negatives, keys=k, key_offset=key_offset) for p, k in pairs]
    else:
        losses = [nt_xent_torch(p, t, temperature, negatives, symmetric, key_offset) for p, t in pairs]
    return torch.stack(losses).mean()
