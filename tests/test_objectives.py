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
