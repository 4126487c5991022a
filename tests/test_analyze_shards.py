"""erw-analyze --data: held-out images, labels and noise-free latents from a prepared dataset."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from _shard_helpers import SCALE, write_dataset
from _trainer_helpers import tiny_config

from erw_fast.cli import analyze
from erw_fast.models import SiT


def test_held_out_from_shards_are_the_stored_samples(tmp_path):
    truth = write_dataset(tmp_path / "data", num_samples=10, per_shard=4, image_size=32, features=False)
    args = argparse.Namespace(data=str(tmp_path / "data"), num_samples=6, seed=3)
    images, latents, labels = analyze._from_shards(args, SimpleNamespace(in_channels=4, input_size=4))
    picked = [next(i for i in range(10) if np.array_equal(truth["images"][i], img))
              for img in images.permute(0, 2, 3, 1).numpy()]
    assert len(set(picked)) == 6 and picked == sorted(picked)
    assert labels.tolist() == truth["labels"][picked].tolist()
    mean = truth["moments"][picked][:, :4].astype(np.float64) * SCALE  # posterior mean × the manifest's scale
    np.testing.assert_allclose(latents.double().numpy(), mean, rtol=1e-6)
    with pytest.raises(ValueError, match="the model takes 4×8²"):
        analyze._from_shards(args, SimpleNamespace(in_channels=4, input_size=8))


@pytest.mark.slow
def test_analyze_runs_on_a_prepared_dataset(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, num_samples=16, per_shard=8, image_size=64, features=False, num_classes=4)
    config = tiny_config(tmp_path, "run", "data.kind=webdataset", f"data.path={data}")
    run = tmp_path / "run"
    (run / "reference").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    torch.manual_seed(0)
    model = SiT(**config.model.sit_kwargs([192]), encoder_depth=3)
    sd = model.state_dict()
    torch.save({"model": sd, "ema": sd, "args": {}, "steps": 1}, run / "reference" / "0000001.pt")
    out = tmp_path / "analysis"
    assert analyze.main(["--ckpt", str(run / "reference" / "0000001.pt"), "--out-dir", str(out), "--data", str(data),
                         "--num-samples", "12", "--topk", "3", "--t", "0.5"]) == 0
    results = json.loads((out / "cknna.json").read_text())
    assert results["num_samples"] == 12 and str(data) in results["held_out"]
    assert len(results["cknna"]["demo-vit-t"]["0.5"]) == 4
