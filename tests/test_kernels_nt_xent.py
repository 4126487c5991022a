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


# ---- local queries against a larger key set (global negatives): keys=, key_offset= ---------------------------


def reference_key_set(proj, keys, key_offset, temperature, negatives):
    """Independent float64 loss of (B, T, D) queries against (B_k, T, D) keys, one token position at a time: query
    (b, n)'s candidates are every key ("batch") or keys[:, n] ("position"), its positive keys[key_offset + b, n]."""
    b, t, d = proj.shape
    q = F.normalize(proj.double(), dim=-1, eps=1e-12)
    k = F.normalize(keys.double(), dim=-1, eps=1e-12)
    images = torch.arange(b, device=q.device)
    losses = []
    for n in range(t):
        if negatives == "position":
            logits = q[:, n] @ k[:, n].T / temperature  # (B, B_k)
            positive = logits[images, key_offset + images]
        else:
            logits = q[:, n] @ k.reshape(-1, d).T / temperature  # (B, B_k * T), key (j, m) at column j * T + m
            positive = logits[images, (key_offset + images) * t + n]
        losses.append(torch.logsumexp(logits, dim=-1) - positive)
    return torch.cat(losses).mean()


def make_key_inputs(b, b_keys, t, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(b, t, d, generator=gen, device="cpu").to(DEVICE, dtype).requires_grad_()
    keys = torch.randn(b_keys, t, d, generator=gen, device="cpu").to(DEVICE, dtype)
    return proj, keys


def check_key_set(shape, dtype, negatives, key_offset, path, temperature=0.1, seed=0):
    """One of the three ways a key set reaches the kernels, against float64:
    "one pass" (training: d proj from `nt_xent_one_pass`), "two pass" (`nt_xent_fwd` with `nt_xent_bwd` for d proj),
    "forward" (no autograd: `nt_xent_triton` takes `nt_xent_fwd`)."""
    b, b_keys, t, d = shape
    proj, keys = make_key_inputs(b, b_keys, t, d, dtype, seed)
    calls = []
    real_one_pass, real_fwd = nt_xent_module.nt_xent_one_pass, nt_xent_module.nt_xent_fwd
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nt_xent_module, "nt_xent_one_pass", lambda *a: calls.append("one pass") or real_one_pass(*a))
        patch.setattr(nt_xent_module, "nt_xent_fwd", lambda *a: calls.append("two pass") or real_fwd(*a))
        if path == "two pass":
            loss = nt_xent_fwd(proj, keys, temperature, negatives == "position", False, "ieee", key_offset)[0]
        else:
            with torch.set_grad_enabled(path == "one pass"):
                loss = nt_xent_triton(proj, None, temperature, negatives, keys=keys, key_offset=key_offset,
                                      input_precision="ieee")
            assert calls == ["one pass" if path == "one pass" else "two pass"]
    proj64 = proj.detach().double().requires_grad_()
    ref = reference_key_set(proj64, keys.detach(), key_offset, temperature, negatives)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref, REL_TOL[dtype], "loss")
    if path != "forward":
        (3.0 * loss).backward()  # an upstream gradient other than 1
        (3.0 * ref).backward()
        assert proj.grad.dtype == dtype and keys.grad is None
        assert_close(proj.grad, proj64.grad, REL_TOL[dtype], "d proj")


# B = 2 local images against B_k = 5: the positives at key images 0-1 or 3-4 (the last ones: no key after them).
@pytest.mark.parametrize("path", ["one pass", "two pass", "forward"])
@pytest.mark.parametrize("key_offset", [0, 3])
@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize(("t", "d"), [(4, 32), (16, 48)], ids=["T4D32", "T16D48"])
def test_key_set_matches_reference(t, d, negatives, key_offset, path):
    check_key_set((2, 5, t, d), torch.float32, negatives, key_offset, path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["one pass", "two pass"])
@pytest.mark.parametrize("negatives", ["batch", "position"])
def test_key_set_16bit(dtype, negatives, path):
    check_key_set((2, 5, 8, 48), dtype, negatives, 3, path, seed=1)


@pytest.mark.parametrize("path", ["one pass", "two pass"])
@pytest.mark.parametrize(
    ("negatives", "shape", "key_offset"),
    # batch: 32 queries (2 blocks of 16) against 80 keys (5 blocks: splits of 2, 2, 1); position: 3 queries per
    # position against 37 keys (3 blocks: splits of 2, 1), D = 40 = 16 + 16 + 8.
    [("batch", (2, 5, 16, 40), 3), ("position", (3, 37, 2, 40), 20)],
    ids=["batch", "position"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_set_small_tiles_and_key_splits(monkeypatch, dtype, negatives, shape, key_offset, path):
    splits_seen = split_keys_in_pairs_of_16_wide_blocks(monkeypatch)
    check_key_set(shape, dtype, negatives, key_offset, path, temperature=0.05)
    assert max(splits_seen) >= 2


def test_key_set_gpu_default_tiles(monkeypatch):
    # A GPU launch's tiles and split plan; 100 queries against 350 keys of D = 200: ragged everywhere.
    use_gpu_default_tiles(monkeypatch)
    check_key_set((2, 7, 50, 200), torch.float32, "batch", 4, "one pass")


@pytest.mark.parametrize("negatives", ["batch", "position"])
def test_key_set_equal_to_the_local_batch_is_the_in_batch_loss(negatives):
    # keys = target (B_k = B, offset 0) is the square problem: the same launches, so the same bits.
    proj, target = make_inputs((3, 7, 32), torch.float32)
    target = target.detach()
    square = nt_xent_triton(proj, target, 0.2, negatives, input_precision="ieee")
    (grad_square,) = torch.autograd.grad(square, proj)
    keyed = nt_xent_triton(proj, None, 0.2, negatives, keys=target, input_precision="ieee")
    (grad_keyed,) = torch.autograd.grad(keyed, proj)
    assert torch.equal(square, keyed) and torch.equal(grad_square, grad_keyed)


@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("n_micro", [2, 4])
def test_micro_batches_against_the_whole_batch_make_the_whole_batch_loss(negatives, n_micro):
    # What global negatives rest on: a batch of 4 images split into n micro-batches of queries, each against the
    # keys of all 4 at its offset. sum_m loss_m / n is the whole batch's in-batch loss, and the proj gradients of
    # the loss_m / n (each micro-batch's rows of the one leaf) are the whole batch's proj gradient.
    proj, target = make_inputs((4, 8, 32), torch.float32, seed=5)
    target = target.detach()
    full = nt_xent_triton(proj, target, 0.1, negatives, input_precision="ieee")
    (grad_full,) = torch.autograd.grad(full, proj)
    b = 4 // n_micro
    micro = [nt_xent_triton(proj[i * b : (i + 1) * b], None, 0.1, negatives, keys=target, key_offset=i * b,
                            input_precision="ieee") for i in range(n_micro)]  # fmt: skip
    accumulated = sum(loss / n_micro for loss in micro)
    (grad_micro,) = torch.autograd.grad(accumulated, proj)
    assert_close(accumulated, full, 1e-6, "sum_m loss_m / n vs the whole batch's loss")
    assert_close(grad_micro, grad_full, 1e-6, "d proj")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(symmetric=True), ValueError, "symmetric NT-Xent takes the local batch's keys"),
        (dict(key_offset=4), ValueError, r"keys \(5, 4, 8\) must be \(B_k, T, D\) = \(>= key_offset \+ 2, 4, 8\)"),
        (dict(key_offset=-1), ValueError, "key_offset -1"),
        (dict(keys_shape=(5, 3, 8)), ValueError, r"must be \(B_k, T, D\)"),
        (dict(keys_grad=True), ValueError, "keys= must be constants"),
        (dict(target=True), ValueError, "not both"),
    ],
)
def test_key_set_refuses(kwargs, error, match):
    proj, _ = make_key_inputs(2, 5, 4, 8, torch.float32)
    keys = torch.randn(kwargs.pop("keys_shape", (5, 4, 8)), device=DEVICE)
    keys.requires_grad_(kwargs.pop("keys_grad", False))
    target = keys[:2] if kwargs.pop("target", False) else None
    with pytest.raises(error, match=match):
        nt_xent_triton(proj, target, keys=keys, **kwargs)


def test_key_set_ops_refuse_a_key_gradient_and_a_symmetric_loss():
    proj, keys = make_key_inputs(2, 5, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="symmetric NT-Xent takes the local batch's keys"):
        nt_xent_fwd(proj.detach(), keys, 0.1, False, True, "ieee", 1)
    loss, *stats = nt_xent_fwd(proj.detach(), keys, 0.1, False, False, "ieee", 1)
    with pytest.raises(ValueError, match="no gradient for a larger key set"):
        nt_xent_bwd(torch.tensor(1.0), proj.detach(), keys, *stats, 0.1, False, False, "ieee", True, True, 1)
    with pytest.raises(ValueError, match="NT-Xent needs the keys"):
        nt_xent_triton(proj)
    with pytest.raises(ValueError, match="key_offset"):
        nt_xent_triton(proj, keys[:2], key_offset=1)


@pytest.mark.parametrize("position", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_key_set_opcheck(position):
    proj, keys = make_key_inputs(2, 5, 4, 32, torch.float32)
    torch.library.opcheck(nt_xent_fwd, (proj, keys, 0.1, position, False, "ieee", 3))
    torch.library.opcheck(nt_xent_module.nt_xent_one_pass, (proj, keys, 0.1, position, "ieee", 3))


def test_key_set_torch_compile_fullgraph():
    torch._dynamo.reset()
    proj, keys = make_key_inputs(2, 5, 4, 32, torch.float32)

    def objective(p, k):
        return (nt_xent_triton(p[:1], None, 0.1, "batch", keys=k, key_offset=2)
                + nt_xent_triton(p, None, 0.2, "position", keys=k, key_offset=3))

    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    loss = compiled(proj, keys)
    (grad,) = torch.autograd.grad(loss, proj)
    eager = objective(proj, keys)
    (grad_eager,) = torch.autograd.grad(eager, proj)
    assert_close(loss, eager, 1e-6, "loss")
    assert_close(grad, grad_eager, 1e-6, "d proj")


@pytest.mark.parametrize("negatives", ["batch", pytest.param("position", marks=pytest.mark.slow)])
def test_reg_token_count(negatives):
    """REG aligns 1 + 256 tokens (the teacher's CLS, then 16 x 16 patches): T = 257 is a multiple of no tile, so
    the last query and key blocks of every image are ragged."""
    check_against_reference((2, 257, 24), torch.float32, 0.1, negatives, False, seed=257)
