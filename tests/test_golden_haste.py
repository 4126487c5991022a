"""Parity with HASTE's reference code (../shared/golden/haste): the DINOv2 teacher loaded from a hub-layout file
through the project's loader, its preprocessing, patch tokens and attention logits (CLS removed); the student SiT's
forward, projector and attention logits; one training step as the trainer runs it (DiffusionPhase with REPA +
HASTE, the engine's backward and clipping) from the recorded draws. Plus the soft cross-entropy against float64
autograd, what the captured maps cost, HASTE's config checks and its phase plan.

"≤ 1e-5 relative" = the largest absolute difference over the largest absolute reference value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _golden_helpers import RTOL, check_step, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from erw_fast.config import ConfigError, load_config
from erw_fast.encoders import load_encoder
from erw_fast.encoders.teacher import Teacher, TeacherTargets
from erw_fast.engines import LocalEngine
from erw_fast.models import SiT
from erw_fast.objectives import AttentionDistillation, HardStop, Interpolant, soft_cross_entropy
from erw_fast.phases import DiffusionPhase, plan_phases
from erw_fast.randomness import StepDraw
from erw_fast.runtime import DistEnv

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def haste(golden_dir):
    root = golden_dir / "haste"
    cfg = json.loads((root / "config.json").read_text())
    load = lambda name: torch.load(root / f"{name}.pt", weights_only=True)  # noqa: E731
    return cfg, load("haste_inputs"), load("haste_teacher"), load("haste_student")


@pytest.fixture(scope="module")
def teacher_encoder(haste, tmp_path_factory):
    """The golden DINOv2 (hub layout, width 36) through load_encoder's file path: conversion, strict load."""
    cfg, _, teacher, _ = haste
    path = tmp_path_factory.mktemp("haste") / "dinov2_tiny.pth"
    torch.save(teacher["state_dict"], path)
    t = cfg["teacher"]
    return load_encoder("dinov2-vit-b", 256, pretrained=True, weights_path=path,
                        model_kwargs=dict(embed_dim=t["embed_dim"], depth=t["depth"], num_heads=t["num_heads"]))


def _slices(maps, cfg):
    s = cfg["slices"]
    return torch.stack([m[s["sample"], s["heads"], : s["queries"]] for m in maps])


def _student(cfg, **kwargs):
    m = cfg["student"]
    return SiT(input_size=m["input_size"], patch_size=m["patch_size"], hidden_size=m["hidden_size"],
               depth=m["depth"], num_heads=m["num_heads"], mlp_ratio=m["mlp_ratio"], num_classes=m["num_classes"],
               z_dims=[cfg["teacher"]["embed_dim"]], projector_dim=m["projector_dim"],
               encoder_depth=m["encoder_depth"], qk_norm=m["qk_norm"], **kwargs)


# ---------------------------------------------------------------------------------------------------- the teacher


def test_teacher_tokens_and_attention_logits_match_haste(haste, teacher_encoder):
    cfg, inputs, teacher, _ = haste
    enc = teacher_encoder
    assert enc.num_patches() == cfg["attention_distillation"]["tokens"]
    images = inputs["raw_image"].float()
    assert rel_err(enc.preprocess(images), inputs["teacher_input"]) <= RTOL
    blocks = [b + 1 for b in cfg["attention_distillation"]["teacher_blocks_0based"]]
    with enc.attention_logits(blocks, range(12)) as maps:
        tokens = enc(images)
    assert rel_err(tokens, teacher["patch_tokens"]) <= RTOL
    assert len(maps) == 4 and all(m.shape == (2, 12, 256, 256) for m in maps)  # CLS row and column removed
    assert rel_err(_slices(maps, cfg), teacher["attn_logits_slice"]) <= RTOL
    with enc.attention_logits([12, 9], [11, 0]) as again:  # any order of blocks and heads
        enc(images)
    torch.testing.assert_close(again[0][:, 0], maps[3][:, 11], rtol=0, atol=0)
    torch.testing.assert_close(again[1][:, 1], maps[0][:, 0], rtol=0, atol=0)
    assert not enc.model.blocks[8].attn.qkv._forward_hooks  # the hooks are gone once the block closes
    with pytest.raises(ValueError, match="block 13"):
        enc.attention_logits([13], [0]).__enter__()


def test_teacher_maps_leave_out_registers_and_agree_with_timms_own_attention():
    """A DINOv2 with 4 registers (5 prefix tokens): softmax of our patch-token logits equals timm's own attention
    probabilities (its non-fused path, read where they enter attn_drop) restricted to the patch tokens and
    renormalised."""
    torch.manual_seed(0)
    enc = load_encoder("dinov2-vit-s-reg", pretrained=False, model_kwargs={"depth": 2})
    assert enc.model.num_prefix_tokens == 5
    attn = enc.model.blocks[1].attn
    attn.fused_attn, probs = False, []
    attn.attn_drop.register_forward_hook(lambda m, args, out: probs.append(args[0]))
    with enc.attention_logits([2], [4, 1]) as maps:
        enc(torch.rand(1, 3, 256, 256) * 255)
    assert maps[0].shape == (1, 2, 256, 256)
    patches = probs[0][:, [4, 1], 5:, 5:].double()
    assert rel_err(maps[0].double().softmax(-1), patches / patches.sum(-1, keepdim=True)) <= RTOL


# ---------------------------------------------------------------------------------------------------- the student


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_student_forward_and_attention_logits_match_haste(haste, backend):
    cfg, inputs, _, student = haste
    model = _student(cfg, attn_backend=backend)
    model.load_state_dict(student["state_dict"], strict=True)
    blocks = [b + 1 for b in cfg["attention_distillation"]["student_blocks_0based"]]
    v, zs, maps = model.train()(inputs["model_input"], inputs["t"], inputs["y"], inputs["drop_ids"].long(),
                                attn_blocks=blocks, attn_heads=range(12))
    assert rel_err(v, student["model_output"]) <= RTOL
    assert rel_err(zs[0], student["projections0"]) <= RTOL
    assert len(maps) == 4 and all(m.shape == (2, 12, 256, 256) for m in maps)
    assert rel_err(_slices(maps, cfg), student["attn_logits_slice"]) <= RTOL
    # The output does not depend on whether maps are asked for.
    plain_v, _ = model(inputs["model_input"], inputs["t"], inputs["y"], inputs["drop_ids"].long())
    torch.testing.assert_close(plain_v, v, rtol=0, atol=0)


class _Maps(TorchDispatchMode):
    """The distinct storages of every op output whose last two dimensions are tokens × tokens."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens, self.storages = tokens, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2:] == (self.tokens, self.tokens):
                self.storages[t.untyped_storage().data_ptr()] = t.numel()
        return out


@pytest.mark.slow
def test_only_the_chosen_blocks_and_heads_materialise_maps(haste):
    """4 blocks × 12 heads of 16: four (2, 12, 256, 256) logit maps in the forward, nothing of the other blocks
    or heads; sdpa keeps its fused kernel (no 256×256 map of its own)."""
    cfg, inputs, _, student = haste
    model = _student(cfg)
    model.load_state_dict(student["state_dict"], strict=True)
    args = (inputs["model_input"], inputs["t"], inputs["y"], inputs["drop_ids"].long())
    with torch.no_grad(), _Maps(256) as plain:
        model(*args)
    assert plain.storages == {}
    with torch.no_grad(), _Maps(256) as chosen:
        model(*args, attn_blocks=[5, 6, 7, 8], attn_heads=range(12))
    assert sorted(chosen.storages.values()) == [2 * 12 * 256 * 256] * 4
    with torch.no_grad(), _Maps(256) as scattered:  # heads out of order: a gather of q and k, then one map
        model(*args, attn_blocks=[2], attn_heads=[3, 1])
    assert list(scattered.storages.values()) == [2 * 2 * 256 * 256]


def test_a_class_token_is_left_out_of_the_student_maps():
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=4, z_dims=[8],
                projector_dim=16, encoder_depth=1, cls_token_dim=8)
    x, t, y, cls = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]), torch.randn(2, 8)
    *_, maps = model(x, t, y, cls_token=cls, attn_blocks=[2], attn_heads=[1])
    assert maps[0].shape == (2, 1, 16, 16)  # 16 patch tokens; token 0 (the class token) dropped
    block, captured = model.blocks[1], {}
    block.attn.qkv.register_forward_hook(lambda m, a, out: captured.setdefault("qkv", out))
    model(x, t, y, cls_token=cls)
    q, k, _ = captured["qkv"].reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    expected = (q[:, 1:2, 1:].double() / 4) @ k[:, 1:2, 1:].double().transpose(-2, -1)
    assert rel_err(maps[0], expected) <= RTOL


# ----------------------------------------------------------------------------------------------------- the loss


def test_soft_cross_entropy_and_its_gradient_match_float64_autograd():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 10, 10) * 3, torch.randn(3, 4, 10, 10) * 3
    s64 = s.double().requires_grad_()
    expected = -(t.double().softmax(-1) * s64.log_softmax(-1)).sum(-1).mean()
    expected.backward()
    ours = s.clone().requires_grad_()
    loss = soft_cross_entropy(ours, t)
    loss.backward()
    assert loss.dtype == torch.float32 and rel_err(loss, expected) <= 1e-6
    assert rel_err(ours.grad, s64.grad) <= 1e-6
    # bf16 logits (autocast): computed in fp32, the gradient handed back in bf16.
    low = s.bfloat16().requires_grad_()
    value = soft_cross_entropy(low, t.bfloat16())
    value.backward()
    ref = -(t.bfloat16().double().softmax(-1) * s.bfloat16().double().log_softmax(-1)).sum(-1).mean()
    assert value.dtype == torch.float32 and rel_err(value, ref) <= 1e-6 and low.grad.dtype == torch.bfloat16
    # Uniform maps on both sides: the cross-entropy is the teacher's entropy, log(keys).
    flat = soft_cross_entropy(torch.zeros(1, 1, 3, 256), torch.zeros(1, 1, 3, 256))
    assert flat.item() == pytest.approx(math.log(256), rel=1e-6)


def test_backward_keeps_only_the_two_maps_as_they_came():
    """What the documented memory figure rests on: autograd saves the student's and the teacher's logits in their
    own dtype (bf16 under autocast) and nothing in fp32."""
    s = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 3, 16, 16, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append((x.dtype, x.numel())) or x, lambda x: x):
        soft_cross_entropy(s, t)
    assert saved == [(torch.bfloat16, s.numel()), (torch.bfloat16, t.numel())]


def test_log_softmax_stays_finite_where_the_references_log_of_softmax_does_not():
    """A row whose logits spread over more than ~104 underflows softmax in fp32 (as autocast computes it): the
    reference's log(softmax(·)) is then −inf there and the loss inf or NaN; log_softmax is finite."""
    s = torch.tensor([[[[0.0, -120.0, 5.0, -200.0]]]])
    t = torch.tensor([[[[1.0, 0.5, 0.0, -3.0]]]])
    reference = -(t.softmax(-1) * torch.log(s.softmax(-1))).sum(-1).mean()
    assert not torch.isfinite(reference)
    ours = s.clone().requires_grad_()
    loss = soft_cross_entropy(ours, t)
    loss.backward()
    expected = -(t.double().softmax(-1) * s.double().log_softmax(-1)).sum(-1).mean()
    assert torch.isfinite(loss) and rel_err(loss, expected) <= 1e-6 and torch.isfinite(ours.grad).all()


def test_the_pairs_are_averaged():
    torch.manual_seed(1)
    s = [torch.randn(2, 3, 5, 5) for _ in range(2)]
    t = [torch.randn(2, 3, 5, 5) for _ in range(2)]
    distill = AttentionDistillation((3, 4), (9, 10), (0, 2, 1))
    assert distill.teacher_heads == (0, 1, 2)
    expected = sum(-(b.double().softmax(-1) * a.double().log_softmax(-1)).sum(-1).mean()
                   for a, b in zip(s, t, strict=True)) / 2
    assert rel_err(distill(s, t), expected) <= 1e-6
    with pytest.raises(ValueError, match="shape"):
        distill([s[0], s[1][:, :2]], t)


# ---------------------------------------------------------------------------------------------- the training step


def _haste_config(cfg: dict, tmp_path, *extra: str):
    m, o = cfg["student"], cfg["optimizer"]
    return load_config(None, [
        "run.device=cpu", "run.mode=repa", f"run.output_dir={tmp_path}", "model.name=SiT-S/2",
        f"model.input_size={m['input_size']}", f"model.patch_size={m['patch_size']}", f"model.depth={m['depth']}",
        f"model.hidden_size={m['hidden_size']}", f"model.num_heads={m['num_heads']}",
        f"model.num_classes={m['num_classes']}", f"model.projector_dim={m['projector_dim']}",
        f"model.qk_norm={str(m['qk_norm']).lower()}", f"alignment.encoder_depth={m['encoder_depth']}",
        f"alignment.weight={cfg['proj_coeff']}", "alignment.schedule=hard_stop",
        f"alignment.stop_step={cfg['early_stop_point']}", f"haste.attn_weight={cfg['attn_coeff']}",
        f"haste.stop_step={cfg['early_stop_point']}", f"optim.grad_clip={o['max_grad_norm']}",
        "encoder.names=[dinov2-vit-b]", "encoder.pretrained=false", "train.precision=fp32",
        "train.global_batch_size=2", "alignment.backend=torch", "alignment.objective=cosine",
        "optim.implementation=foreach", *extra,
    ])


@pytest.mark.slow
def test_training_step_matches_haste_from_the_recorded_draws(haste, teacher_encoder, golden_dir, tmp_path):
    """DiffusionPhase.targets (the real teacher on the raw images, its maps captured) and .loss + the engine's
    backward from HASTE's draws: every loss component, every parameter gradient and the clipping norm."""
    cfg, inputs, teacher_g, student = haste
    g = torch.load(golden_dir / "haste" / "haste_step.pt", weights_only=True)
    assert g["global_step"].item() == 0
    config = _haste_config(cfg, tmp_path)
    phase = plan_phases(config, Teacher([teacher_encoder]), "torch")[0]
    assert isinstance(phase, DiffusionPhase) and phase.attention_weight(0) == 0.5
    assert phase.attn == AttentionDistillation((5, 6, 7, 8), (9, 10, 11, 12), tuple(range(12)))
    model = phase.build_model(config.model.sit_kwargs([cfg["teacher"]["embed_dim"]]))
    model.load_state_dict(student["state_dict"], strict=True)
    engine = LocalEngine(model, config, DistEnv(0, 0, 1, torch.device("cpu")), accumulation=1)

    latents = inputs["latents"]
    x_t, _ = Interpolant("linear").interpolate(latents, inputs["noise"], inputs["t"])
    assert rel_err(x_t, inputs["model_input"]) <= RTOL
    batch = {"latents": latents, "labels": inputs["y"], "images": inputs["raw_image"]}
    targets = phase.targets(batch, slice(None))
    assert isinstance(targets, TeacherTargets) and len(targets.attention) == 4
    assert rel_err(targets[0], teacher_g["patch_tokens"]) <= RTOL
    draw = StepDraw(t=inputs["t"], noise=inputs["noise"], drop_labels=inputs["drop_ids"].long())
    loss, parts = phase.loss(engine.forward_module, batch, slice(None), targets, draw, 0)
    assert set(parts) == {"loss", "loss_diffusion", "loss_align", "loss_attn"}
    assert rel_err(parts["loss_diffusion"], g["loss_mean"]) <= RTOL
    assert rel_err(parts["loss_diffusion"], g["denoising_loss"].mean()) <= RTOL
    assert rel_err(parts["loss_align"], g["proj_loss"]) <= RTOL
    assert rel_err(parts["loss_align"], g["proj_loss_mean"]) <= RTOL
    assert rel_err(parts["loss_attn"], g["attn_loss"]) <= RTOL
    assert rel_err(parts["loss_attn"], g["attn_loss_mean"]) <= RTOL
    assert rel_err(loss, g["total_loss"]) <= RTOL
    check_step(engine, model, loss, g)


def test_log_softmax_reproduces_the_references_log_of_softmax_in_fp32(haste, teacher_encoder):
    """The reference takes log(softmax(·)) of the student's logits; log_softmax gives the golden maps' loss to
    within 1e-6 relative in fp32 (so no switch for the reference's form is kept)."""
    cfg, inputs, _, student = haste
    model = _student(cfg)
    model.load_state_dict(student["state_dict"], strict=True)
    with torch.no_grad(), teacher_encoder.attention_logits([9, 10, 11, 12], range(12)) as t_maps:
        teacher_encoder(inputs["raw_image"].float())
    with torch.no_grad():
        *_, s_maps = model.train()(inputs["model_input"], inputs["t"], inputs["y"], inputs["drop_ids"].long(),
                                   attn_blocks=[5, 6, 7, 8], attn_heads=range(12))
    ref = sum(-(t.softmax(-1) * torch.log(s.softmax(-1))).sum(-1).mean()
              for s, t in zip(s_maps, t_maps, strict=True)) / 4.0
    ours = AttentionDistillation((5, 6, 7, 8), (9, 10, 11, 12), tuple(range(12)))(s_maps, t_maps)
    assert abs(ours.item() - ref.item()) / abs(ref.item()) <= 1e-6


# --------------------------------------------------------------------------------------- config and phase plan


def _config(*overrides: str):
    return load_config(None, ["run.device=cpu", "encoder.pretrained=false", *overrides])


def test_the_preset_plans_repa_with_haste_stopping_at_250k():
    config = load_config(REPO_CONFIGS / "haste_sit_xl2.yaml", ["run.device=cpu"])
    phase, after = plan_phases(config, Teacher(), "torch")  # both terms stop at 250k: the teacher stops there
    assert (after.name, after.start, after.end, after.aligns) == ("denoise", 250_000, 400_000, False)
    assert phase.name == "repa" and phase.end == 250_000
    assert phase.attn == AttentionDistillation((5, 6, 7, 8), (9, 10, 11, 12), tuple(range(12)))
    assert isinstance(phase.attn_lam, HardStop) and phase.attn_lam.zero_from == 250_000
    assert phase.attention_weight(249_999) == 0.5 and phase.attention_weight(250_000) == 0.0
    assert config.alignment.weight == 0.5 and config.alignment.stop_step == 250_000


def test_with_erw_the_attention_term_is_in_phase_2_only():
    config = _config("run.mode=erw", "model.name=SiT-B/2", "erw.warmup_steps=100", "train.total_steps=1000",
                     "haste.attn_weight=0.5", "haste.schedule=cosine", "haste.stop_step=600",
                     "haste.student_heads=[11, 10]")
    warmup, full = plan_phases(config, Teacher(), "torch")
    assert warmup.attention_weight(0) is None
    assert full.attn.student_heads == (11, 10) and full.attn.teacher_heads == (0, 1)
    assert full.attention_weight(100) == 0.5 and full.attention_weight(350) == pytest.approx(0.25)
    assert full.attn_lam.zero_from == 600
    plain = plan_phases(_config("run.mode=repa"), Teacher(), "torch")[0]
    assert plain.attn is None and plain.attention_weight(0) is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["run.mode=sit"], "haste.attn_weight: .*run.mode=sit"),
    (["data.features=true"], "haste.attn_weight: .*online teacher"),
    (["alignment.objective=nt_xent", "alignment.negatives_scope=global"], "negatives_scope=local"),
    (["haste.stop_step=null"], "haste.stop_step: haste.schedule=hard_stop needs it"),
    (["haste.schedule=constant", "haste.stop_step=null", "haste.student_blocks=[5, 6, 7, 29]"],
     r"haste.student_blocks: \[5, 6, 7, 29\] must be in \[1, model depth 28\]"),
    (["haste.teacher_blocks=[9, 10, 11, 13]"], "haste.teacher_blocks: .*depth 12"),
    (["haste.teacher_blocks=[9]"], "pair up one to one"),
    (["haste.student_heads=[0, 16]"], r"haste.student_heads: \[0, 16\] must be student heads in \[0, 16\)"),
    (["haste.student_heads=[1, 1]"], "haste.student_heads: .*distinct"),
    (["model.name=SiT-B/2", "encoder.names=[dinov2-vit-l]"],
     r"haste.student_heads: None must be student heads in \[0, 12\) \(unset: the first 16"),
    (["model.name=SiT-XL/4"], "haste.attn_weight: the student's 8×8 patch grid"),
    (["haste.attn_weight=-1"], "haste.attn_weight: must be ≥ 0"),
    (["run.mode=erw", "erw.warmup_steps=300000", "train.total_steps=400000"], "haste.stop_step: 250000 is not after"),
])
def test_bad_haste_settings_are_refused_naming_the_key(overrides, message):
    base = ["run.mode=repa", "haste.attn_weight=0.5", "haste.stop_step=250000", "encoder.names=[dinov2-vit-b]"]
    with pytest.raises(ConfigError, match=message):
        _config(*base, *overrides)


# ------------------------------------------------------------------------------------------------ a whole run

# ERW on the tiny CPU run (warmup 6 steps of 14) with HASTE in Phase 2: the demo teacher's 2 blocks (3 heads)
# against SiT blocks 2 and 3, student heads 1 and 0 (a gathered pair), stopped for good at step 10.
HASTE_TINY = ("haste.attn_weight=0.5", "haste.student_blocks=[2, 3]", "haste.teacher_blocks=[1, 2]",
              "haste.student_heads=[1, 0]", "haste.schedule=hard_stop", "haste.stop_step=10")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_of_haste_match_one_process(tmp_path):
    """One process and 2 DDP ranks (torchrun, gloo) give the same losses, attention losses, gradient norms and
    weights; the attention term runs in Phase 2 until the stop step only, and its weight is logged."""
    from _trainer_helpers import launch, read, tiny_config

    from erw_fast.trainer import Trainer

    config = tiny_config(tmp_path, "one", *HASTE_TINY)
    Trainer(config).run()
    records = read(config.run_dir)
    for r in records:
        s = r["step"] - 1  # the logged step counts completed steps
        if s < 6:  # the warmup: no attention term
            assert "lambda_attn" not in r and "loss_attn" not in r, s
        elif s < 10:
            assert r["lambda_attn"] == 0.5 and math.isfinite(r["loss_attn"]), s
            assert r["loss"] == pytest.approx(r["loss_diffusion"] + r["lambda"] * r["loss_align"]
                                              + 0.5 * r["loss_attn"], rel=1e-5), s
        else:  # stopped: the student's maps are not computed any more
            assert r["lambda_attn"] == 0.0 and "loss_attn" not in r, s
    launch(tmp_path, "ddp", *HASTE_TINY)
    ddp = read(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == list(range(1, 15))
    for a, b in zip(ddp, records, strict=True):
        assert ("loss_attn" in a) == ("loss_attn" in b)
        for key in ("loss", "grad_norm", "loss_attn") if "loss_attn" in a else ("loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a["step"])
    # The weights, to 2e-5 absolute (as test_engines), except the key biases: their gradient is 0 in exact
    # arithmetic (a row's softmax ignores a shift common to its keys), so both runs hold rounding noise there
    # (~1e-9), which AdamW turns into steps of up to lr·g/(|g| + eps): measured up to 7e-5 apart after 14 steps.
    hidden = config.model.hidden_size
    for part in ("model", "ema"):
        ours = torch.load(tmp_path / "ddp" / "reference" / "0000014.pt", weights_only=True)[part]
        ref = torch.load(config.run_dir / "reference" / "0000014.pt", weights_only=True)[part]
        assert set(ours) == set(ref)
        for key, value in ref.items():
            if key.endswith("attn.qkv.bias"):
                keys = slice(hidden, 2 * hidden)
                torch.testing.assert_close(ours[key][keys], value[keys], rtol=0, atol=1e-3, msg=f"{part} {key}")
                ours[key][keys] = value[keys]
            torch.testing.assert_close(ours[key], value, rtol=0, atol=2e-5, msg=f"{part} {key}")


@pytest.mark.slow
def test_haste_on_reg_leaves_the_class_token_out_and_adds_its_term(tmp_path):
    """REG + HASTE on the tiny CPU run: RegPhase takes the attention term; the teacher runs once (its maps come
    with the targets); the loss is the weighted sum of its four parts, the attention part equal to a float64
    recomputation from the maps (student maps over the 16 patch tokens, token 0 left out)."""
    from _trainer_helpers import tiny_config

    from erw_fast.encoders.teacher import load_teacher
    from erw_fast.phases import RegPhase

    config = tiny_config(tmp_path, "reg", "run.mode=reg", *HASTE_TINY)
    teacher = load_teacher(config, torch.device("cpu"), 16, log=lambda _: None)
    (phase,) = plan_phases(config, teacher, "torch")
    assert isinstance(phase, RegPhase) and phase.attn.student_heads == (1, 0)
    assert "HASTE attention distillation (SiT blocks [2, 3] ↔ teacher blocks [1, 2], 2 heads, weight 0.5, off " \
           "from step 10)" in phase.describe(torch.device("cpu"))
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims))
    torch.manual_seed(0)
    for p in model.parameters():  # adaLN-Zero starts every block as the identity: give it something to distil
        p.data.add_(0.05 * torch.randn_like(p))
    batch = {"latents": torch.randn(3, 4, 8, 8), "labels": torch.tensor([0, 1, 3]),
             "images": torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)}
    targets = phase.targets(batch, slice(None))
    assert targets[0].shape == (3, 17, 192) and [m.shape for m in targets.attention] == [(3, 2, 16, 16)] * 2
    draw = StepDraw(t=torch.rand(3), noise=torch.randn(3, 4, 8, 8), drop_labels=torch.tensor([0, 1, 0]),
                    cls_noise=torch.randn(3, 192))
    loss, parts = phase.loss(model, batch, slice(None), targets, draw, 6)
    assert set(parts) == {"loss", "loss_diffusion", "loss_align", "loss_cls", "loss_attn"}
    assert loss.item() == pytest.approx((parts["loss_diffusion"] + 0.5 * parts["loss_align"]
                                         + config.reg.cls_weight * parts["loss_cls"]
                                         + 0.5 * parts["loss_attn"]).item(), rel=1e-6)
    x_t, _ = Interpolant("linear").interpolate(batch["latents"], draw.noise, draw.t)
    cls_t, _ = Interpolant("linear").interpolate(targets[0][:, 0], draw.cls_noise, draw.t)
    *_, maps = model(x_t, draw.t, batch["labels"], draw.drop_labels, cls_token=cls_t, attn_blocks=[2, 3],
                     attn_heads=[1, 0])
    expected = sum(-(t.double().softmax(-1) * s.double().log_softmax(-1)).sum(-1).mean()
                   for s, t in zip(maps, targets.attention, strict=True)) / 2
    assert rel_err(parts["loss_attn"], expected) <= 1e-6
    _, after = phase.loss(model, batch, slice(None), targets, draw, 10)  # the stop step: no maps, no term
    assert "loss_attn" not in after and phase.attention_weight(10) == 0.0
