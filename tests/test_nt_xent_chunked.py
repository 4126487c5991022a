"""Chunked batch-negative NT-Xent (the PyTorch backend's form for large M) vs a float64 brute force, finite
differences, and the materialised form it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from erw_fast.objectives import alignment
from erw_fast.objectives.nt_xent_chunked import chunk_rows_for, nt_xent_batch_chunked


def brute_force(q, k, temperature, symmetric):
    """Every logit at once, in float64."""
    logits = q.double() @ k.double().T / temperature
    positive = logits.diagonal()
    loss = (torch.logsumexp(logits, dim=1) - positive).mean()
    if symmetric:
        loss = 0.5 * (loss + (torch.logsumexp(logits, dim=0) - positive).mean())
    return loss


@pytest.mark.parametrize("symmetric", [False, True], ids=["onesided", "symmetric"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 37, 100])
def test_matches_brute_force_loss_and_gradients(symmetric, chunk_rows):
    gen = torch.Generator().manual_seed(chunk_rows)
    q = F.normalize(torch.randn(37, 24, generator=gen), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(37, 24, generator=gen), dim=-1).requires_grad_()
    loss = nt_xent_batch_chunked(q, k, 0.1, symmetric, chunk_rows)
    loss.backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = brute_force(q64, k64, 0.1, symmetric)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("symmetric", [False, True], ids=["onesided", "symmetric"])
def test_backward_passes_gradcheck(symmetric):
    # Finite differences in float64 on unnormalised rows (the formula holds for any q, k), ragged chunks.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_batch_chunked(a, b, 0.5, symmetric, 4), (q, k))


def test_frozen_target_gets_no_gradient():
    q = F.normalize(torch.randn(9, 8), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(9, 8), dim=-1)
    nt_xent_batch_chunked(q, k, 0.2, True, 2).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and k.grad is None


def test_torch_backend_switches_to_chunks_above_the_limit(monkeypatch):
    # Same loss and gradients from the materialised form and the chunked one it switches to past the limit.
    torch.manual_seed(0)
    proj = torch.randn(4, 9, 16, requires_grad=True)
    target = torch.randn(4, 9, 16, requires_grad=True)
    results = []
    for limit in (2**40, 64):  # 36 tokens: 5184 bytes of logits, so 64 bytes forces chunks of one row
        monkeypatch.setattr(alignment, "MATERIALISE_LIMIT_BYTES", limit)
        loss = alignment.nt_xent_loss(proj, target, 0.1, "batch", symmetric=True)
        results.append((loss.detach(), *torch.autograd.grad(loss, (proj, target))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert chunk_rows_for(36, 64) == 1 and chunk_rows_for(65536) == 1024


def test_bad_shapes_and_chunks_are_refused():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\)"):
        nt_xent_batch_chunked(torch.randn(3, 4), torch.randn(3, 5), 0.1, False)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        nt_xent_batch_chunked(torch.randn(3, 4), torch.randn(3, 4), 0.1, False, 0)


# ---- a larger key set: query i's positive is key positive_offset + i (global negatives) ---------------------------


def brute_force_key_set(q, k, positive_offset, temperature):
    """Every logit at once, in float64; query i's positive at column positive_offset + i."""
    logits = q.double() @ k.double().T / temperature
    rows = torch.arange(q.shape[0])
    return (torch.logsumexp(logits, dim=1) - logits[rows, positive_offset + rows]).mean()


@pytest.mark.parametrize("positive_offset", [0, 3, 20])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 100])
def test_larger_key_set_matches_brute_force(chunk_rows, positive_offset):
    # 10 queries against 30 keys: the positives at the start, inside, and at the very end of the keys.
    gen = torch.Generator().manual_seed(chunk_rows + positive_offset)
    q = F.normalize(torch.randn(10, 24, generator=gen), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(30, 24, generator=gen), dim=-1).requires_grad_()
    loss = nt_xent_batch_chunked(q, k, 0.1, False, chunk_rows, positive_offset=positive_offset)
    loss.backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = brute_force_key_set(q64, k64, positive_offset, 0.1)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(k.grad.double(), k64.grad, rtol=1e-5, atol=1e-7)


def test_larger_key_set_passes_gradcheck():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(11, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_batch_chunked(a, b, 0.5, False, 2, positive_offset=4), (q, k))


@pytest.mark.parametrize("key_offset", [0, 3])
def test_torch_backend_chunks_a_larger_key_set(monkeypatch, key_offset):
    # 2 local images against 5 (T = 16: 32 queries, 80 keys): materialised, then in chunks of 3 query rows.
    from erw_fast.objectives import nt_xent_chunked

    torch.manual_seed(key_offset)
    proj = torch.randn(2, 16, 32, requires_grad=True)
    keys = torch.randn(5, 16, 32)
    chunk_rows = []
    real = nt_xent_chunked.nt_xent_batch_chunked

    def spy(q, k, *args, **kwargs):
        chunk_rows.append(chunk_rows_for(q.shape[0], n_keys=k.shape[0]))
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(nt_xent_chunked, "nt_xent_batch_chunked", spy)
    results = []
    for limit, chunk_bytes in ((2**40, nt_xent_chunked.CHUNK_BYTES), (64, 4 * 80 * 3)):
        monkeypatch.setattr(alignment, "MATERIALISE_LIMIT_BYTES", limit)
        monkeypatch.setattr(nt_xent_chunked, "CHUNK_BYTES", chunk_bytes)
        loss = alignment.nt_xent_loss(proj, None, 0.1, "batch", keys=keys, key_offset=key_offset)
        results.append((loss.detach(), *torch.autograd.grad(loss, proj)))
    assert chunk_rows == [3]  # only the second run chunked
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    q64 = F.normalize(proj.detach().double(), dim=-1).reshape(32, 32)
    k64 = F.normalize(keys.double(), dim=-1).reshape(80, 32)
    assert results[1][0].item() == pytest.approx(brute_force_key_set(q64, k64, key_offset * 16, 0.1).item(), rel=1e-6)


def test_larger_key_sets_are_checked():
    q, k = torch.randn(4, 8), torch.randn(9, 8)
    with pytest.raises(ValueError, match=r"the positives k\[6 : 10\] are not all among 9 keys"):
        nt_xent_batch_chunked(q, k, 0.1, False, positive_offset=6)
    with pytest.raises(ValueError, match="symmetric NT-Xent needs one key per query"):
        nt_xent_batch_chunked(q, k, 0.1, True)
    assert chunk_rows_for(4, 4 * 9 * 2, n_keys=9) == 2 and chunk_rows_for(8192, n_keys=65536) == 1024
