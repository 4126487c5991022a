"""Alignment losses, λ schedules, time sampling and the phase losses against independent references."""

import math

import pytest
import torch

from erw_fast.models import SiT, build_sit_phase1
from erw_fast.objectives import (
    AlignmentObjective,
    ConstantLambda,
    ERWLambdaSchedule,
    Interpolant,
    diffusion_loss,
    erw_c0_preset,
    legacy_warmup_cosine_loss,
    nt_xent_loss,
    phase1_loss,
    repa_cosine_loss,
)


def brute_force_nt_xent(proj, target, tau, negatives, symmetric):
    """Float64, one query at a time, straight from the definition."""
    B, T, _ = proj.shape
    q = proj.double() / proj.double().norm(dim=-1, keepdim=True)
    k = target.double() / target.double().norm(dim=-1, keepdim=True)

    def one_direction(a, b):
        losses = []
        for i_img in range(B):
            for i_tok in range(T):
                if negatives == "batch":
                    candidates = [(j_img, j_tok) for j_img in range(B) for j_tok in range(T)]
                else:
                    candidates = [(j_img, i_tok) for j_img in range(B)]
                scores = torch.stack([a[i_img, i_tok] @ b[j] / tau for j in candidates])
                positive = a[i_img, i_tok] @ b[i_img, i_tok] / tau
                losses.append(torch.logsumexp(scores, 0) - positive)
        return torch.stack(losses).mean()

    loss = one_direction(q, k)
    return 0.5 * (loss + one_direction(k, q)) if symmetric else loss


@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_brute_force_loss_and_gradients(negatives, symmetric, tau):
    torch.manual_seed(0)
    proj = torch.randn(3, 5, 16, requires_grad=True)
    target = torch.randn(3, 5, 16, requires_grad=True)
    loss = nt_xent_loss(proj, target, temperature=tau, negatives=negatives, symmetric=symmetric)
    d_proj, d_target = torch.autograd.grad(loss, (proj, target))

    p64 = proj.detach().double().requires_grad_(True)
    t64 = target.detach().double().requires_grad_(True)
    ref = brute_force_nt_xent(p64, t64, tau, negatives, symmetric)
    r_proj, r_target = torch.autograd.grad(ref, (p64, t64))
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(d_proj.double(), r_proj, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d_target.double(), r_target, rtol=1e-4, atol=1e-6)


def test_nt_xent_analytic_values():
    # Perfect alignment with orthogonal negatives: loss = log(1 + (n−1)·e^{−1/τ}) per query.
    eye = torch.eye(4).reshape(1, 4, 4)
    tau = 0.2
    expected = math.log(1 + 3 * math.exp(-1 / tau))
    # fp32: logsumexp ≈ 5.02 minus s_ii = 5 cancels, so compare absolutely.
    assert math.isclose(nt_xent_loss(eye, eye, temperature=tau).item(), expected, abs_tol=1e-6)
    # With "position" negatives and B = 1 the only candidate is the positive: loss 0.
    assert nt_xent_loss(eye, torch.randn(1, 4, 4), negatives="position").item() == pytest.approx(0.0, abs=1e-6)


def test_lists_of_encoders_average():
    torch.manual_seed(0)
    p = [torch.randn(2, 4, 8), torch.randn(2, 4, 6)]
    t = [torch.randn(2, 4, 8), torch.randn(2, 4, 6)]
    for fn in (repa_cosine_loss, nt_xent_loss):
        both = fn(p, t)
        expected = (fn(p[0], t[0]) + fn(p[1], t[1])) / 2
        torch.testing.assert_close(both, expected)


def test_cosine_loss_is_vectorised_reference_loop_and_fp32_under_autocast():
    torch.manual_seed(0)
    proj, target = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    # The reference: a Python loop over samples, summing token-mean −cos, divided by encoders × batch.
    ref = sum(-(torch.nn.functional.normalize(a.double(), dim=-1)
                * torch.nn.functional.normalize(b.double(), dim=-1)).sum(-1).mean()
              for a, b in zip(proj, target, strict=True)) / 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = repa_cosine_loss(proj.bfloat16(), target.bfloat16())
    assert loss.dtype == torch.float32
    assert abs(repa_cosine_loss(proj, target).item() - ref.item()) < 1e-6
    assert abs(loss.item() - ref.item()) < 2e-2  # inputs rounded to bf16, math in fp32


def test_alignment_input_errors():
    with pytest.raises(ValueError, match=r"projection \(2, 4, 8\) and target \(2, 5, 8\)"):
        repa_cosine_loss(torch.randn(2, 4, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        nt_xent_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), temperature=0)
    with pytest.raises(ValueError, match="unknown negatives 'global'"):
        nt_xent_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), negatives="global")
    with pytest.raises(ValueError, match="unknown alignment backend 'cuda'"):
        repa_cosine_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), backend="cuda")
    with pytest.raises(ValueError, match="unknown alignment objective 'infonce'"):
        AlignmentObjective(objective="infonce")


def test_erw_lambda_schedule_analytic():
    schedule = ERWLambdaSchedule(c0=6.0, warmup_steps=100_000, total_steps=300_000, half_life=50_000)
    assert schedule(0) == 6.0 and schedule(100_000) == 6.0
    assert schedule(150_000) == pytest.approx(3.0)
    assert schedule(200_000) == pytest.approx(1.5)
    assert schedule(300_000) == pytest.approx(6.0 / 16)
    assert schedule(400_000) == pytest.approx(6.0 / 16)  # clamped at S − W
    assert schedule(125_000) == pytest.approx(6.0 * 2 ** -0.5)
    assert ConstantLambda(0.5)(123) == 0.5
    with pytest.raises(ValueError, match=r"warmup_steps \(10\) must be in \[0, total_steps=10\)"):
        ERWLambdaSchedule(c0=1.0, warmup_steps=10, total_steps=10)


def test_c0_presets_by_model_size():
    assert [erw_c0_preset(n) for n in ("SiT-XL/2", "SiT-L/4", "SiT-B/2", "SiT-S/8")] == [6.0, 3.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown model"):
        erw_c0_preset("DiT-XL/2")


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    uniform = Interpolant("linear").sample_time(n, "uniform", generator=g)
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01
    # Linear path "lognormal": logit(t) = log σ ~ N(0, 1).
    t = Interpolant("linear").sample_time(n, "lognormal", generator=g).double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    # Cosine path: tan(π t / 2) = σ, so log tan(π t / 2) ~ N(0, 1).
    t = Interpolant("cosine").sample_time(n, "lognormal", generator=g).double()
    log_sigma = torch.log(torch.tan(math.pi * t / 2))
    assert abs(log_sigma.mean().item()) < 0.01 and abs(log_sigma.std().item() - 1) < 0.01
    with pytest.raises(ValueError, match="unknown time weighting 'beta'"):
        Interpolant().sample_time(4, "beta")
    with pytest.raises(ValueError, match="unknown path_type 'vp'"):
        Interpolant("vp")


def test_legacy_warmup_loss_reproduces_reference_bug():
    torch.manual_seed(0)
    projs = [torch.randn(4, 6, 8), torch.randn(4, 6, 8)]
    targets = [torch.randn(4, 6, 8), torch.randn(4, 6, 8)]
    # What the released loop computes: per encoder, the last sample's token-mean −cos; summed; / (encoders·B).
    expected = 0.0
    for z, zt in zip(targets, projs, strict=True):
        z_last = torch.nn.functional.normalize(z[-1].double(), dim=-1)
        zt_last = torch.nn.functional.normalize(zt[-1].double(), dim=-1)
        expected += (-(z_last * zt_last).sum(-1)).mean().item()
    expected /= 2 * 4
    assert legacy_warmup_cosine_loss(projs, targets).item() == pytest.approx(expected, abs=1e-6)
    # ...and it is not the correct loss.
    assert abs(repa_cosine_loss(projs, targets).item() - expected) > 1e-3


def tiny(**kw):
    config = dict(input_size=8, hidden_size=64, depth=4, num_heads=4, num_classes=10, z_dims=[32],
                  projector_dim=64, encoder_depth=2)
    config.update(kw)
    return config


def test_phase1_loss_runs_at_t0_on_clean_latents():
    torch.manual_seed(0)
    model = build_sit_phase1("SiT-S/2", 2, **tiny(encoder_depth=None)).eval()
    latents, labels, feats = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), [torch.randn(2, 16, 32)]
    loss = phase1_loss(model, latents, labels, feats, AlignmentObjective("cosine", backend="torch"))
    with torch.no_grad():
        expected = repa_cosine_loss(model(latents, torch.zeros(2), labels), feats)
    torch.testing.assert_close(loss, expected)


def test_diffusion_loss_matches_manual_computation():
    torch.manual_seed(0)
    model = SiT(**tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    latents, labels, feats = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2]), [torch.randn(3, 16, 32)]
    objective = AlignmentObjective("cosine", backend="torch")
    out = diffusion_loss(model, latents, labels, Interpolant("linear"), encoder_features=feats,
                         alignment=objective, alignment_weight=0.5, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.rand(3, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    x_t = (1 - t).view(-1, 1, 1, 1) * latents + t.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        v, zs = model(x_t, t, labels)
    diff = ((v.double() - (noise - latents).double()) ** 2).mean()
    align = repa_cosine_loss(zs, feats)
    assert out.diffusion.item() == pytest.approx(diff.item(), rel=1e-5)
    assert out.alignment.item() == pytest.approx(align.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(diff.item() + 0.5 * align.item(), rel=1e-5)


@pytest.mark.parametrize("negatives", ["batch", "position"])
def test_triton_backend_dispatch_matches_torch_reference(negatives):
    """The public functions route to the fused kernels (interpreted on CPU) with the same semantics."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels' device (interpreter on the CPU)
    proj = torch.randn(2, 9, 24, device=device, requires_grad=True)
    target = torch.randn(2, 9, 24, device=device)
    results = {}
    for backend in ("torch", "triton"):
        loss = nt_xent_loss(proj, target, temperature=0.2, negatives=negatives, symmetric=True, backend=backend)
        cos = repa_cosine_loss(proj, target, backend=backend)
        grads = torch.autograd.grad(loss + cos, proj)[0]
        results[backend] = (loss.detach(), cos.detach(), grads)
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- NT-Xent against a larger key set (keys=, key_offset=): the building block of global negatives ------------

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels' device (CPU: interpreter)


def brute_force_nt_xent_key_set(proj, keys, key_offset, tau, negatives):
    """Float64, one query at a time from the definition: query (b, n) against every key image's tokens ("batch")
    or their token n ("position"), its positive keys[key_offset + b, n]."""
    B, T, _ = proj.shape
    q = proj.double() / proj.double().norm(dim=-1, keepdim=True)
    k = keys.double() / keys.double().norm(dim=-1, keepdim=True)
    losses = []
    for b in range(B):
        for n in range(T):
            if negatives == "batch":
                candidates = [(j, m) for j in range(keys.shape[0]) for m in range(T)]
            else:
                candidates = [(j, n) for j in range(keys.shape[0])]
            scores = torch.stack([q[b, n] @ k[j] / tau for j in candidates])
            losses.append(torch.logsumexp(scores, 0) - q[b, n] @ k[key_offset + b, n] / tau)
    return torch.stack(losses).mean()


def _nt_xent_path(path, monkeypatch):
    """The backend argument for `path`; "chunked" forces the PyTorch backend's row chunks (3 query rows each)."""
    if path == "chunked":
        from erw_fast.objectives import alignment, nt_xent_chunked

        monkeypatch.setattr(alignment, "MATERIALISE_LIMIT_BYTES", 0)
        monkeypatch.setattr(nt_xent_chunked, "chunk_rows_for", lambda m, chunk_bytes=None, n_keys=None: 3)
    return "triton" if path == "triton" else "torch"


@pytest.mark.parametrize("path", ["materialised", "chunked", "triton"])
@pytest.mark.parametrize("key_offset", [0, 3])
@pytest.mark.parametrize("negatives", ["batch", "position"])
def test_nt_xent_key_set_matches_brute_force(monkeypatch, negatives, key_offset, path):
    # 2 local images against 5 key images; the positives at key images 0-1 or 3-4.
    backend = _nt_xent_path(path, monkeypatch)
    gen = torch.Generator().manual_seed(key_offset)
    proj = torch.randn(2, 4, 32, generator=gen).to(KERNEL_DEVICE).requires_grad_()
    keys = torch.randn(5, 4, 32, generator=gen).to(KERNEL_DEVICE)
    loss = nt_xent_loss(proj, None, 0.1, negatives, backend=backend, keys=keys, key_offset=key_offset)
    (d_proj,) = torch.autograd.grad(loss, proj)
    p64 = proj.detach().cpu().double().requires_grad_()
    ref = brute_force_nt_xent_key_set(p64, keys.cpu(), key_offset, 0.1, negatives)
    (r_proj,) = torch.autograd.grad(ref, p64)
    assert loss.dtype == torch.float32 and keys.grad is None
    assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    torch.testing.assert_close(d_proj.cpu().double(), r_proj, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", ["materialised", "chunked", "triton"])
@pytest.mark.parametrize("negatives", ["batch", "position"])
@pytest.mark.parametrize("n_micro", [2, 3])
def test_nt_xent_micro_batches_against_the_whole_batch_make_the_whole_batch_loss(monkeypatch, n_micro, negatives, path):
    # What global negatives rest on. A batch of 6 images split into n micro-batches of queries, each against the
    # whole batch's keys at its offset: sum_m loss_m / n = the whole batch's in-batch loss, and the proj gradients
    # of the loss_m / n (each micro-batch's rows of the one leaf, i.e. concatenated) = the whole batch's gradient.
    backend = _nt_xent_path(path, monkeypatch)
    gen = torch.Generator().manual_seed(n_micro)
    proj = torch.randn(6, 5, 16, generator=gen).to(KERNEL_DEVICE).requires_grad_()
    target = torch.randn(6, 5, 16, generator=gen).to(KERNEL_DEVICE)
    full = nt_xent_loss(proj, target, 0.1, negatives, backend=backend)
    (g_full,) = torch.autograd.grad(full, proj)
    b = 6 // n_micro
    losses = [nt_xent_loss(proj[i * b : (i + 1) * b], None, 0.1, negatives, backend=backend, keys=target,
                           key_offset=i * b) for i in range(n_micro)]  # fmt: skip
    accumulated = sum(loss / n_micro for loss in losses)
    (g_micro,) = torch.autograd.grad(accumulated, proj)
    full64, g_full64 = full.double(), g_full.double()
    assert abs(accumulated.double() - full64).item() <= 1e-6 * abs(full64.item())
    assert (g_micro.double() - g_full64).abs().max().item() <= 1e-6 * g_full64.abs().max().item()


def test_nt_xent_key_set_lists_of_encoders_average():
    torch.manual_seed(0)
    p = [torch.randn(2, 4, 8), torch.randn(2, 4, 6)]
    k = [torch.randn(3, 4, 8), torch.randn(3, 4, 6)]
    both = nt_xent_loss(p, keys=k, key_offset=1)
    expected = (nt_xent_loss(p[0], keys=k[0], key_offset=1) + nt_xent_loss(p[1], keys=k[1], key_offset=1)) / 2
    torch.testing.assert_close(both, expected)
    # keys = the local batch (B_k = B, offset 0) is the in-batch loss.
    torch.testing.assert_close(nt_xent_loss(p, keys=[x[:2] for x in k]), nt_xent_loss(p, [x[:2] for x in k]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nt_xent_key_set_errors(backend):
    proj, keys = torch.randn(2, 4, 8, device=KERNEL_DEVICE), torch.randn(5, 4, 8, device=KERNEL_DEVICE)

    def loss(*args, **kwargs):
        return nt_xent_loss(proj, *args, backend=backend, **kwargs)

    with pytest.raises(ValueError, match="symmetric NT-Xent takes the local batch's keys"):
        loss(symmetric=True, keys=keys)
    with pytest.raises(ValueError, match="keys= must be constants"):
        loss(keys=keys.clone().requires_grad_())
    with torch.no_grad():  # no gradient is wanted, so keys that could take one are fine
        assert torch.isfinite(loss(keys=keys.clone().requires_grad_()))
    with pytest.raises(ValueError, match="not both"):
        loss(keys[:2], keys=keys)
    with pytest.raises(ValueError, match="needs the keys"):
        loss()
    with pytest.raises(ValueError, match=r"key_offset \(1\) places the positives inside keys="):
        loss(keys[:2], key_offset=1)
    with pytest.raises(ValueError, match=r"keys \(5, 4, 8\) must be \(B_k, T, D\) with B_k >= key_offset \+ B"):
        loss(keys=keys, key_offset=4)
    with pytest.raises(ValueError, match=r"keys \(5, 3, 8\)"):
        loss(keys=keys[:, :3])
    with pytest.raises(ValueError, match="one key set per projection, got 1 projections, 2 key sets"):
        loss(keys=[keys, keys])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nt_xent_key_offsets_share_one_compiled_graph(backend):
    # Each micro-batch has its own key_offset: torch.compile must not specialise on it (one recompile, when the
    # first offset's static graph meets a second offset, then one dynamic graph for all).
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    proj = torch.randn(8, 4, 16, device=KERNEL_DEVICE, requires_grad=True)
    keys = torch.randn(8, 4, 16, device=KERNEL_DEVICE)

    def loss(p, k, offset):
        return nt_xent_loss(p, None, 0.1, "batch", backend=backend, keys=k, key_offset=offset)

    compiled = torch.compile(loss, fullgraph=True, backend=counter)
    for offset in (0, 2, 4, 6):
        torch.testing.assert_close(compiled(proj[offset : offset + 2], keys, offset),
                                   loss(proj[offset : offset + 2], keys, offset))
    assert counter.frame_count == 2
