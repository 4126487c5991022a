"""Representation-alignment losses between projected SiT tokens and frozen-encoder patch features.

Both take (B, T, D) tensors — or lists of them, one per encoder, which are averaged. Normalisation and
reduction always run in fp32, whatever the autocast dtype (half-precision normalisation is a known source
of fp16 NaNs in the reference loop).

- ``repa_cosine_loss``: REPA's −cos per token, mean over tokens, batch and encoders.
- ``nt_xent_loss``: token-level InfoNCE with in-batch negatives (the objective the ERW paper states).

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

from erw_fast.kernels._utils import check_temperature

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


def _info_nce_rows(q: torch.Tensor, k: torch.Tensor, temperature: float, negatives: str) -> torch.Tensor:
    """Per-query loss logsumexp_j s_ij − s_ii with s = q·kᵀ/τ over the candidate set (materialised)."""
    if negatives == "batch":  # every token of every image in the local batch
        qf, kf = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])
        logits = qf @ kf.T / temperature  # (M, M)
    else:  # same token position in every image: (T, B, B) groups
        logits = q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) / temperature
    positives = logits.diagonal(dim1=-2, dim2=-1)
    return torch.logsumexp(logits, dim=-1) - positives


# Above this many bytes of fp32 batch-negative logits the PyTorch backend builds them in row chunks instead
# (``nt_xent_chunked``): M = 8192 tokens (32 images of 256) is exactly this, M = 65536 would need 17 GB.
MATERIALISE_LIMIT_BYTES = 256 * 2**20


def nt_xent_torch(
    proj: torch.Tensor, target: torch.Tensor, temperature: float, negatives: str, symmetric: bool
) -> torch.Tensor:
    with _fp32_region(proj):
        q = F.normalize(proj.float(), dim=-1)
        k = F.normalize(target.float(), dim=-1)
        m = q.shape[0] * q.shape[1]
        if negatives == "batch" and 4 * m * m > MATERIALISE_LIMIT_BYTES:
            from erw_fast.objectives.nt_xent_chunked import nt_xent_batch_chunked

            return nt_xent_batch_chunked(q.reshape(m, -1), k.reshape(m, -1), temperature, symmetric)
        loss = _info_nce_rows(q, k, temperature, negatives).mean()
        if symmetric:
            loss = 0.5 * (loss + _info_nce_rows(k, q, temperature, negatives).mean())
        return loss


def nt_xent_loss(
    proj: TensorOrList,
    target: TensorOrList,
    temperature: float = 0.1,
    negatives: str = "batch",
    symmetric: bool = False,
    backend: str = "torch",
) -> torch.Tensor:
    """Token-level NT-Xent (InfoNCE) with in-batch negatives.

    Query i = the L2-normalised projected SiT token, its positive = the normalised encoder feature of the same
    (image, token). ``negatives="batch"``: candidates are all B·T tokens of the local batch;
    ``"position"``: the same token position in the B images. Loss = mean_i [logsumexp_j s_ij − s_ii] with
    s_ij = q_i·k_j/τ; ``symmetric`` averages it with the loss with q and k swapped.
    """
    check_temperature(temperature)
    if negatives not in NEGATIVE_SETS:
        raise ValueError(f"unknown negatives {negatives!r}; choose one of {NEGATIVE_SETS}")
    pairs = _pairs(proj, target)
    kind = resolve_alignment_backend(backend, pairs[0][0])
    if kind == "triton":
        from erw_fast.kernels.nt_xent import nt_xent_triton

        losses = [nt_xent_triton(p, t, temperature, negatives, symmetric) for p, t in pairs]
    else:
        losses = [nt_xent_torch(p, t, temperature, negatives, symmetric) for p, t in pairs]
    return torch.stack(losses).mean()
