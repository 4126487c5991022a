"""Samplers: golden parity with the reference, exact transport of Gaussian data, CFG interval, monitoring grid."""

import json
import math

import pytest
import torch
from torch import nn

import erw_fast.sampling as sampling
from erw_fast.data.demo import toy_decode
from erw_fast.models import SiT
from erw_fast.sampling import (
    euler_maruyama_sampler,
    euler_sampler,
    make_image_grid,
    ode_time_grid,
    sample_grid,
    score_from_velocity,
    sde_time_grid,
)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.to(torch.float64) - b.to(torch.float64)).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def golden(golden_dir):
    config = json.loads((golden_dir / "config.json").read_text())
    model = SiT(**config["model"])
    model.load_state_dict(torch.load(golden_dir / "sit_forward.pt", weights_only=True)["state_dict"], strict=True)
    data = torch.load(golden_dir / "samplers.pt", weights_only=True)
    return model.eval(), data, config["samplers"]


# ------------------------------------------------------------------------------------------------- golden parity


def test_ode_euler_matches_reference(golden):
    model, data, settings = golden
    out = euler_sampler(model, data["latents"], data["y"], **settings["ode_euler"])
    assert out.dtype == torch.float64 and out.shape == data["ode_euler"].shape
    assert _rel_err(out.float(), data["ode_euler"]) <= 1e-5


def test_ode_heun_cfg_matches_reference(golden):
    model, data, settings = golden
    out = euler_sampler(model, data["latents"], data["y"], **settings["ode_heun_cfg"])
    assert _rel_err(out.float(), data["ode_heun_cfg"]) <= 1e-5


def test_sde_cfg_matches_reference_with_recorded_noise(golden):
    model, data, settings = golden
    noises = data["sde_cfg_noises"]
    assert len(noises) == settings["sde_cfg"]["num_steps"] - 1
    out = euler_maruyama_sampler(model, data["latents"], data["y"], noises=noises, **settings["sde_cfg"])
    assert _rel_err(out.float(), data["sde_cfg"]) <= 1e-5
    # The recorded noise is what the generator path draws too: same draws in the same order → same result.
    list_out = euler_maruyama_sampler(model, data["latents"], data["y"], noises=list(noises), **settings["sde_cfg"])
    assert torch.equal(out, list_out)


def test_model_runs_in_its_dtype_while_state_is_float64(golden):
    model, data, _ = golden
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.num_classes = model.num_classes

        def forward(self, x, t, y):
            seen.append((x.dtype, t.dtype))
            return self.inner(x, t, y)

    out = euler_sampler(Spy(), data["latents"], data["y"], num_steps=2, cfg_scale=1.5)
    assert out.dtype == torch.float64
    assert seen == [(torch.float32, torch.float32)] * 2


# ------------------------------------------------------------------------------------------------- analytic model


class GaussianVelocity(nn.Module):
    """Exact velocity E[α′x0 + σ′ε | x_t] for data x0 ~ N(0, s²I): (α·α′·s² + σ·σ′) / (α²s² + σ²) · x."""

    num_classes = 10

    def __init__(self, s: float, path: str) -> None:
        super().__init__()
        self.s, self.path = s, path

    def coefficients(self, t: torch.Tensor):
        t = t.to(torch.float64).reshape(-1, 1, 1, 1)
        if self.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        h = math.pi / 2
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)

    def variance(self, t):
        a, sg, _, _ = self.coefficients(t)
        return a * a * self.s**2 + sg * sg

    def forward(self, x, t, y):
        a, sg, da, dsg = self.coefficients(t)
        v = (a * da * self.s**2 + sg * dsg) / self.variance(t) * x.to(torch.float64)
        return v.to(x.dtype), []


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_score_from_velocity_is_the_gaussian_score(path):
    model = GaussianVelocity(0.6, path)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    for t in (0.05, 0.3, 0.7, 1.0):
        tt = torch.full((5,), t, dtype=torch.float64)
        v, _ = model(x, tt, None)
        expected = -x / model.variance(tt)  # ∇ log N(0, var_t)
        torch.testing.assert_close(score_from_velocity(v, x, tt, path), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(score_from_velocity(v, x, t, path), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_ode_transports_noise_to_scaled_noise(path):
    # dx/dt = v*(x, t) keeps x(t) = sqrt(var_t / var_1)·x(1); var_1 = 1 and var_0 = s², so x(0) = s·x(1).
    s = 0.5
    model = GaussianVelocity(s, path)
    x1 = torch.randn(3, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(3, dtype=torch.long)
    exact = s * x1
    euler = [(euler_sampler(model, x1, y, n, path_type=path) - exact).abs().max().item() for n in (20, 40, 80)]
    heun = [(euler_sampler(model, x1, y, n, heun=True, path_type=path) - exact).abs().max().item()
            for n in (20, 40, 80)]
    for errs, order in ((euler, 1), (heun, 2)):  # error ∝ h^order: halving h divides it by 2^order
        for coarse, fine in zip(errs[:-1], errs[1:], strict=True):
            assert coarse / fine == pytest.approx(2**order, rel=0.15)
    assert euler[-1] < 0.03 and heun[-1] < 1e-3


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_sde_reaches_the_data_distribution(path):
    s = 0.5
    model = GaussianVelocity(s, path)
    x1 = torch.randn(128, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(128, dtype=torch.long)
    gen = torch.Generator().manual_seed(2)
    out = euler_maruyama_sampler(model, x1, y, 200, path_type=path, generator=gen)
    assert out.std().item() == pytest.approx(s, rel=0.03)  # 32k draws: sampling error ≈ 0.4 %
    assert abs(out.mean().item()) < 0.01
    # Same generator seed → the same path; replaying the draws through `noises` too.
    again = euler_maruyama_sampler(model, x1, y, 200, path_type=path, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again)
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(x1.shape, generator=g, dtype=torch.float64) for _ in range(4)]
    replay = euler_maruyama_sampler(model, x1, y, 5, path_type=path, noises=draws)
    assert torch.equal(replay, euler_maruyama_sampler(model, x1, y, 5, path_type=path,
                                                      generator=torch.Generator().manual_seed(3)))


def test_cosine_path_runs_on_sit(golden):
    model, data, _ = golden
    for out in (euler_sampler(model, data["latents"], data["y"], 4, path_type="cosine", cfg_scale=1.5),
                euler_maruyama_sampler(model, data["latents"], data["y"], 4, path_type="cosine", cfg_scale=1.5)):
        assert out.shape == data["latents"].shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------- guidance


class LabelVelocity(nn.Module):
    """v = c[y] (constant per label; row `num_classes` is the null label); records every call's (t, batch)."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.tensor([[1.0], [2.0], [-1.0], [0.25]], dtype=torch.float64)
        self.calls: list[tuple[float, int]] = []

    def forward(self, x, t, y):
        self.calls.append((round(t[0].item(), 6), x.shape[0]))
        return self.table[y].view(-1, 1, 1, 1).expand_as(x).to(x.dtype), []


def test_cfg_applies_only_inside_the_interval_ode():
    model = LabelVelocity()
    x1 = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    scale = 3.0
    out = euler_sampler(model, x1, y, num_steps=10, cfg_scale=scale, guidance_low=0.25, guidance_high=0.65)
    # t_cur = 1.0, 0.9, …, 0.1: guided exactly at 0.6, 0.5, 0.4, 0.3 (one batched forward of 2·B).
    guided_t = {t for t, b in model.calls if b == 4}
    assert guided_t == {0.6, 0.5, 0.4, 0.3}
    assert all(b == 2 for t, b in model.calls if t not in guided_t) and len(model.calls) == 10
    cond, null = model.table[y, 0], model.table[3, 0]
    guided_v = null + scale * (cond - null)
    expected = -(0.1 * (4 * guided_v + 6 * cond))  # x0 = x1 − Σ dt·v with dt = 0.1
    torch.testing.assert_close(out[:, 0, 0, 0], expected, rtol=1e-12, atol=1e-12)


def test_heun_corrector_uses_the_guidance_decision_of_t_cur():
    model = LabelVelocity()
    euler_sampler(model, torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), num_steps=10, heun=True, cfg_scale=2.0,
                  guidance_low=0.0, guidance_high=0.65)
    # Step t_cur = 0.7 is unguided, so its corrector at t_next = 0.6 is too (although 0.6 ≤ 0.65).
    assert (0.6, 2) in model.calls and (0.6, 4) in model.calls
    # Last step: no corrector (it would evaluate t = 0).
    assert all(t > 0 for t, _ in model.calls) and len(model.calls) == 10 + 9


def test_sde_guidance_interval_and_grid():
    model = LabelVelocity()
    y = torch.tensor([0, 1])
    euler_maruyama_sampler(model, torch.zeros(2, 1, 2, 2), y, num_steps=7, cfg_scale=2.2, guidance_high=0.5,
                           generator=torch.Generator().manual_seed(0))
    grid = [1.0, 0.84, 0.68, 0.52, 0.36, 0.2, 0.04]  # linspace(1, 0.04, 7); the last call is the step to 0
    assert [t for t, _ in model.calls] == grid
    assert [b for _, b in model.calls] == [2, 2, 2, 2, 4, 4, 4]
    torch.testing.assert_close(sde_time_grid(7)[:-1], torch.tensor(grid, dtype=torch.float64))
    assert sde_time_grid(7)[-1].item() == 0.0 and ode_time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_bad_arguments_are_rejected(golden):
    model, data, _ = golden
    x, y = data["latents"], data["y"]
    with pytest.raises(ValueError, match="num_steps"):
        euler_sampler(model, x, y, num_steps=0)
    with pytest.raises(ValueError, match="path_type"):
        euler_sampler(model, x, y, path_type="vp")
    with pytest.raises(ValueError, match="cfg_scale"):
        euler_sampler(model, x, y, cfg_scale=0.5)
    with pytest.raises(ValueError, match="noises"):
        euler_maruyama_sampler(model, x, y, num_steps=4, noises=torch.zeros(2, *x.shape))


def test_compile_wraps_the_model_once(golden, monkeypatch):
    model, data, settings = golden
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(sampling, "_COMPILED", sampling.weakref.WeakKeyDictionary())
    for _ in range(2):
        out = euler_sampler(model, data["latents"], data["y"], compile=True, **settings["ode_euler"])
        assert _rel_err(out.float(), data["ode_euler"]) <= 1e-5
    assert compiled == [model]


# ------------------------------------------------------------------------------------------------- monitoring


def test_sample_grid_is_fixed_and_restores_training_mode(golden):
    model, _, _ = golden
    labels = torch.tensor([0, 1, 2, 1000])
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model.train()
    try:
        grid = sample_grid(model, labels, noise, lambda z: toy_decode(z, 64), num_steps=3, nrow=3)
        assert model.training
        again = sample_grid(model, labels, noise, lambda z: toy_decode(z, 64), num_steps=3, nrow=3)
    finally:
        model.eval()
    assert torch.equal(grid, again)
    images = toy_decode(euler_sampler(model, noise, labels, 3).float(), 64)
    assert grid.dtype == torch.uint8 and grid.shape == (2 * 66 + 2, 3 * 66 + 2, 3)
    for k in range(4):  # row-major tiles of 64 px with 2 px padding
        r, c = divmod(k, 3)
        tile = grid[2 + r * 66 : 2 + r * 66 + 64, 2 + c * 66 : 2 + c * 66 + 64]
        assert torch.equal(tile, images[k].permute(1, 2, 0))
    assert grid[:2].eq(0).all() and grid[66 + 2 :, 66 + 2 :].eq(0).all()  # padding and the empty tile


def test_make_image_grid_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        make_image_grid(torch.zeros(2, 3, 4, 4))
