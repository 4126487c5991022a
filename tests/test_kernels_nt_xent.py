"""Fused NT-Xent Triton kernel vs a float64 brute-force reference (materialised logits + logsumexp).

Without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest), so shapes stay small; the large
feature dims (768-1536) use only a handful of tokens. Every buffer the op allocates starts as NaN.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from _kernel_helpers import DEVICE, REL_TOL, assert_close, on_kernel_device, poison_allocations
from erw_fast.kernels import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs Triton with CUDA or TRITON_INTERPRET=1")

if triton_available():
    import triton
    from erw_fast.kernels import _utils
    from erw_fast.kernels import nt_xent as nt_xent_module
    from erw_fast.kernels.nt_xent import nt_xent_bwd, nt_xent_fwd, nt_xent_triton
    from erw_fast.kernels.tiles import LogitTiles, default_tiles, plan_key_splits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_allocations(monkeypatch)


@pytest.fixture(autouse=True)
def _on_kernel_device():
    with on_kernel_device():
        yield


def reference_nt_xent(proj, target, temperature, negatives, symmetric):
    """Independent float64 NT-Xent: build every logit, take logsumexp over the candidate axis."""
    b, t, d = proj.shape
    q = F.normalize(proj.double(), dim=-1, eps=1e-12)
    k = F.normalize(target.double(), dim=-1, eps=1e-12)
    if negatives == "position":  # one (B x B) logit matrix per token position
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    else:  # a single (BT x BT) matrix
        q, k = q.reshape(1, b * t, d), k.reshape(1, b * t, d)
    logits = q @ k.transpose(-1, -2) / temperature
    positive = torch.diagonal(logits, dim1=-2, dim2=-1)
    loss = (torch.logsumexp(logits, dim=-1) - positive).mean()
    if symmetric:
        loss = 0.5 * (loss + (torch.logsumexp(logits, dim=-2) - positive).mean())
    return loss


def split_keys_in_pairs_of_16_wide_blocks(monkeypatch) -> list[int]:
    """16-wide tiles and 2 key blocks per split, as on a GPU with many SMs and few query blocks; returns the
    split counts the launches used."""
    splits_seen = []

    def forced_splits(programs, key_blocks, device, bytes_per_split=0):
        splits_seen.append(triton.cdiv(key_blocks, 2))
        return splits_seen[-1]

    monkeypatch.setattr(nt_xent_module, "logit_tiles", lambda *args: LogitTiles(16, 16, 16, 4, 1))
    monkeypatch.setattr(nt_xent_module, "key_splits", forced_splits)
    return splits_seen


def use_gpu_default_tiles(monkeypatch) -> None:
    """The tiles and the key-split plan a launch on a 132-SM GPU would use (not the interpreter's)."""
    monkeypatch.setattr(nt_xent_module, "logit_tiles", lambda kernel, g, d, dt, dev: default_tiles(kernel, g, d, dt))
    monkeypatch.setattr(
        nt_xent_module, "key_splits", lambda programs, blocks, device, nbytes=0: plan_key_splits(programs, blocks, 132)
    )


def make_inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(shape, generator=gen, device="cpu").to(DEVICE, dtype).requires_grad_()
    target = torch.randn(shape, generator=gen, device="cpu").to(DEVICE, dtype).requires_grad_()
    return proj, target


def check_against_reference(shape, dtype, temperature, negatives, symmetric, seed=0, atol=1e-12):
    proj, target = make_inputs(shape, dtype, seed)
    loss = nt_xent_triton(proj, target, temperature, negatives, symmetric, input_precision="ieee")
    loss.backward()

    # The reference sees exactly the (possibly 16-bit-rounded) values the kernel saw, in float64.
    proj64 = proj.detach().double().requires_grad_()
    target64 = target.detach().double().requires_grad_()
    ref = reference_nt_xent(proj64, target64, temperature, negatives, symmetric)
    ref.backward()

    rel = REL_TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert proj.grad.dtype == dtype and target.grad.dtype == dtype
    assert_close(loss, ref, rel, "loss", atol)
    assert_close(proj.grad, proj64.grad, rel, "d proj", atol)
    assert_close(target.grad, target64.grad, rel, "d target", atol)


# M = 70 rows: two 64-row tiles, the second mostly masked; D = 48: one 64-wide feature chunk, masked.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["onesided", "symmetric"])
def test_matches_reference(dtype, negatives, symmetric):
    check_against_reference((5, 14, 48), dtype, 0.1, negatives, symmetric)


@pytest.mark.parametrize("d", [768, *(pytest.param(d, marks=pytest.mark.slow) for d in (1024, 1280, 1536))])
@pytest.mark.parametrize("negatives", ["batch", "position"])
def test_encoder_feature_dims(d, negatives):
    check_against_reference((3, 6, d), torch.float32, 0.1, negatives, True, seed=d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_encoder_feature_dim_16bit(dtype):
    check_against_reference((3, 6, 1280), dtype, 0.1, "batch", True)


@pytest.mark.parametrize("temperature", [0.01, 10.0])
@pytest.mark.parametrize("negatives", ["batch", "position"])
def test_temperature_extremes(temperature, negatives):
    check_against_reference((4, 9, 32), torch.float32, temperature, negatives, True)


@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["onesided", "symmetric"])
def test_single_token(negatives, symmetric):
    # M = 1: the only candidate is the positive, so the loss and both gradients are 0 (up to fp32 rounding
    # of lse - s with s = 1/tau = 10, hence an absolute tolerance).
    check_against_reference((1, 1, 32), torch.float32, 0.1, negatives, symmetric, atol=1e-5)


@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["onesided", "symmetric"])
def test_many_small_tiles(monkeypatch, negatives, symmetric):
    # 16-wide tiles: several query and key blocks per group (the backward's read-modify-write over key
    # blocks), ragged last blocks in every dimension (74 rows, 37 per position group, D = 40 = 16+16+8).
    monkeypatch.setattr(nt_xent_module, "logit_tiles", lambda *args: LogitTiles(16, 16, 16, 4, 1))
    check_against_reference((37, 2, 40), torch.float32, 0.1, negatives, symmetric)


@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["onesided", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
def test_key_splits(monkeypatch, negatives, symmetric, dtype):
    # Keys split as on a GPU with many SMs and few query blocks: the forward merges partial max/sum, the
    # backward sums per-split partial gradients. 16-wide tiles over 74 rows (5 key blocks; 3 per
    # position group of 37) with 2 blocks per split leave a ragged last split.
    splits_seen = split_keys_in_pairs_of_16_wide_blocks(monkeypatch)
    check_against_reference((37, 2, 40), dtype, 0.1, negatives, symmetric)
    assert max(splits_seen) >= 2


@pytest.mark.parametrize("dtype", [DTYPES[0], *(pytest.param(t, marks=pytest.mark.slow) for t in DTYPES[1:])], ids=str)
def test_gpu_default_tiles(monkeypatch, dtype):
    # The tiles a GPU launch would use (not the interpreter's), including a split plan for 132 SMs:
    # 150 rows of D = 200 leave ragged tiles in every dimension at 128/64-row tiles and 64/32-wide chunks.
    use_gpu_default_tiles(monkeypatch)
    check_against_reference((3, 50, 200), dtype, 0.1, "batch", True)


def test_zero_vector_rows_follow_f_normalize():
    # A zero token has norm 0 < eps: F.normalize divides by eps and passes no gradient through the norm.
    proj, target = make_inputs((2, 5, 24), torch.float32)
    with torch.no_grad():
        proj[0, 1] = 0.0
        target[1, 3] = 0.0
    loss = nt_xent_triton(proj, target, 0.5, "batch", True, input_precision="ieee")
    loss.backward()
    proj64 = proj.detach().double().requires_grad_()
    target64 = target.detach().double().requires_grad_()
    reference_nt_xent(proj64, target64, 0.5, "batch", True).backward()
    assert_close(proj.grad, proj64.grad, 1e-5, "d proj")
    assert_close(target.grad, target64.grad, 1e-5, "d target")


@pytest.mark.parametrize("frozen", ["target", "proj"])
def test_gradient_for_one_input_only(frozen):
    # REPA's target is frozen encoder output: the key-side backward pass is skipped, the other must hold.
    proj, target = make_inputs((3, 7, 32), torch.float32)
    (target if frozen == "target" else proj).requires_grad_(False)
    nt_xent_triton(proj, target, 0.2, "batch", True, input_precision="ieee").backward()
    proj64 = proj.detach().double().requires_grad_()
    target64 = target.detach().double().requires_grad_()
    reference_nt_xent(proj64, target64, 0.2, "batch", True).backward()
    if frozen == "target":
        assert target.grad is None
        assert_close(proj.grad, proj64.grad, 1e-5, "d proj")
    else:
        assert proj.grad is None
        assert_close(target.grad, target64.grad, 1e-5, "d target")


# ---- the one-pass path: the one-sided loss with d proj (training); REPA/ERW's target is frozen ------------


def check_one_pass(shape, dtype, temperature, negatives, seed=0, atol=1e-12, target_grad=False):
    """The one-pass path against float64, and proof that it ran (and the two-pass forward did not)."""
    calls = []
    real_one_pass, real_fwd = nt_xent_module.nt_xent_one_pass, nt_xent_module.nt_xent_fwd
    proj, target = make_inputs(shape, dtype, seed)
    target.requires_grad_(target_grad)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nt_xent_module, "nt_xent_one_pass", lambda *a: calls.append("one pass") or real_one_pass(*a))
        patch.setattr(nt_xent_module, "nt_xent_fwd", lambda *a: calls.append("two pass") or real_fwd(*a))
        loss = nt_xent_triton(proj, target, temperature, negatives, input_precision="ieee")
    assert calls == ["one pass"]
    (3.0 * loss).backward()  # an upstream gradient other than 1 reaches the saved gradient
    proj64 = proj.detach().double().requires_grad_()
    target64 = target.detach().double().requires_grad_(target_grad)
    ref = reference_nt_xent(proj64, target64, temperature, negatives, False)
    (3.0 * ref).backward()
    assert loss.dtype == torch.float32 and proj.grad.dtype == dtype
    assert_close(loss, ref, REL_TOL[dtype], "loss", atol)
    assert_close(proj.grad, proj64.grad, REL_TOL[dtype], "d proj", atol)
    if target_grad:
        assert target.grad.dtype == dtype
        assert_close(target.grad, target64.grad, REL_TOL[dtype], "d target", atol)
    else:
        assert target.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("target_grad", [False, True], ids=["frozen", "trained"])
def test_one_pass_matches_reference(dtype, negatives, target_grad):
    check_one_pass((5, 14, 48), dtype, 0.1, negatives, target_grad=target_grad)


@pytest.mark.parametrize("d", [768, 1536])
def test_one_pass_encoder_feature_dims(d):
    check_one_pass((3, 6, d), torch.float32, 0.1, "batch", seed=d)


@pytest.mark.parametrize("temperature", [0.01, 10.0])
def test_one_pass_temperature_extremes(temperature):
    # tau = 0.01: the running max jumps by up to 200 between key blocks, so the rescaling of ACC matters.
    check_one_pass((4, 9, 32), torch.float32, temperature, "batch")


def test_one_pass_single_token():
    check_one_pass((1, 1, 32), torch.float32, 0.1, "batch", atol=1e-5)


@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
def test_one_pass_small_tiles_and_key_splits(monkeypatch, negatives, dtype):
    # 16-wide tiles (several key blocks per split: the online rescaling) and forced ragged key splits (the
    # merge weights every split's partial sum by 2^(m_s - m) / L).
    splits_seen = split_keys_in_pairs_of_16_wide_blocks(monkeypatch)
    check_one_pass((37, 2, 40), dtype, 0.05, negatives, target_grad=True)
    assert max(splits_seen) >= 2


@pytest.mark.parametrize("dtype", [DTYPES[0], *(pytest.param(t, marks=pytest.mark.slow) for t in DTYPES[1:])], ids=str)
def test_one_pass_gpu_default_tiles(monkeypatch, dtype):
    use_gpu_default_tiles(monkeypatch)
    check_one_pass((3, 50, 200), dtype, 0.1, "batch", target_grad=True)


def test_one_pass_only_where_it_applies():
    # Symmetric, only the target needing a gradient, or no autograd at all: the two-pass ops. One-sided with
    # d proj (target frozen or not): the one-pass op, with the same loss and gradients as the two-pass ops.
    proj, target = make_inputs((3, 7, 32), torch.float32)
    seen = []
    real = nt_xent_module.nt_xent_one_pass

    def spy(*args):
        seen.append(True)
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nt_xent_module, "nt_xent_one_pass", spy)
        nt_xent_triton(proj, target, 0.2, "batch", True, input_precision="ieee")
        nt_xent_triton(proj.detach(), target, 0.2, "batch", False, input_precision="ieee")
        with torch.no_grad():
            nt_xent_triton(proj, target, 0.2, "batch", False, input_precision="ieee")
        assert seen == []
        one = nt_xent_triton(proj, target, 0.2, "batch", False, input_precision="ieee")
        assert seen == [True]
    grad_one = torch.autograd.grad(one, (proj, target))
    loss, *stats = nt_xent_fwd(proj.detach(), target.detach(), 0.2, False, False, "ieee")
    grad_two = nt_xent_bwd(torch.tensor(1.0), proj.detach(), target.detach(), *stats, 0.2, False, False, "ieee",
                           True, True)
    assert_close(one, loss, 1e-6, "loss")
    assert_close(grad_one[0], grad_two[0], 1e-5, "d proj")
    assert_close(grad_one[1], grad_two[1], 1e-5, "d target")


def test_mixed_and_fp64_inputs_get_grads_in_their_dtype():
    proj = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    nt_xent_triton(proj, target, input_precision="ieee").backward()  # runs in fp32
    assert proj.grad.dtype == torch.float64 and target.grad.dtype == torch.bfloat16
    proj64 = proj.detach().double().requires_grad_()
    reference_nt_xent(proj64, target.detach().double(), 0.1, "batch", False).backward()
    assert_close(proj.grad, proj64.grad, 1e-5, "d proj")


def test_autocast_runs_the_kernels_in_the_autocast_dtype(monkeypatch):
    # Under autocast, bf16 queries and fp32 keys (a LayerNorm'd teacher) reach the kernels as bf16, as a
    # matmul's would, not promoted to fp32; gradients come back in each input's dtype. Outside: promotion.
    seen = []
    real_fwd = nt_xent_module.nt_xent_fwd

    def spy(proj, target, *args):
        seen.append((proj.dtype, target.dtype))
        return real_fwd(proj, target, *args)

    monkeypatch.setattr(nt_xent_module, "nt_xent_fwd", spy)
    proj, target = make_inputs((2, 9, 32), torch.bfloat16, seed=4)
    target32 = target.detach().float().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        mixed = nt_xent_triton(proj, target32, 0.1, "batch", True)
    mixed.backward()
    promoted = nt_xent_triton(proj.detach(), target32.detach(), 0.1, "batch", True, input_precision="ieee")
    assert seen == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]
    assert proj.grad.dtype == torch.bfloat16 and target32.grad.dtype == torch.float32
    assert torch.isfinite(target32.grad).all()
    assert_close(mixed, promoted, REL_TOL[torch.bfloat16], "bf16 under autocast vs fp32 promotion")


@pytest.mark.parametrize("position", [False, True])
def test_internal_ops_write_every_element(position):
    # With poisoned allocation, every statistic and gradient the raw ops return must be finite.
    proj, target = make_inputs((3, 11, 40), torch.float32)
    proj, target = proj.detach(), target.detach()
    loss, lse_row, lse_col, norm_p, norm_t = nt_xent_fwd(proj, target, 0.1, position, True, "ieee")
    assert torch.isnan(_utils.empty((2,), torch.float32, proj.device)).all()  # the poison is active
    for name, out in dict(loss=loss, lse_row=lse_row, lse_col=lse_col, norm_p=norm_p, norm_t=norm_t).items():
        assert torch.isfinite(out).all(), name
    assert lse_row.shape == lse_col.shape == (33,)
    grads = nt_xent_bwd(
        torch.tensor(1.0),
        proj,
        target,
        lse_row,
        lse_col,
        norm_p,
        norm_t,
        0.1,
        position,
        True,
        "ieee",
        True,
        True,
    )
    for grad in grads:
        assert grad.shape == proj.shape and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (dict(temperature=-1.0), "got -1.0"),
        (dict(temperature=float("nan")), "got nan"),
        (dict(negatives="global"), "'global'"),
        (dict(input_precision="tf16"), "'tf16'"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    proj, target = make_inputs((2, 3, 8), torch.float32)
    with pytest.raises(ValueError, match=match):
        nt_xent_triton(proj, target, **kwargs)


@pytest.mark.parametrize(("proj_shape", "target_shape"), [((2, 3, 8), (2, 3, 9)), ((6, 8), (6, 8))])
def test_rejects_bad_shapes(proj_shape, target_shape):
    with pytest.raises(ValueError, match=r"proj \(.*\) and target \(.*\)"):
        nt_xent_triton(torch.randn(proj_shape), torch.randn(target_shape))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
@pytest.mark.multiprocess
def test_cpu_tensors_without_interpreter_fail_clearly():
    code = (
        "import torch\n"
        "from erw_fast.kernels.nt_xent import nt_xent_triton\n"
        "try:\n"
        "    nt_xent_triton(torch.randn(1, 2, 8), torch.randn(1, 2, 8))\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "set TRITON_INTERPRET=1 before" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("position", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_opcheck(position):
    proj, target = make_inputs((2, 5, 32), torch.float32)
    torch.library.opcheck(nt_xent_fwd, (proj, target, 0.1, position, True, "ieee"))
    torch.library.opcheck(nt_xent_fwd, (proj, target, 0.1, position, False, "ieee"))
    torch.library.opcheck(nt_xent_module.nt_xent_one_pass, (proj, target.detach(), 0.1, position, "ieee"))
    torch.library.opcheck(nt_xent_module.nt_xent_one_pass, (proj, target, 0.1, position, "ieee"))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    # fullgraph=True fails on any graph break; the custom ops are opaque nodes with fake implementations.
    torch._dynamo.reset()
    proj, target = make_inputs((2, 5, 32), torch.float32)

    def objective(p, t):
        frozen = t.detach()  # the one-pass op (REPA's frozen teacher) in the same graph
        return (nt_xent_triton(p, t, 0.1, "position", True) + 0.5 * nt_xent_triton(p, t, 0.2, "batch")
                + 0.25 * nt_xent_triton(p, frozen, 0.3, "batch"))

    compiled = torch.compile(objective, fullgraph=True, backend=backend)
    loss = compiled(proj, target)
    loss.backward()
    grads = proj.grad.clone(), target.grad.clone()
    proj.grad = target.grad = None
    eager = objective(proj, target)
    eager.backward()
    assert_close(loss, eager, 1e-6, "loss")
    assert_close(grads[0], proj.grad, 1e-6, "d proj")
    assert_close(grads[1], target.grad, 1e-6, "d target")
