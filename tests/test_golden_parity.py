"""Parity with tensors produced by the reference SiT/REPA implementation (../shared/golden)."""

import json

import pytest
import torch

from erw_fast.models import SiT
from erw_fast.objectives import Interpolant, repa_cosine_loss


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def golden_model(golden_dir):
    config = json.loads((golden_dir / "config.json").read_text())["model"]
    data = torch.load(golden_dir / "sit_forward.pt", weights_only=True)
    model = SiT(**config)
    model.load_state_dict(data["state_dict"], strict=True)  # reference key names, no renaming
    return model.eval(), data, config


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_forward_matches_reference(golden_model, backend):
    model, data, _ = golden_model
    model.set_attention_backend(backend)
    with torch.no_grad():
        v, zs = model(data["x"], data["t"], data["y"])
    assert v.shape == data["v"].shape and len(zs) == 1
    assert _rel_err(v, data["v"]) <= 1e-5
    assert _rel_err(zs[0], data["z0"]) <= 1e-5
    model.set_attention_backend("sdpa")


def test_fresh_model_builds_reference_pos_embed(golden_model):
    _, data, config = golden_model
    fresh = SiT(**config)
    torch.testing.assert_close(fresh.pos_embed.data, data["state_dict"]["pos_embed"], rtol=0, atol=1e-6)
    assert not fresh.pos_embed.requires_grad


def test_hidden_after_encoder_depth_feeds_projector(golden_model):
    model, data, _ = golden_model
    with torch.no_grad():
        hidden = model.hidden_after(data["x"], data["t"], data["y"])
        z = model.projectors[0](hidden)
    assert _rel_err(z, data["z0"]) <= 1e-5


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_matches_reference(golden_dir, path):
    data = torch.load(golden_dir / "interpolant.pt", weights_only=True)
    x_t, target = Interpolant(path).interpolate(data["x0"], data["noise"], data["t"])
    torch.testing.assert_close(x_t, data[f"{path}_xt"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target, data[f"{path}_target"], rtol=1e-6, atol=1e-6)


def test_repa_loss_and_gradient_match_reference(golden_dir):
    data = torch.load(golden_dir / "repa_loss.pt", weights_only=True)
    proj = data["proj0"].clone().requires_grad_(True)
    loss = repa_cosine_loss([proj], [data["enc0"]])
    loss.backward()
    torch.testing.assert_close(loss, data["loss"], rtol=1e-5, atol=1e-7)
    assert _rel_err(proj.grad, data["grad_proj0"]) <= 1e-5


def test_reference_shapes_and_parameter_count(golden_dir):
    from erw_fast.models import build_sit

    reference = json.loads((golden_dir / "reference_state_dict_shapes.json").read_text())
    for name, entry in reference.items():
        with torch.device("meta"):
            model = build_sit(name, z_dims=[768])
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == entry["keys"], name
        assert sum(v.numel() for v in model.state_dict().values()) == entry["num_params"], name
