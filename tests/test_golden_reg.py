"""Parity with REG's reference code (../shared/golden/reg): the class-token SiT's forward under REG's key names,
one training step as the trainer runs it (RegPhase, the engine's backward and clipping) from the recorded draws,
the order of the step's draws, and REG's SDE sampler with the joint class-token trajectory.

"≤ 1e-5 relative" = the largest absolute difference over the largest absolute reference value.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from _golden_helpers import RTOL, check_step, rel_err
from torch import nn

from erw_fast.config import load_config
from erw_fast.encoders.teacher import Teacher
from erw_fast.engines import LocalEngine
from erw_fast.models import SiT
from erw_fast.objectives import Interpolant
from erw_fast.phases import RegPhase, plan_phases
from erw_fast.randomness import GlobalBatchRandomness, StepDraw
from erw_fast.runtime import DistEnv
from erw_fast.sampling import euler_maruyama_sampler


@pytest.fixture(scope="module")
def reg(golden_dir):
    root = golden_dir / "reg"
    return json.loads((root / "config.json").read_text()), root


@pytest.fixture(scope="module")
def state_dict(reg):
    return torch.load(reg[1] / "reg_forward.pt", weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_reg_state_dict_loads_strictly_and_the_forward_matches(reg, state_dict, backend):
    cfg, root = reg
    g = torch.load(root / "reg_forward.pt", weights_only=True)
    model = SiT(**cfg["model"], attn_backend=backend)  # REG's constructor keywords, cls_token_dim included
    assert list(model.state_dict()) == list(state_dict)  # REG's keys, in its order
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        v, zs, cls_out = model.eval()(g["x"], g["t"], g["y"], cls_token=g["cls_token"])
    assert rel_err(v, g["v"]) <= RTOL
    assert rel_err(cls_out, g["cls_out"]) <= RTOL
    assert zs[0].shape == (3, 17, 32) and rel_err(zs[0], g["z0"]) <= RTOL  # token 0: the class-token slot
    # The hidden state after encoder_depth blocks, through the projector, is the same z.
    h = model.hidden_after(g["x"], g["t"], g["y"], cls_token=g["cls_token"])
    assert rel_err(model.projectors[0](h), g["z0"]) <= RTOL


def test_fresh_reg_model_has_the_reference_position_table(reg, state_dict):
    model = SiT(**reg[0]["model"])
    assert model.pos_embed.shape == (1, 17, 64) and not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed, state_dict["pos_embed"], rtol=0, atol=1e-6)
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(64))  # the class token's row
    for name in ("final_layer.linear_cls.weight", "final_layer.linear_cls.bias"):  # zero-initialised head
        assert not model.state_dict()[name].any()


def test_a_reg_model_needs_its_class_token_and_a_plain_one_refuses_it(reg, state_dict):
    cfg, root = reg
    g = torch.load(root / "reg_forward.pt", weights_only=True)
    model = SiT(**cfg["model"])
    with pytest.raises(ValueError, match="cls_token="):
        model(g["x"], g["t"], g["y"])
    plain = SiT(**{k: v for k, v in cfg["model"].items() if k != "cls_token_dim"})
    with pytest.raises(ValueError, match="no class token"):
        plain(g["x"], g["t"], g["y"], cls_token=g["cls_token"])
    with pytest.raises(ValueError, match="z_dims"):  # REG's class token is the first encoder's CLS
        SiT(**{**cfg["model"], "cls_token_dim": 16})


# ---------------------------------------------------------------------------------------------- the training step


def _reg_config(cfg: dict, tmp_path):
    m, t = cfg["model"], cfg["train"]
    return load_config(None, [
        "run.device=cpu", "run.mode=reg", f"run.output_dir={tmp_path}", "model.name=SiT-S/2",
        f"model.input_size={m['input_size']}", f"model.patch_size={m['patch_size']}", f"model.depth={m['depth']}",
        f"model.hidden_size={m['hidden_size']}", f"model.num_heads={m['num_heads']}",
        f"model.num_classes={m['num_classes']}", f"model.projector_dim={m['projector_dim']}",
        f"model.class_dropout_prob={m['class_dropout_prob']}", f"model.qk_norm={str(m['qk_norm']).lower()}",
        f"alignment.encoder_depth={m['encoder_depth']}", f"alignment.weight={t['proj_coeff']}",
        f"reg.cls_weight={t['cls']}", f"optim.grad_clip={t['max_grad_norm']}", "encoder.names=[dinov2-vit-b]",
        "encoder.pretrained=false", "train.precision=fp32", "train.global_batch_size=4", "alignment.backend=torch",
        "alignment.objective=cosine", "optim.implementation=foreach",
    ])


def test_training_step_matches_reg_from_the_recorded_draws(reg, state_dict, tmp_path):
    """RegPhase.loss + the engine's backward from REG's draws (t, latent noise, class-token noise, label dropout):
    every loss component, every parameter gradient and the clipping norm."""
    cfg, root = reg
    g = torch.load(root / "reg_loss.pt", weights_only=True)
    config = _reg_config(cfg, tmp_path)
    teacher = Teacher([SimpleNamespace(embed_dim=z) for z in cfg["model"]["z_dims"]])  # targets given below
    phase = plan_phases(config, teacher, "torch")[0]
    assert isinstance(phase, RegPhase) and phase.cls_weight == 0.03 and phase.alignment_weight(0) == 0.5
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims))
    assert model.cls_token_dim == 32
    model.load_state_dict(state_dict, strict=True)
    engine = LocalEngine(model, config, DistEnv(0, 0, 1, torch.device("cpu")), accumulation=1)

    drop = (g["drop_u"] < cfg["model"]["class_dropout_prob"]).long()
    assert torch.equal(torch.where(drop == 1, 1000, g["y"]), g["y_used"])
    draw = StepDraw(t=g["t"], noise=g["noise"], drop_labels=drop, cls_noise=g["noise_cls"])
    x_t, v_target = Interpolant("linear").interpolate(g["x"], g["noise"], g["t"])
    cls_t, cls_target = Interpolant("linear").interpolate(g["enc_cls"], g["noise_cls"], g["t"])
    for ours, name in ((x_t, "xt"), (v_target, "v_target"), (cls_t, "cls_t"), (cls_target, "cls_target")):
        assert rel_err(ours, g[name]) <= RTOL, name

    batch = {"latents": g["x"], "labels": g["y"]}
    loss, parts = phase.loss(engine.forward_module, batch, slice(None), [g["zs0"]], draw, 0)
    assert set(parts) == {"loss", "loss_diffusion", "loss_align", "loss_cls"}
    assert rel_err(parts["loss_diffusion"], g["denoising_loss"].mean()) <= RTOL
    assert rel_err(parts["loss_diffusion"], g["loss_mean"]) <= RTOL
    assert rel_err(parts["loss_align"], g["proj_loss"]) <= RTOL
    assert rel_err(0.5 * parts["loss_align"], g["proj_loss_mean"]) <= RTOL
    assert rel_err(parts["loss_cls"], g["denoising_loss_cls"].mean()) <= RTOL
    assert rel_err(0.03 * parts["loss_cls"], g["loss_mean_cls"]) <= RTOL
    assert rel_err(loss, g["loss"]) <= RTOL
    check_step(engine, model, loss, g)


def test_step_draws_follow_reg_order():
    """The global-batch draw takes t, the latent noise, then the class-token noise, then the label dropout: the
    order of REG's torch.rand / randn_like(x) / randn_like(cls) / the LabelEmbedder's torch.rand."""
    n, shape, dc = 4, (4, 8, 8), 32
    randomness = GlobalBatchRandomness(seed=3, global_batch=n, latent_shape=shape, class_dropout_prob=0.1,
                                       interpolant=Interpolant("linear"), time_weighting="uniform",
                                       device=torch.device("cpu"), cls_dim=dc)
    draw = randomness.draw(5, 0, n)
    g = randomness.generator(5)
    t = torch.rand((n, 1, 1, 1), generator=g).flatten()
    noise = torch.randn((n, *shape), generator=g)
    cls_noise = torch.randn((n, dc), generator=g)
    drop = (torch.rand(n, generator=g) < 0.1).long()
    assert torch.equal(draw.t, t) and torch.equal(draw.noise, noise)
    assert torch.equal(draw.cls_noise, cls_noise) and torch.equal(draw.drop_labels, drop)
    rows = randomness.draw(5, 1, 2)  # any rank's rows are rows of the same global draw
    assert torch.equal(rows.cls_noise, cls_noise[1:3])


# ---------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("case", ["sde", "sde_cfg", "sde_cfg_clscond"])
def test_sde_sampler_matches_reg_with_the_joint_class_token(reg, state_dict, case):
    cfg, root = reg
    data = torch.load(root / "reg_samplers.pt", weights_only=True)
    model = SiT(**cfg["model"])
    model.load_state_dict(state_dict, strict=True)
    settings = {k: v for k, v in cfg["samplers"][case].items() if k != "sampler"}
    steps = settings["num_steps"]
    assert data[f"{case}_noises"].shape[0] == data[f"{case}_cls_noises"].shape[0] == steps - 1
    calls = []

    class Recorder(nn.Module):  # what the sampler hands the model at each call
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.num_classes, self.cls_token_dim = model, model.num_classes, model.cls_token_dim

        def forward(self, x, t, y, cls_token=None):
            calls.append((x[: len(data["y"])].clone(), cls_token[: len(data["y"])].clone(), t[0].item(), len(x)))
            return self.inner(x, t, y, cls_token=cls_token)

    x, cls = euler_maruyama_sampler(Recorder().eval(), data["latents"], data["y"], noises=data[f"{case}_noises"],
                                    cls_latents=data["cls_latents"], cls_noises=data[f"{case}_cls_noises"],
                                    return_cls=True, **settings)
    assert x.dtype == cls.dtype == torch.float64
    assert rel_err(x, data[case]) <= RTOL
    assert rel_err(cls, data[f"{case}_cls"]) <= RTOL
    # Every model call: the joint state (in the model's dtype), t_cur and whether the batch was doubled for CFG.
    assert len(calls) == steps
    for k, (x_in, cls_in, t, rows) in enumerate(calls):
        assert rel_err(x_in, data[f"{case}_traj_x"][k]) <= RTOL, k
        assert rel_err(cls_in, data[f"{case}_traj_cls"][k]) <= RTOL, k
        assert t == pytest.approx(data[f"{case}_traj_t"][k].item(), rel=1e-6)
        assert (rows == 2 * len(data["y"])) == bool(data[f"{case}_guided"][k])


def test_sde_sampler_without_replay_draws_latent_then_class_token_noise(reg, state_dict):
    cfg, root = reg
    data = torch.load(root / "reg_samplers.pt", weights_only=True)
    model = SiT(**cfg["model"])
    model.load_state_dict(state_dict, strict=True)
    settings = {k: v for k, v in cfg["samplers"]["sde_cfg"].items() if k != "sampler"}
    gen = torch.Generator().manual_seed(11)
    drawn = euler_maruyama_sampler(model.eval(), data["latents"], data["y"], cls_latents=data["cls_latents"],
                                   generator=gen, return_cls=True, **settings)
    gen = torch.Generator().manual_seed(11)
    noises, cls_noises = [], []
    for _ in range(settings["num_steps"] - 1):
        noises.append(torch.randn(data["latents"].shape, generator=gen, dtype=torch.float64))
        cls_noises.append(torch.randn(data["cls_latents"].shape, generator=gen, dtype=torch.float64))
    replayed = euler_maruyama_sampler(model, data["latents"], data["y"], cls_latents=data["cls_latents"],
                                      noises=noises, cls_noises=cls_noises, return_cls=True, **settings)
    assert all(torch.equal(a, b) for a, b in zip(drawn, replayed, strict=True))
