"""Parity with the released ERW code (../shared/golden/erw): the warmup step as the trainer runs it (phase loss,
engine backward, clipping, AdamW), the Phase-2 SiT with RoPE under the reference's key names, and λ(step)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from erw_fast.config import load_config
from erw_fast.encoders.teacher import Teacher
from erw_fast.engines import LocalEngine
from erw_fast.models import SiT
from erw_fast.objectives import ERWLambdaSchedule, erw_c0_preset
from erw_fast.phases import WarmupPhase, plan_phases
from erw_fast.randomness import StepDraw
from erw_fast.runtime import DistEnv


@pytest.fixture(scope="module")
def erw_golden(golden_dir):
    root = golden_dir / "erw"
    return json.loads((root / "config.json").read_text()), root


def _warmup_config(cfg: dict, legacy: bool, tmp_path):
    w, o = cfg["warmup"], cfg["optimizer"]
    return load_config(None, [
        f"alignment.encoder_depth={w['l2r_depth']}",
        "run.device=cpu", "run.mode=erw", f"run.output_dir={tmp_path}", "model.name=SiT-S/2",
        f"model.input_size={w['input_size']}", f"model.patch_size={w['patch_size']}", f"model.depth={w['depth']}",
        f"model.hidden_size={w['hidden_size']}", f"model.num_heads={w['num_heads']}",
        f"model.num_classes={w['num_classes']}", f"model.projector_dim={w['projector_dim']}",
        f"model.qk_norm={str(w['qk_norm']).lower()}", "model.use_rope=true",  # RoPE is Phase 2's only
        f"erw.warmup_depth={w['l2r_depth']}", f"erw.warmup_loss_weight={o['proj_coeff']}",
        f"erw.legacy_warmup_loss={str(legacy).lower()}", "encoder.names=[demo-vit-t]", "encoder.pretrained=false",
        f"optim.lr={o['lr']}", f"optim.betas=[{o['betas'][0]}, {o['betas'][1]}]", f"optim.eps={o['eps']}",
        f"optim.weight_decay={o['weight_decay']}", f"optim.grad_clip={o['max_grad_norm']}",
        "optim.implementation=foreach", "train.precision=fp32", f"train.global_batch_size={w['batch']}",
        "alignment.backend=torch", "alignment.objective=cosine",
    ])


@pytest.mark.parametrize("variant", ["legacy", "fixed"])
def test_warmup_step_matches_the_released_code(erw_golden, variant, tmp_path):
    cfg, root = erw_golden
    g = torch.load(root / "erw_warmup_step.pt", weights_only=True)
    config = _warmup_config(cfg, variant == "legacy", tmp_path)
    teacher = Teacher([SimpleNamespace(embed_dim=z) for z in cfg["warmup"]["z_dims"]])  # features given below
    phase = plan_phases(config, teacher, "torch")[0]
    assert isinstance(phase, WarmupPhase) and phase.weight == 0.5
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims))
    assert model.feat_rope is None  # the reference's warmup model has no RoPE whatever use_rope says
    model.load_state_dict(g["init_state_dict"], strict=True)  # reference key names and layout
    engine = LocalEngine(model, config, DistEnv(0, 0, 1, torch.device("cpu")), accumulation=1)

    x, targets = g["x"], [g["zs0"], g["zs1"]]
    draw = StepDraw(t=torch.zeros(len(x)), noise=torch.zeros_like(x), drop_labels=g["drop_ids"].long())
    with torch.no_grad():
        projections = model(x, torch.zeros(len(x)), g["y"], draw.drop_labels)
    for i, p in enumerate(projections):
        torch.testing.assert_close(p, g[variant][f"projections{i}"], rtol=1e-5, atol=1e-6)

    loss, parts = phase.loss(engine.forward_module, {"latents": x, "labels": g["y"]}, slice(None), targets, draw, 0)
    torch.testing.assert_close(parts["loss_align"], g[variant]["proj_loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, g[variant]["loss"], rtol=1e-5, atol=1e-7)  # 0.5 · proj_loss
    engine.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(g[variant]["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(grad, g[variant]["grads"][name], rtol=1e-4, atol=1e-8, msg=name)
    outcome = engine.step(loss)
    torch.testing.assert_close(outcome.grad_norm, g[variant]["grad_norm"], rtol=1e-5, atol=0)
    after = model.state_dict()
    for name, value in g[variant]["state_dict_after"].items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_rope_state_dict_loads_strictly_and_matches_the_forward(erw_golden):
    cfg, root = erw_golden
    r = cfg["rope"]
    g = torch.load(root / "erw_rope_state_dict.pt", weights_only=True)
    kwargs = {k: r[k] for k in ("input_size", "patch_size", "hidden_size", "num_heads", "depth", "encoder_depth",
                                "num_classes", "projector_dim", "z_dims", "qk_norm")}
    model = SiT(**kwargs, use_rope=True)
    assert list(model.state_dict()) == list(g["state_dict"])  # the reference's keys, in its order
    for name in ("feat_rope.freqs_cos", "feat_rope.freqs_sin"):  # our tables, built from the shape
        torch.testing.assert_close(model.state_dict()[name], g["state_dict"][name], rtol=0, atol=1e-6)
    model.load_state_dict(g["state_dict"], strict=True)
    with torch.no_grad():
        v, zs = model.eval()(g["x"], g["t"], g["y"])
    torch.testing.assert_close(v, g["v"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zs[0], g["z0"], rtol=1e-5, atol=1e-6)
    # A state dict written before the tables were persistent still loads strictly (they are filled in).
    older = {k: v for k, v in g["state_dict"].items() if not k.startswith("feat_rope.")}
    SiT(**kwargs, use_rope=True).load_state_dict(older, strict=True)


def test_lambda_matches_the_released_schedule(erw_golden):
    _, root = erw_golden
    g = torch.load(root / "erw_lambda.pt", weights_only=True)
    w, s = int(g["warmup_steps"]), int(g["max_train_steps"])
    for name in ("SiT-XL/2", "SiT-L/2", "SiT-B/2"):
        schedule = ERWLambdaSchedule(erw_c0_preset(name), w, s, 50_000)
        got = torch.tensor([schedule(int(step)) for step in g["steps"]], dtype=torch.float64)
        torch.testing.assert_close(got, g["lambda"][name], rtol=1e-12, atol=0)
