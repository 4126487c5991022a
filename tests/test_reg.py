"""REG on the trainer's code path (the golden parity is tests/test_golden_reg.py): the config modes, the phases,
the teacher's CLS token (live and precomputed), the ERW transfer into a class-token model, RoPE and attention at
1 + N tokens, FLOPs, the joint-state ODE, checkpoints in REG's layout both ways, erw-sample's protocol, the
monitors, a 2-rank run against one process, and configs/demo_reg.yaml."""

from __future__ import annotations

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch
from _trainer_helpers import REPO, launch, read, tiny_config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from erw_fast import flops as F
from erw_fast.config import ConfigError, load_config
from erw_fast.encoders import load_encoder
from erw_fast.encoders.teacher import Teacher, class_token_dim
from erw_fast.models import SiT, build_sit, build_sit_phase1, transfer_phase1_weights
from erw_fast.models.attention import Attention
from erw_fast.models.rope import Rope2D
from erw_fast.phases import DiffusionPhase, RegPhase, RegWarmupPhase, WarmupPhase, plan_phases
from erw_fast.sampling import euler_maruyama_sampler, euler_sampler
from erw_fast.trainer import Trainer

REG = ("run.mode=reg",)


def _phases(*overrides):
    config = load_config(None, ["run.device=cpu", "encoder.pretrained=false", *overrides])
    return config, plan_phases(config, Teacher([SimpleNamespace(embed_dim=768)]), "torch")


# ------------------------------------------------------------------------------------------- config and phases


def test_modes_plan_reg_phases():
    config, phases = _phases("run.mode=reg")
    assert [type(p) for p in phases] == [RegPhase] and phases[0].name == "reg"
    assert phases[0].cls_weight == 0.03 and phases[0].alignment_weight(5) == 0.5 and config.run.class_token
    assert class_token_dim(config) == 768  # the first encoder's width, from the registry

    config, phases = _phases("run.mode=erw_reg", "train.total_steps=200", "erw.warmup_steps=100")
    assert [type(p) for p in phases] == [WarmupPhase, RegPhase] and [p.name for p in phases] == ["warmup", "full"]
    assert config.class_token_in("full") and not config.class_token_in("warmup")
    _, phases = _phases("run.mode=erw_reg", "train.total_steps=200", "erw.warmup_steps=100",
                        "reg.warmup_class_token=true", "reg.cls_weight=0.1")
    assert [type(p) for p in phases] == [RegWarmupPhase, RegPhase] and phases[1].cls_weight == 0.1
    assert phases[1].alignment_weight(100) == pytest.approx(6.0)  # ERW's λ schedule in Phase 2 (XL: c0 = 6)

    config, phases = _phases("run.mode=repa")
    assert type(phases[0]) is DiffusionPhase and not phases[0].class_token and class_token_dim(config) is None


@pytest.mark.parametrize(("overrides", "match"), [
    (["run.mode=reg", "reg.cls_weight=-1"], "reg.cls_weight"),
    (["run.mode=reg", "reg.warmup_class_token=true"], "reg.warmup_class_token"),
    (["run.mode=reg", "encoder.names=[jepa-vit-h]"], "has none"),
    (["run.mode=regg"], "did you mean 'reg'"),
    (["run.mode=erw_reg", "erw.warmup_steps=400000"], "erw.warmup_steps"),
])
def test_bad_reg_configs_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_presets_load():
    reg = load_config(REPO / "configs" / "reg_sit_xl2.yaml")
    assert (reg.run.mode, reg.reg.cls_weight, reg.alignment.weight) == ("reg", 0.03, 0.5)
    assert reg.alignment.encoder_depth == 8
    assert reg.encoder.names == ["dinov2-vit-b"] and reg.optim.grad_clip == 1.0
    demo = load_config(REPO / "configs" / "demo_reg.yaml")
    assert demo.run.mode == "erw_reg" and demo.reg.warmup_class_token


# ------------------------------------------------------------------------------------------- the teacher's CLS


def test_encoder_and_teacher_give_the_cls_token_first():
    torch.manual_seed(0)
    encoder = load_encoder("demo-vit-t", resolution=64, pretrained=False)
    images = torch.randint(0, 256, (3, 3, 64, 64)).float()
    patches = encoder(images)
    both = encoder(images, with_cls=True)
    assert patches.shape == (3, 16, 192) and both.shape == (3, 17, 192)
    torch.testing.assert_close(both[:, 1:], patches, rtol=0, atol=0)
    normed = encoder.model.forward_features(encoder.preprocess(images))  # the final norm's output, CLS first
    torch.testing.assert_close(both[:, 0], normed[:, 0], rtol=0, atol=0)

    teacher = Teacher([encoder])
    batch = {"images": images}
    assert teacher.targets(batch, slice(1, 3), with_cls=True)[0].shape == (2, 17, 192)
    # Precomputed features: CLS first when erw-prepare stored it, told apart by the token count.
    cached = {"features": both}
    torch.testing.assert_close(teacher.targets(cached, slice(None))[0], patches)
    torch.testing.assert_close(teacher.targets(cached, slice(None), with_cls=True)[0], both)
    with pytest.raises(ValueError, match="--encoder-cls-token"):
        teacher.targets({"features": patches}, slice(None), with_cls=True)


def test_an_encoder_without_a_cls_token_refuses():
    encoder = load_encoder("jepa-vit-h", resolution=256, pretrained=False, device="meta",
                           model_kwargs={"depth": 1})
    with pytest.raises(ValueError, match="no CLS token"):
        encoder(torch.zeros(1, 3, 256, 256, device="meta"), with_cls=True)


# ------------------------------------------------------------------------------------------- model parts

KW = dict(input_size=8, patch_size=2, hidden_size=64, depth=4, num_heads=4, num_classes=10, z_dims=[32],
          projector_dim=48)


@pytest.mark.parametrize("warmup_class_token", [False, True])
def test_transfer_into_a_class_token_model(warmup_class_token):
    torch.manual_seed(0)
    phase1 = build_sit_phase1("SiT-S/2", 2, **KW, cls_token_dim=32 if warmup_class_token else None)
    full = build_sit("SiT-S/2", **KW, encoder_depth=3, cls_token_dim=32)
    fresh = {k: v.clone() for k, v in full.state_dict().items()}
    report = transfer_phase1_weights(phase1, full)
    assert full.pos_embed.shape == (1, 17, 64)
    torch.testing.assert_close(full.pos_embed, fresh["pos_embed"], rtol=0, atol=0)  # the same fixed table
    carried = {"cls_projectors2.weight", "cls_projectors2.bias", "wg_norm.weight", "wg_norm.bias"}
    if warmup_class_token:
        assert carried <= set(report.copied) and "class-token embedder copied" in report.summary()
        torch.testing.assert_close(full.cls_projectors2.weight, phase1.cls_projectors2.weight)
    else:
        assert carried <= set(report.fresh) and "class-token embedder fresh" in report.summary()
    assert {"final_layer.linear_cls.weight", "blocks.3.attn.qkv.weight"} <= set(report.fresh)
    torch.testing.assert_close(full.blocks[1].mlp.fc1.weight, phase1.blocks[1].mlp.fc1.weight)


def test_rope_leaves_the_class_token_unrotated():
    torch.manual_seed(0)
    rope = Rope2D(16, 4)
    x = torch.randn(2, 3, 17, 16)
    out = rope(x)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 1:], rope(x[:, :, 1:]), rtol=0, atol=0)
    model = SiT(**KW, encoder_depth=2, use_rope=True, cls_token_dim=32)  # ERW's Phase 2 with REG: RoPE + class token
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    v, zs, cls = model(x, t, y, cls_token=torch.randn(2, 32))
    assert v.shape == x.shape and zs[0].shape == (2, 17, 32) and cls.shape == (2, 32)


def test_attention_backends_agree_at_257_tokens():
    """REG's sequence at 256 px: 1 + 16 x 16 tokens, a multiple of no kernel tile."""
    torch.manual_seed(0)
    attn = Attention(64, 4, backend="math")
    x = torch.randn(2, 257, 64, requires_grad=True)
    ref = attn(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    for backend in ("sdpa",):
        attn.set_backend(backend)
        out = attn(x)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    model = SiT(**{**KW, "input_size": 32, "depth": 2}, encoder_depth=1, cls_token_dim=32, attn_backend="math")
    h = model.hidden_after(torch.randn(1, 4, 32, 32), torch.rand(1), torch.tensor([3]), cls_token=torch.randn(1, 32))
    assert h.shape == (1, 257, 64)


# ------------------------------------------------------------------------------------------- FLOPs


def test_flops_count_the_class_token_exactly():
    with torch.device("meta"):
        model = build_sit("SiT-XL/2", z_dims=[768], cls_token_dim=768)
        x, t, y = torch.empty(2, 4, 32, 32), torch.empty(2), torch.zeros(2, dtype=torch.long)
        cls = torch.empty(2, 768)

    def forward() -> None:
        model(x, t, y, cls_token=cls)

    def step() -> None:
        v, zs, out = model(x, t, y, cls_token=cls)
        (v.sum() + zs[0].sum() + out.sum()).backward()

    analytic = F.sit_flops("SiT-XL/2", 2, "reg", z_dims=[768])
    with FlopCounterMode(display=False) as fwd:
        forward()
    with FlopCounterMode(display=False) as total:
        step()
    assert analytic.forward() == fwd.get_total_flops() and analytic.training() == total.get_total_flops()
    # REG's "+0.4% FLOPs" over REPA: the whole training step of SiT-XL/2 with DINOv2-B
    reg, repa = (F.step_breakdown("SiT-XL/2", p, 256).training() for p in ("reg", "repa"))
    assert 0.003 < reg / repa - 1 < 0.005
    config = load_config(None, ["run.mode=erw_reg", "reg.warmup_class_token=true"])
    assert F.step_flops(config, "warmup")["breakdown"].settings["sequence"] == 257


def test_cost_report_has_a_reg_row():
    from erw_fast.bench.common import Workload
    from erw_fast.bench.cost import cost_analysis, render_cost_markdown

    res = cost_analysis(Workload(), 256)
    assert 1.003 < res["reg_over_repa"] < 1.005
    assert "| reg |" in render_cost_markdown(res) and "REG (REPA + the class token" in render_cost_markdown(res)


# ------------------------------------------------------------------------------------------- samplers


class ClassTokenVelocity(nn.Module):
    """v = table[y] everywhere; the class token's velocity = cls_table[y]: integrals in closed form."""

    cls_token_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 3
        self.table = nn.Parameter(torch.tensor([1.0, -2.0, 0.5, 4.0]), requires_grad=False)
        self.cls_table = nn.Parameter(torch.tensor([3.0, 1.0, -1.0, -5.0]), requires_grad=False)
        self.calls: list[int] = []

    def forward(self, x, t, y, cls_token=None):
        self.calls.append(x.shape[0])
        v = self.table[y].view(-1, 1, 1, 1).expand_as(x).to(x.dtype)
        return v, [], self.cls_table[y].view(-1, 1).expand_as(cls_token).to(x.dtype)


@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("cls_cfg_scale", [0.0, 2.5])
def test_ode_integrates_the_joint_state_with_its_own_guidance(heun, cls_cfg_scale):
    model = ClassTokenVelocity()
    y, scale = torch.tensor([0, 1]), 3.0
    x, cls = euler_sampler(model, torch.zeros(2, 1, 2, 2), y, num_steps=10, heun=heun, cfg_scale=scale,
                           cls_latents=torch.zeros(2, 2), cls_cfg_scale=cls_cfg_scale, return_cls=True)
    null = 3
    v = model.table[null] + scale * (model.table[y] - model.table[null])
    c = model.cls_table[y]
    if cls_cfg_scale > 0:
        c = model.cls_table[null] + cls_cfg_scale * (model.cls_table[y] - model.cls_table[null])
    torch.testing.assert_close(x[:, 0, 0, 0], -v.double(), rtol=1e-12, atol=1e-12)  # x0 = x1 − ∫ v dt
    torch.testing.assert_close(cls[:, 0], -c.double(), rtol=1e-12, atol=1e-12)
    assert set(model.calls) == {4}  # every call guided: both states doubled together


def test_samplers_refuse_a_missing_or_unwanted_class_token():
    model = SiT(**KW, encoder_depth=2, cls_token_dim=32)
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="cls_latents"):
        euler_sampler(model, z, y, num_steps=2)
    with pytest.raises(ValueError, match="cls_latents must be"):
        euler_maruyama_sampler(model, z, y, num_steps=2, cls_latents=torch.randn(2, 31))
    with pytest.raises(ValueError, match="no class token"):
        euler_sampler(SiT(**KW, encoder_depth=2), z, y, num_steps=2, cls_latents=torch.randn(2, 32))
    with pytest.raises(ValueError, match="cls_cfg_scale"):
        euler_sampler(model, z, y, num_steps=2, cls_latents=torch.randn(2, 32), cls_cfg_scale=-1)
    with pytest.raises(ValueError, match="cls_noises"):
        euler_maruyama_sampler(model, z, y, num_steps=3, cls_latents=torch.randn(2, 32),
                               cls_noises=torch.zeros(1, 2, 32))


# ------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def reg_run(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("reg"), "reg", *REG)
    Trainer(config).run()
    return config


@pytest.mark.slow
def test_reg_run_logs_the_class_token_loss_and_exports_regs_layout(reg_run, golden_dir, tmp_path):
    records = read(reg_run.run_dir)
    assert [r["step"] for r in records] == list(range(1, 15)) and {r["phase"] for r in records} == {"reg"}
    assert all(math.isfinite(r["loss_cls"]) and r["lambda"] == 0.5 for r in records)
    for r in records:  # what is back-propagated
        assert r["loss"] == pytest.approx(r["loss_diffusion"] + 0.5 * r["loss_align"] + 0.03 * r["loss_cls"],
                                          rel=1e-5, abs=1e-6)
    exported = torch.load(reg_run.run_dir / "reference" / "0000014.pt", weights_only=True)
    golden = torch.load(golden_dir / "reg" / "reg_forward.pt", weights_only=True)["state_dict"]
    # The tiny run has REG's golden model's structure (4 blocks, one projector): the same keys, in REG's order.
    assert list(exported["ema"]) == list(golden) == list(exported["model"])
    args = exported["args"]
    assert args["cls"] == 0.03 and args["cls_token_dim"] == 192 and args["proj_coeff"] == 0.5
    # Ours → a model built with REG's constructor keywords, strictly.
    reg_kwargs = dict(path_type="linear", input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                      decoder_hidden_size=32, encoder_depth=3, depth=4, num_heads=2, mlp_ratio=4.0,
                      class_dropout_prob=0.1, num_classes=4, use_cfg=True, z_dims=[192], projector_dim=32,
                      cls_token_dim=192, qk_norm=False, fused_attn=True)
    SiT(**reg_kwargs).load_state_dict(exported["ema"], strict=True)

    # REG's training-checkpoint layout ({model, ema, opt, args: Namespace, steps}) → our loader and our trainer.
    reg_file = tmp_path / "0000014.pt"
    torch.save({"model": exported["model"], "ema": exported["ema"], "opt": {},
                "args": argparse.Namespace(model="SiT-S/2", enc_type="demo-vit-t", encoder_depth=3, cls=0.03,
                                           proj_coeff=0.5, num_classes=4), "steps": 14}, reg_file)
    from erw_fast.cli.loading import load_sit_checkpoint

    loaded = load_sit_checkpoint(reg_file, config_path=reg_run.run_dir / "config.yaml")
    assert loaded.model.cls_token_dim == 192 and loaded.kwargs["cls_token_dim"] == 192
    more = tiny_config(tmp_path, "more", *REG, "train.total_steps=2", f"checkpoint.init_from_reference={reg_file}")
    lines: list[str] = []
    Trainer(more, log_stream=_Lines(lines)).run()  # a full checkpoint starts the run's last phase from its weights
    assert any("initialised from reference checkpoint" in line for line in lines)
    assert [r["step"] for r in read(more.run_dir)] == [1, 2]


@pytest.mark.slow
def test_erw_sample_records_every_reg_setting(reg_run, tmp_path):
    from erw_fast.cli import sample

    ckpt = reg_run.run_dir / "reference" / "0000014.pt"
    out = tmp_path / "s"
    args = ["--ckpt", str(ckpt), "--out-dir", str(out), "--num-samples", "4", "--batch-size", "4", "--num-steps",
            "3", "--vae", "toy", "--image-size", "64", "--mode", "sde", "--cfg-scale", "2.3", "--cls-cfg-scale",
            "2.3", "--guidance-high", "0.85"]
    assert sample.main(args) == 0
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["model"]["cls_token_dim"] == 192
    assert protocol["reg"]["cls_cfg_scale"] == 2.3 and protocol["reg"]["class_token_dim"] == 192
    assert "REG's Euler–Maruyama SDE" in protocol["reg"]["sampler_source"]
    assert protocol["sampler"]["cfg_scale"] == 2.3 and protocol["sampler"]["guidance_high"] == 0.85
    assert sample.main([*args[:3], str(tmp_path / "ode"), *args[4:12], "--mode", "ode"]) == 0
    ode = json.loads((tmp_path / "ode" / "protocol.json").read_text())
    assert "this project's ODE" in ode["reg"]["sampler_source"] and ode["reg"]["cls_noise"] is None


@pytest.mark.slow
def test_erw_analyze_feeds_the_teachers_cls_to_a_reg_model(reg_run, tmp_path):
    from erw_fast.cli import analyze

    ckpt = reg_run.run_dir / "reference" / "0000014.pt"
    assert analyze.main(["--ckpt", str(ckpt), "--out-dir", str(tmp_path), "--num-samples", "16", "--topk", "5",
                         "--t", "0.0", "0.5"]) == 0
    results = json.loads((tmp_path / "cknna.json").read_text())
    assert "REG" in results["features"] and results["depths"] == [1, 2, 3, 4]
    assert all(len(v) == 4 and all(math.isfinite(x) for x in v) for v in results["cknna"]["demo-vit-t"].values())


@pytest.mark.slow
def test_monitors_run_on_a_reg_model(tmp_path):
    config = tiny_config(tmp_path, "watched", *REG, "train.total_steps=4", "logging.sample_every=4",
                         "logging.cknna_every=4", "logging.sample_steps=3", "logging.sample_count=4",
                         "logging.cknna_samples=8")
    Trainer(config).run()
    assert (config.run_dir / "samples" / "step_0000004.png").is_file()
    assert (config.run_dir / "samples" / "step_0000004_cfg4.png").is_file()  # REG guided: both tokens
    record = json.loads((config.run_dir / "monitor.jsonl").read_text().splitlines()[0])
    assert len(record["cknna"]) == 4 and all(math.isfinite(v) for v in record["cknna"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_of_reg_match_one_process(tmp_path, reg_run):
    from test_engines import assert_same_run

    out = launch(tmp_path, "ddp", *REG)
    assert "global 8 = 2 device(s) × 4 per device" in out
    assert_same_run(tmp_path / "ddp", reg_run.run_dir)
    loss_cls = [r["loss_cls"] for r in read(reg_run.run_dir)]
    assert [r["loss_cls"] for r in read(tmp_path / "ddp")] == pytest.approx(loss_cls, rel=1e-5)
    pytest.importorskip("deepspeed")
    launch(tmp_path, "z2", *REG, "engine.kind=deepspeed", "engine.zero_stage=2")  # the class token under ZeRO-2
    assert_same_run(tmp_path / "z2", reg_run.run_dir)


@pytest.mark.slow
def test_demo_reg_config_trains_erw_with_reg_end_to_end(tmp_path):
    """configs/demo_reg.yaml as it is, fewer steps: the class-token warmup, the transfer carrying the class-token
    embedder, Phase 2 with REG under ERW's λ, a sample grid of the EMA, the export in REG's layout."""
    config = load_config(REPO / "configs" / "demo_reg.yaml", [
        f"run.output_dir={tmp_path}", "train.total_steps=30", "erw.warmup_steps=10", "logging.sample_every=30",
        "logging.progress=false", "checkpoint.every=100", "data.num_samples=256", "train.global_batch_size=16",
    ])
    lines: list[str] = []
    Trainer(config, log_stream=_Lines(lines)).run()
    text = "\n".join(lines)
    assert "ERW transfer at step 10" in text and "class-token embedder copied" in text
    records = read(config.run_dir)
    assert {r["phase"] for r in records[:1]} == {"warmup"} and "loss_cls" not in records[0]
    assert all(math.isfinite(r["loss_cls"]) for r in records if r["phase"] == "full")
    assert (config.run_dir / "samples" / "step_0000030.png").is_file()
    exported = torch.load(config.run_dir / "reference" / "0000030.pt", weights_only=True)
    assert exported["ema"]["pos_embed"].shape == (1, 17, 128) and exported["args"]["cls_token_dim"] == 192
    assert (config.run_dir / "checkpoints" / "phase1_0000010.pt").is_file()


class _Lines:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def write(self, text: str) -> None:
        self.lines.extend(t for t in text.splitlines() if t)

    def flush(self) -> None:
        pass


@pytest.mark.slow
def test_precomputed_features_with_the_cls_token_train_reg(tmp_path):
    from _shard_helpers import tiny_vae

    from erw_fast.data.prepare import PrepareOptions, prepare, scan_image_folder
    from erw_fast.data.shards import Manifest
    from erw_fast.data.vae import import_autoencoder_kl

    try:
        autoencoder_kl = import_autoencoder_kl()
    except ImportError:
        pytest.skip("diffusers is not installed")
    import numpy as np
    from PIL import Image

    source = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (source / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(source / f"class{c}" / f"{i}.png")
    torch.manual_seed(1)
    encoder = load_encoder("demo-vit-t", resolution=64, pretrained=False)
    opts = PrepareOptions(image_size=64, samples_per_shard=8, encoder="demo-vit-t", encoder_cls_token=True,
                          num_workers=0, batch_size=4, vae="tiny-random", progress=False)
    data = tmp_path / "data"
    assert prepare(scan_image_folder(source), data, opts, vae=tiny_vae(autoencoder_kl), encoder=encoder,
                   echo=lambda _: None).complete
    manifest = Manifest.load(data)
    assert manifest.features == {"encoder": "demo-vit-t", "shape": [17, 192], "dtype": "float16", "cls_token": True,
                                 "resolution": 64, "pretrained": False, "weights": "random init (pretrained=False)"}

    config = tiny_config(tmp_path, "cached", *REG, "data.kind=webdataset", f"data.path={data}", "data.features=true",
                         "data.num_workers=0", "train.total_steps=3", "model.num_classes=2", "checkpoint.every=10")
    from erw_fast.preflight import preflight

    preflight(config)
    Trainer(config).run()
    assert all(math.isfinite(r["loss_cls"]) for r in read(config.run_dir))
    # Features without the CLS token are refused before anything runs.
    manifest.features = {k: v for k, v in manifest.features.items() if k != "cls_token"}
    manifest.save(data)
    with pytest.raises(ConfigError, match="--encoder-cls-token"):
        preflight(tiny_config(tmp_path, "nocls", *REG, "data.kind=webdataset", f"data.path={data}",
                              "data.features=true", "model.num_classes=2"))


@pytest.mark.slow
def test_bench_train_times_the_reg_step_and_its_reference_imitation(tmp_path):
    from erw_fast.bench import common
    from erw_fast.cli import bench

    work = common.Workload(model="SiT-S/2", input_size=8, depth=2, hidden=64, heads=2, num_classes=10,
                           projector_dim=64, encoders=["demo-vit-t"], resolution=64)
    args = ["train", *work.config_overrides(), "train.precision=fp32", "--phases", "reg", "--batch", "4", "--steps",
            "2", "--warmup", "1", "--device", "cpu", "--out", str(tmp_path), "--name", "t", "--reference-step"]
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    assert [(r["phase"], r["variant"], r["status"]) for r in doc["results"]] == [("reg", "fast", "ok"),
                                                                                ("reg", "reference", "ok")]
    assert doc["results"][0]["gflops_per_step"] == pytest.approx(work.step_breakdown("reg", 4).training() / 1e9)


def test_reg_training_runs_on_the_step_draw(tmp_path):
    """The trainer's step hands RegPhase the class-token noise of the global-batch draw."""
    config = tiny_config(tmp_path, "one", *REG, "train.total_steps=2", "checkpoint.every=10")
    Trainer(config).run()
    records = read(config.run_dir)
    assert [r["step"] for r in records] == [1, 2] and all("loss_cls" in r for r in records)




def test_the_class_token_is_noised_per_sample_on_the_cosine_path():
    """REG's loss broadcasts α′_t (B,1,1,1) against the (B, Dc) class token on the cosine path, a (B,1,B,Dc)
    target; here each sample takes its own coefficients, as on the linear path."""
    from erw_fast.objectives import Interpolant, diffusion_loss

    seen = {}

    class Spy(nn.Module):
        def forward(self, x, t, y, cls_token=None):
            seen["cls_t"] = cls_token
            return torch.zeros_like(x), [], torch.zeros_like(cls_token)

    cls, noise, t = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0.1, 0.5, 0.9])
    out = diffusion_loss(Spy(), torch.randn(3, 4, 2, 2), torch.zeros(3, dtype=torch.long), Interpolant("cosine"),
                         t=t, noise=torch.randn(3, 4, 2, 2), cls_token=cls, cls_noise=noise, cls_weight=0.03)
    a, s, da, ds = (c[:, None] for c in Interpolant("cosine").coefficients(t))
    torch.testing.assert_close(seen["cls_t"], a * cls + s * noise)
    torch.testing.assert_close(out.cls, ((da * cls + ds * noise) ** 2).mean(dim=1).mean())
