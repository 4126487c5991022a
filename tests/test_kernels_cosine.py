"""Fused cosine alignment kernel vs float64 references (REPA's per-sample loop and a vectorised one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _kernel_helpers import DEVICE, REL_TOL, assert_close, on_kernel_device, poison_allocations
from erw_fast.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton with CUDA or TRITON_INTERPRET=1")

if triton_available():
    from erw_fast.kernels import cosine as cosine_module
    from erw_fast.kernels.cosine import cosine_align_bwd, cosine_align_fwd, cosine_alignment_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_allocations(monkeypatch)


@pytest.fixture(autouse=True)
def _on_kernel_device():
    with on_kernel_device():
        yield


def reference_cosine(proj, target):
    """REPA's projection loss for one projector, in float64, written as its per-sample loop."""
    loss = 0.0
    for z_j, z_tilde_j in zip(proj.double(), target.double(), strict=True):
        z_j = F.normalize(z_j, dim=-1, eps=1e-12)
        z_tilde_j = F.normalize(z_tilde_j, dim=-1, eps=1e-12)
        loss = loss + (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    return loss / proj.shape[0]


def check_against_reference(shape, dtype, seed=0, zero_rows=()):
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(shape, generator=gen, device="cpu").to(DEVICE, dtype)
    target = torch.randn(shape, generator=gen, device="cpu").to(DEVICE, dtype)
    for tensor, (b, t) in zip((proj, target), zero_rows, strict=False):
        tensor[b, t] = 0.0
    proj.requires_grad_()
    target.requires_grad_()
    loss = cosine_alignment_triton(proj, target)
    loss.backward()

    proj64 = proj.detach().double().requires_grad_()
    target64 = target.detach().double().requires_grad_()
    ref = reference_cosine(proj64, target64)
    ref.backward()

    rel = REL_TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert proj.grad.dtype == dtype and target.grad.dtype == dtype
    # The loss is a mean of cosines in [-1, 1] and can sit near 0; compare it on the cosine scale.
    assert_close(loss, ref, 0.0, "loss", atol=rel)
    assert_close(proj.grad, proj64.grad, rel, "d proj")
    assert_close(target.grad, target64.grad, rel, "d target")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 33), (2, 5, 768), (2, 3, 1536), (4, 9, 1280)], ids=str)
def test_matches_reference(dtype, shape):
    check_against_reference(shape, dtype)


def test_many_row_blocks_and_feature_chunks(monkeypatch):
    # Force tiny tiles: ragged last row block (37 rows / 8) and feature chunk (40 / 16).
    monkeypatch.setattr(cosine_module, "row_launch_config", lambda n, d: (8, 16, 4))
    check_against_reference((37, 1, 40), torch.float32)


def test_zero_vector_rows_follow_f_normalize():
    # Norm 0 < eps: F.normalize divides by eps and passes no gradient through the norm.
    check_against_reference((2, 5, 24), torch.float32, zero_rows=((0, 1), (1, 3)))


def test_vectorised_reference_agrees():
    # The kernel equals the vectorised form the benchmark compares against, too.
    proj, target = torch.randn(2, 2, 6, 16).unbind(0)
    vectorised = -F.cosine_similarity(proj.double(), target.double(), dim=-1, eps=1e-12).mean()
    assert_close(cosine_alignment_triton(proj, target), vectorised, 0.0, "loss", atol=1e-6)


def test_internal_ops_write_every_element():
    proj, target = torch.randn(2, 3, 11, 40).unbind(0)
    stats = cosine_align_fwd(proj, target)
    assert all(torch.isfinite(s).all() for s in stats)
    grads = cosine_align_bwd(torch.tensor(1.0), proj, target, *stats[1:])
    assert all(g.shape == proj.shape and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("proj_shape", "target_shape"), [((2, 3, 8), (2, 4, 8)), ((2, 3, 8), (6, 8))])
def test_rejects_bad_shapes(proj_shape, target_shape):
    with pytest.raises(ValueError, match=r"proj \(.*\) and target \(.*\)"):
        cosine_alignment_triton(torch.randn(proj_shape), torch.randn(target_shape))


def test_opcheck():
    proj, target = torch.randn(2, 2, 5, 32).unbind(0)
    torch.library.opcheck(cosine_align_fwd, (proj.requires_grad_(), target.requires_grad_()))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    proj, target = (t.requires_grad_() for t in torch.randn(2, 2, 5, 32).unbind(0))
    compiled = torch.compile(cosine_alignment_triton, fullgraph=True, backend="aot_eager")
    compiled(proj, target).backward()
    grads = proj.grad.clone(), target.grad.clone()
    proj.grad = target.grad = None
    cosine_alignment_triton(proj, target).backward()
    assert_close(grads[0], proj.grad, 1e-6, "d proj")
    assert_close(grads[1], target.grad, 1e-6, "d target")


def test_reg_token_count():
    """REG aligns 1 + 256 tokens (the teacher's CLS, then 16 x 16 patches): T = 257 is a multiple of no tile."""
    check_against_reference((2, 257, 40), torch.float32, seed=257)
