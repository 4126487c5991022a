"""Precomputed teacher features (data.features): no encoder is built or loaded, the manifest's record of the
encoder is checked against encoder.*, and model.num_classes against the manifest's classes."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch
from _shard_helpers import write_dataset
from _trainer_helpers import read, tiny_config

from erw_fast.config import ConfigError
from erw_fast.encoders.encoder import Encoder
from erw_fast.encoders.teacher import load_teacher
from erw_fast.preflight import problems

# demo-vit-t at 64 px: 16 patch tokens of width 192 (the SiT's 8×8 latents at patch 2 are 16 tokens too).
RECORD = {"encoder": "demo-vit-t", "resolution": 64, "pretrained": False, "weights": "random init (pretrained=False)"}


def _data(tmp_path, **kw):
    root = tmp_path / "data"
    write_dataset(root, num_samples=16, per_shard=8, image_size=64, flip=False, num_classes=4,
                  feature_shape=(16, 192), feature_record=RECORD, **kw)
    return root


def _features_config(tmp_path, data, *extra):
    return tiny_config(tmp_path, "feat", "data.kind=webdataset", f"data.path={data}", "data.features=true",
                       "data.num_workers=0", *extra)


def test_manifest_encoder_mismatch_is_one_line(tmp_path):
    data = _data(tmp_path)
    where = f"{data / 'manifest.json'}"
    assert not problems(_features_config(tmp_path, data))
    cases = {
        "encoder.names=[mocov3-vit-b]": f"encoder.names=['mocov3-vit-b'], but the features in {where} are demo-vit-t's",
        "encoder.pretrained=true": f"encoder.pretrained=true, but the features in {where} come from random weights",
    }
    for override, message in cases.items():
        config = _features_config(tmp_path, data, override)
        found = [line for line in problems(config) if line.startswith("encoder.names:")]
        assert len(found) == 1 and message in found[0] and "\n" not in found[0], problems(config)
        with pytest.raises(ConfigError, match="but the features in"):  # the trainer's own check, without preflight
            load_teacher(config, torch.device("cpu"), 16)


def test_num_classes_against_the_manifest(tmp_path, capsys):
    data = _data(tmp_path)
    assert not problems(_features_config(tmp_path, data, "model.num_classes=6"))
    assert f"model.num_classes=6, but {data / 'manifest.json'} has 4 classes: 2 label embeddings" in \
        capsys.readouterr().err
    found = problems(_features_config(tmp_path, data, "model.num_classes=3"))
    assert any(line.startswith("model.num_classes: 3, but") for line in found)


@pytest.mark.slow
def test_features_run_builds_no_teacher(tmp_path, monkeypatch, capsys):
    import erw_fast.encoders as encoders
    import erw_fast.encoders.encoder as encoder_module

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was built in a data.features run")

    for module, name in ((encoders, "load_encoders"), (encoders, "load_encoder"), (encoder_module, "load_encoder"),
                         (encoder_module, "build_encoder_model")):
        monkeypatch.setattr(module, name, refuse)
    data = _data(tmp_path)
    config = _features_config(tmp_path, data, "train.total_steps=4", "erw.warmup_steps=2", "checkpoint.every=10",
                              "logging.cknna_every=4", "logging.cknna_samples=8")
    assert not problems(config)
    from erw_fast.trainer import Trainer

    trainer = Trainer(config)
    trainer.run()
    out = capsys.readouterr().out
    assert "encoder: none loaded, precomputed demo-vit-t features" in out
    assert "; 0 loader workers (data.num_workers)" in out  # the data line says the worker count
    assert trainer.teacher.encoders == [] and trainer.teacher.z_dims == [192]
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Encoder]  # no encoder module anywhere in memory
    records = read(config.run_dir)
    aligned = [r for r in records if "loss_align" in r or "loss_proj" in r]
    assert aligned and all(math.isfinite(r.get("loss_align", r.get("loss_proj"))) for r in aligned)
    monitor = [json.loads(line) for line in (config.run_dir / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in monitor] == [4] and len(monitor[0]["cknna"]) == 4  # CKNNA on the features, per block
    assert all(math.isfinite(v) for v in monitor[0]["cknna"])
