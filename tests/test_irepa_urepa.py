"""iREPA's conv projector and spatial z-score targets, U-REPA's manifold loss: the loss against a float64
brute-force loop, the normalisation of precomputed vs online features, the configuration errors, the checkpoint
round trip of a conv-projector model, and a tiny ERW run with all three (both phases, the transfer, the export).
The reference numbers of iREPA itself are in test_golden_irepa.py."""

from __future__ import annotations

import json

import pytest
import torch
from _trainer_helpers import read, tiny_config

from erw_fast.config import ConfigError, load_config
from erw_fast.encoders import load_encoder
from erw_fast.encoders.teacher import Teacher
from erw_fast.models import SiT, SiTPhase1, transfer_phase1_weights
from erw_fast.objectives import AlignmentObjective
from erw_fast.objectives.manifold import manifold_loss
from erw_fast.objectives.target_norm import TargetNorm, spatial_zscore

IREPA = ["alignment.projector=conv", "alignment.projector_kernel_size=3", "alignment.target_norm=spatial_zscore",
         "alignment.manifold_weight=3.0"]


# ------------------------------------------------------------------------------------------- the manifold loss


def _manifold_brute_force(projs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """float64, one token pair at a time: mean over encoders and images of (1/T²) Σ_ij (cos z_i z_j − cos ẑ_i ẑ_j)²."""
    per_encoder = []
    for p, t in zip(projs, targets, strict=True):
        p, t = p.double(), t.double()
        per_image = []
        for b in range(p.shape[0]):
            total = p.new_zeros(())
            n = p.shape[1]
            for i in range(n):
                for j in range(n):
                    cos_t = (t[b, i] @ t[b, j]) / (t[b, i].norm() * t[b, j].norm())
                    cos_p = (p[b, i] @ p[b, j]) / (p[b, i].norm() * p[b, j].norm())
                    total = total + (cos_t - cos_p) ** 2
            per_image.append(total / n**2)
        per_encoder.append(torch.stack(per_image).mean())
    return torch.stack(per_encoder).mean()


def test_manifold_loss_and_gradient_match_a_float64_loop():
    torch.manual_seed(0)
    projs = [torch.randn(2, 9, 5, requires_grad=True), torch.randn(2, 9, 3, requires_grad=True)]  # two encoders
    targets = [torch.randn(2, 9, 7), torch.randn(2, 9, 4)]  # the teacher's width differs from the projection's
    ours = manifold_loss(projs, targets)
    ours.backward()
    ref_projs = [p.detach().double().requires_grad_(True) for p in projs]
    reference = _manifold_brute_force(ref_projs, targets)
    reference.backward()
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    for p, r in zip(projs, ref_projs, strict=True):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-7)
    # Identical relative geometry (a rotation and a per-token scale of the teacher's tokens) costs nothing.
    q, _ = torch.linalg.qr(torch.randn(7, 7))
    same = targets[0] @ q * torch.rand(2, 9, 1).add(0.5)
    assert manifold_loss(same, targets[0]).item() == pytest.approx(0.0, abs=1e-6)


def test_alignment_objective_adds_the_weighted_manifold_term():
    torch.manual_seed(1)
    projs, targets = [torch.randn(3, 16, 8)], [torch.randn(3, 16, 8)]
    plain = AlignmentObjective("cosine", backend="torch")
    value, manifold = plain.terms(projs, targets)
    assert manifold is None
    weighted = AlignmentObjective("cosine", backend="torch", manifold_weight=3.0)
    total, manifold = weighted.terms(projs, targets)
    expected = _manifold_brute_force(projs, targets)
    assert manifold.item() == pytest.approx(expected.item(), rel=1e-5)
    assert total.item() == pytest.approx(value.item() + 3.0 * expected.item(), rel=1e-5)
    assert weighted(projs, targets).item() == pytest.approx(total.item(), rel=0, abs=0)
    # NT-Xent with global keys: the manifold term reads this micro-batch's rows of the keys.
    keys = [torch.cat([torch.randn(2, 16, 8), targets[0], torch.randn(1, 16, 8)])]
    nt = AlignmentObjective("nt_xent", backend="torch", manifold_weight=2.0).with_keys(keys, 2)
    _, from_keys = nt.terms(projs, None)
    assert from_keys.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="manifold_weight"):
        AlignmentObjective(manifold_weight=-1.0)


# ------------------------------------------------------------------------------------------- target normalisation


def test_spatial_zscore_against_float64():
    torch.manual_seed(2)
    f = torch.randn(2, 16, 6) * 3 + torch.randn(2, 1, 6) * 10  # a large component every token of an image shares
    d = f.double()
    for alpha in (0.0, 0.6, 1.0):
        n = d.shape[1]
        mean = d.sum(1, keepdim=True) / n
        std = (((d - mean) ** 2).sum(1, keepdim=True) / (n - 1)).sqrt()  # unbiased
        torch.testing.assert_close(spatial_zscore(f, alpha).double(), (d - alpha * mean) / (std + 1e-6),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        spatial_zscore(f[:, :1])
    with pytest.raises(ValueError, match="target normalisation"):
        TargetNorm("zscore")


def test_precomputed_and_online_features_get_the_same_normalisation():
    """A features batch (as erw-prepare stores them, CLS first or not) and an images batch through the same tiny
    random teacher give the same targets, patch tokens normalised, REG's CLS token untouched."""
    torch.manual_seed(0)
    encoder = load_encoder("demo-vit-t", resolution=64, pretrained=False)
    images = torch.randint(0, 256, (4, 3, 64, 64)).float()
    teacher = Teacher([encoder], TargetNorm("spatial_zscore", 0.6))
    with torch.no_grad():
        raw = encoder(images, with_cls=True)
    online = teacher.targets({"images": images}, slice(1, 4))[0]
    expected = spatial_zscore(raw[1:4, 1:], 0.6)
    torch.testing.assert_close(online, expected, rtol=0, atol=0)
    for stored in (raw, raw[:, 1:]):  # with and without the CLS token
        torch.testing.assert_close(teacher.targets({"features": stored}, slice(1, 4))[0], online, rtol=0, atol=0)
    # fp16 storage (erw-prepare's) changes the features by rounding only.
    half = teacher.targets({"features": raw.half()}, slice(1, 4))[0]
    torch.testing.assert_close(half, online, rtol=0.02, atol=0.02)
    with_cls = teacher.targets({"features": raw}, slice(1, 4), with_cls=True)[0]
    torch.testing.assert_close(with_cls[:, 0], raw[1:4, 0], rtol=0, atol=0)
    torch.testing.assert_close(with_cls[:, 1:], online, rtol=0, atol=0)
    online_cls = teacher.targets({"images": images}, slice(1, 4), with_cls=True)[0]
    torch.testing.assert_close(online_cls, with_cls, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(("override", "message"), [
    (["alignment.projector_kernel_size=2"], "alignment.projector_kernel_size must be an odd integer ≥ 1 .* got 2"),
    (["alignment.projector_kernel_size=0"], "alignment.projector_kernel_size must be an odd integer ≥ 1 .* got 0"),
    (["alignment.projector=conv1d"], "alignment.projector: 'conv1d' is not one of"),
    (["alignment.target_norm=zscore"], "alignment.target_norm: 'zscore' is not one of"),
    (["alignment.zscore_alpha=1.5"], "alignment.zscore_alpha: must be in \\[0, 1\\], got 1.5"),
    (["alignment.manifold_weight=-1"], "alignment.manifold_weight: must be ≥ 0, got -1.0"),
    (["alignment.projector=conv", "run.mode=reg"], "alignment.projector: 'conv' needs a square token grid"),
    (["alignment.manifold_weight=3", "erw.legacy_warmup_loss=true"], "alignment.manifold_weight: erw.legacy_"),
])
def test_bad_alignment_family_settings_are_one_line_config_errors(override, message):
    base = ["erw.warmup_steps=10", "train.total_steps=20"]
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [*base, *override])
    assert "\n" not in str(error.value)


def test_irepa_preset_is_irepas_ldm_command():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "irepa_sit_xl2.yaml")
    a = config.alignment
    assert config.run.mode == "repa" and config.encoder.names == ["dinov2-vit-b"]
    assert (a.projector, a.projector_kernel_size, a.target_norm, a.zscore_alpha, a.weight) == (
        "conv", 1, "spatial_zscore", 0.6, 1.0)
    assert (a.objective, a.encoder_depth, a.manifold_weight) == ("cosine", 8, 0.0)


# ------------------------------------------------------------------------------------------- the model


def test_conv_projector_transfers_from_phase_1_and_rebuilds_from_its_state_dict(tmp_path):
    from erw_fast.checkpoint_state import export_consolidated
    from erw_fast.cli.loading import load_sit_checkpoint, sit_kwargs_from_state_dict

    kw = dict(input_size=8, patch_size=2, hidden_size=32, depth=3, num_heads=2, num_classes=4, z_dims=[24, 16],
              projector="conv", projector_kernel_size=3)
    torch.manual_seed(0)
    phase1 = SiTPhase1(2, **kw)
    full = SiT(encoder_depth=3, **kw)
    report = transfer_phase1_weights(phase1, full)
    conv_keys = [f"projectors.{i}.projection_layer.{n}" for i in range(2) for n in ("weight", "bias")]
    assert set(conv_keys) <= set(report.copied)
    for key in conv_keys:
        torch.testing.assert_close(full.state_dict()[key], phase1.state_dict()[key], rtol=0, atol=0)
    assert not any(k.startswith("projectors.") and "projection_layer" not in k for k in full.state_dict())
    kwargs = sit_kwargs_from_state_dict(full.state_dict())
    assert (kwargs["projector"], kwargs["projector_kernel_size"], kwargs["z_dims"]) == ("conv", 3, [24, 16])
    # An export with no run config beside it: the file alone rebuilds the conv-projector model.
    args = {"model": "SiT-S/2", "num_heads": 2, "encoder_depth": 3, "projection_layer_type": "conv",
            "proj_kwargs_kernel_size": 3}
    sd = full.state_dict()
    export_consolidated(sd, sd, args, 5, tmp_path / "reference")
    loaded = load_sit_checkpoint(tmp_path / "reference" / "0000005.pt")
    assert isinstance(loaded.model.projectors[0].projection_layer, torch.nn.Conv2d)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y)[1][1], full.eval()(x, t, y)[1][1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- a tiny ERW run


@pytest.mark.slow
def test_erw_run_with_conv_projector_zscore_targets_and_manifold_loss(tmp_path, capsys):
    from erw_fast.cli.loading import load_sit_checkpoint
    from erw_fast.trainer import Trainer

    config = tiny_config(tmp_path, "irepa", *IREPA, "train.total_steps=8", "erw.warmup_steps=4")
    Trainer(config).run()
    out = capsys.readouterr().out
    assert out.count("conv k=3 projector, target normalisation spatial z-score (α 0.6), + 3·U-REPA manifold") == 2
    assert "projectors=yes" in out  # the Phase-1 conv projector went into Phase 2
    records = read(config.run_dir)
    assert [r["phase"] for r in records] == ["warmup"] * 4 + ["full"] * 4
    assert all(0 < r["loss_manifold"] <= 4 for r in records)  # logged unweighted in both phases
    for r in records[4:]:  # the manifold term rides on λ inside loss_align
        assert r["loss"] == pytest.approx(r["loss_diffusion"] + r["lambda"] * r["loss_align"], rel=1e-5)
    exported = torch.load(config.run_dir / "reference" / "0000008.pt", weights_only=True)
    assert exported["model"]["projectors.0.projection_layer.weight"].shape == (192, 32, 3, 3)
    assert (exported["args"]["projection_layer_type"], exported["args"]["proj_kwargs_kernel_size"],
            exported["args"]["spnorm_method"], exported["args"]["zscore_alpha"]) == ("conv", 3, "zscore", 0.6)
    (config.run_dir / "config.yaml").rename(config.run_dir / "elsewhere.yaml")  # only the file itself
    loaded = load_sit_checkpoint(config.run_dir / "reference" / "0000008.pt")
    assert loaded.kwargs["projector"] == "conv" and loaded.kwargs["projector_kernel_size"] == 3
    for key, value in exported["ema"].items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    from erw_fast.checkpoint import latest_checkpoint
    from erw_fast.cli import sample
    from erw_fast.cli.export import export

    # erw-export of the last trainer checkpoint records the conv projector's width as iREPA's SiT reads it.
    again = torch.load(export(latest_checkpoint(config.run_dir), tmp_path / "exported")[0], weights_only=True)
    assert again["args"]["projector_embed_dims"] == "192" and again["args"]["projection_layer_type"] == "conv"

    out_dir = tmp_path / "samples"
    assert sample.main(["--ckpt", str(config.run_dir / "reference" / "0000008.pt"), "--out-dir", str(out_dir),
                        "--num-samples", "2", "--batch-size", "2", "--num-steps", "2", "--vae", "toy"]) == 0
    protocol = json.loads((out_dir / "protocol.json").read_text())
    assert protocol["alignment"] == {"spnorm_method": "zscore", "zscore_alpha": 0.6, "manifold_weight": 3.0,
                                     "projection_layer_type": "conv", "proj_kwargs_kernel_size": 3}
    assert (protocol["model"]["projector"], protocol["model"]["projector_kernel_size"]) == ("conv", 3)
