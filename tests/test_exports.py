"""Exports describe their model: the file alone rebuilds it (here and for the reference code's key layout), a
warmup export describes the Phase-1 model, and the released ERW code's RoPE SiT samples with erw-sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _trainer_helpers import short_demo_run

from erw_fast.checkpoint import import_reference_checkpoint, list_checkpoints
from erw_fast.cli import export, sample
from erw_fast.cli.loading import load_sit_checkpoint
from erw_fast.models import SiT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory):
    """The demo's non-standard SiT (6 blocks, width 128, 4 heads under the name SiT-S/2), RoPE in Phase 2."""
    return short_demo_run(tmp_path_factory.mktemp("runs"), "model.use_rope=true")


@pytest.mark.slow
def test_an_export_alone_rebuilds_its_model_and_samples(rope_run, tmp_path):
    config = rope_run
    alone = tmp_path / "elsewhere" / "0000006.pt"  # no run config beside it
    alone.parent.mkdir()
    shutil.copy(config.run_dir / "reference" / "0000006.pt", alone)
    args = import_reference_checkpoint(alone)["args"]
    assert (args["depth"], args["hidden_size"], args["num_heads"], args["use_rope"]) == (6, 128, 4, True)
    assert args["encoder_depth"] == config.alignment.encoder_depth and args["phase"] == "full"

    loaded = load_sit_checkpoint(alone)
    assert loaded.config is None  # rebuilt from the export's args and tensors alone
    expected = SiT(**config.model.sit_kwargs([int(d) for d in args["projector_embed_dims"].split(",")]),
                   encoder_depth=config.alignment.encoder_depth)
    assert loaded.kwargs["num_heads"] == 4 and loaded.model.feat_rope is not None
    ema = import_reference_checkpoint(alone)["ema"]
    expected.load_state_dict(ema, strict=True)  # the reference key layout, RoPE tables included
    assert "feat_rope.freqs_cos" in ema
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9]), torch.tensor([1, 8])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y)[0], expected.eval()(x, t, y)[0], rtol=0, atol=0)

    out = tmp_path / "samples"
    argv = ["--ckpt", str(alone), "--out-dir", str(out), "--num-samples", "4", "--batch-size", "4", "--num-steps",
            "2", "--vae", "toy", "--image-size", "64"]
    assert sample.main(argv) == 0
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 64, 64, 3)


@pytest.mark.slow
def test_a_warmup_export_describes_the_phase1_model(rope_run, tmp_path):
    config = rope_run
    [phase1] = [p for p in list_checkpoints(config.run_dir) if "phase1" in p.name]
    assert export.main([str(phase1), "--out", str(tmp_path)]) == 0
    [written] = tmp_path.glob("*.pt")
    args = import_reference_checkpoint(written)["args"]
    assert args["phase"] == "warmup" and args["encoder_depth"] == args["l2r_depth"] == config.erw.warmup_depth
    assert args["use_rope"] is False  # the warmup model has no RoPE, whatever model.use_rope says
    assert not any(k.startswith(("final_layer.", "feat_rope.")) for k in import_reference_checkpoint(written)["model"])


def test_the_released_erw_rope_checkpoint_samples(golden_dir, tmp_path):
    """The released code's Phase-2 SiT with RoPE, in its checkpoint layout: loads strictly and samples."""
    g = torch.load(golden_dir / "erw" / "erw_rope_state_dict.pt", weights_only=True)
    r = json.loads((golden_dir / "erw" / "config.json").read_text())["rope"]
    ckpt = tmp_path / "0300000.pt"
    args = {"model": "SiT-S/2", "encoder_depth": r["encoder_depth"], "use_rope": True, "num_classes": 10,
            "projector_embed_dims": "32", "path_type": "linear", "resolution": 64}
    torch.save({"model": g["state_dict"], "ema": g["state_dict"], "opt": {}, "args": args, "steps": 300000}, ckpt)
    run_config = tmp_path / "config.yaml"  # the reference's args name no head count for a custom width
    run_config.write_text(yaml.safe_dump({"model": {
        "name": "SiT-S/2", "input_size": r["input_size"], "depth": r["depth"], "hidden_size": r["hidden_size"],
        "num_heads": r["num_heads"], "num_classes": r["num_classes"], "projector_dim": r["projector_dim"],
        "use_rope": True}, "alignment": {"encoder_depth": r["encoder_depth"]},
        "encoder": {"names": ["demo-vit-t"], "resolution": 64}, "data": {"image_size": 64}}))
    loaded = load_sit_checkpoint(ckpt, config_path=run_config)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(g["x"], g["t"], g["y"])[0], g["v"], rtol=1e-5, atol=1e-6)
    out = tmp_path / "samples"
    argv = ["--ckpt", str(ckpt), "--config", str(run_config), "--out-dir", str(out), "--num-samples", "2",
            "--batch-size", "2", "--num-steps", "2", "--vae", "toy", "--image-size", "64"]
    assert sample.main(argv) == 0
    assert (out / "samples.npz").is_file()
