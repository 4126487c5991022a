"""Pre-flight (issue #17): every bad config ends in clean ``config error:`` lines and exit code 2, before any model,
encoder or engine is built and before the run directory exists. Run through ``trainer.main`` in-process, plus one
``python train.py`` to show that no traceback reaches the terminal."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from _shard_helpers import write_dataset
from _trainer_helpers import REPO, TINY, tiny_config

import erw_fast.preflight as preflight_module
import erw_fast.trainer as trainer_module
from erw_fast.config import load_config
from erw_fast.preflight import problems

# One line: `config error: <key>: <why> (<what to do>)`
LINE = re.compile(r"^config error: [\w.\[\]]+: .+ \(.+\)$")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A prepared dataset matching TINY's model: 64 px images, 4×8×8 latents, 4 classes."""
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, num_samples=24, image_size=64, num_classes=4, flip=False, features=False)
    return root


def _broken_manifest(tmp_path, shards):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "manifest.json").write_text((shards / "manifest.json").read_text()[:-30])
    return ["data.kind=webdataset", f"data.path={root}"]


def _ds_json(content):
    def setup(tmp_path, shards):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(content) if not isinstance(content, str) else content)
        return ["--deepspeed_config", str(path)]
    return setup


def _shards(*overrides):
    return lambda tmp_path, shards: ["data.kind=webdataset", f"data.path={shards}", "data.num_workers=0", *overrides]


def _file_as_output_dir(tmp_path, shards):
    (tmp_path / "afile").write_text("")
    return [f"run.output_dir={tmp_path / 'afile'}"]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

# (id, overrides or a setup(tmp_path, shards) -> overrides, a package to hide, what the error line says[, marks])
CASES = [
    ("every-0", ["checkpoint.every=0"], None, "checkpoint.every: must be ≥ 1, got 0"),
    ("every-negative", ["checkpoint.every=-4"], None, "checkpoint.every: must be ≥ 1, got -4"),
    ("log-every-0", ["logging.log_every=0"], None, "logging.log_every: must be ≥ 1, got 0"),
    ("sample-cfg-below-1", ["logging.sample_cfg_scale=0.5"], None, "logging.sample_cfg_scale: must be ≥ 1, got 0.5"),
    ("nonfinite-0", ["train.max_nonfinite_steps=0"], None, "train.max_nonfinite_steps: must be ≥ 1, got 0"),
    ("steps-per-run-0", ["train.max_steps_per_run=0"], None, "train.max_steps_per_run: must be ≥ 1"),
    ("negative-lr", ["optim.lr=-1e-4"], None, "optim.lr: must be ≥ 0"),
    ("eps-0", ["optim.eps=0"], None, "optim.eps: must be > 0"),
    ("beta-1", ["optim.betas=[0.9,1.0]"], None, "optim.betas: must be two values in [0, 1)"),
    ("dropout-above-1", ["model.class_dropout_prob=1.5"], None, "model.class_dropout_prob: must be in [0, 1]"),
    ("workers-negative", ["data.num_workers=-1"], None, "data.num_workers: must be ≥ 0"),
    ("prefetch-0", ["data.prefetch=0"], None, "data.prefetch: must be ≥ 1"),
    ("seed-negative", ["run.seed=-1"], None, "run.seed: must be ≥ 0"),
    ("cknna-t", ["logging.cknna_t=2"], None, "logging.cknna_t: must be in [0, 1]"),
    ("cuda-on-cpu", ["run.device=cuda"], None, "run.device: cuda requested, but there is no usable CUDA", NO_CUDA),
    ("not-a-device", ["run.device=gpu0"], None, "run.device: 'gpu0' is not a device"),
    ("name-escapes", ["run.name=../.."], None, "run.name: '../..' does not name a directory inside run.output_dir"),
    ("name-absolute", ["run.name=/tmp/elsewhere"], None, "run.name: '/tmp/elsewhere' does not name a directory"),
    ("output-dir-is-a-file", _file_as_output_dir, None, "is not a directory"),
    ("micro-batch", ["train.micro_batch_size=3"], None, "train.micro_batch_size: 3 does not divide the per-device "
                                                        "batch 8"),
    ("demo-too-small", ["data.num_samples=4"], None, "data.num_samples: 4 samples cannot fill one global batch"),
    ("demo-flip", ["data.flip=true"], None, "data.flip: the demo dataset has no flipped moments"),
    ("no-data-path", ["data.kind=webdataset"], None, "data.path: data.kind=webdataset reads prepared shards, but "
                                                     "data.path is not set"),
    ("missing-data-path", ["data.kind=webdataset", "data.path=/nonexistent/imagenet256"], None,
     "data.path: /nonexistent/imagenet256 does not exist"),
    ("broken-manifest", _broken_manifest, None, "manifest.json is damaged: not valid JSON"),
    ("latent-size", _shards("model.input_size=16", "model.patch_size=4"), None,
     "model.input_size: 16, but"),
    ("latent-channels", _shards("model.in_channels=8"), None, "model.in_channels: 8, but"),
    ("num-classes", _shards("model.num_classes=3"), None, "model.num_classes: 3, but"),
    ("image-size", _shards("data.image_size=128", "encoder.resolution=128"), None, "data.image_size: 128, but"),
    ("shard-flip", _shards("data.flip=true"), None, "data.flip: true, but"),
    ("batch-beyond-dataset", _shards("train.global_batch_size=32"), None, "train.global_batch_size: 32 is more than"),
    ("dali-mixed-on-cpu", _shards("data.kind=dali", "data.dali_decoder=mixed"), None,
     "data.dali_decoder: the mixed (GPU) decoder needs CUDA"),
    ("unknown-encoder", ["encoder.names=[dinov3-vit-b]"], None, "encoder.names: unknown encoder 'dinov3-vit-b'"),
    ("encoder-resolution", ["encoder.resolution=128"], None, "encoder.resolution: 128, but the data provides 64 px"),
    ("token-count", ["model.patch_size=4"], None, "encoder.names: token-count mismatch"),
    ("weights-missing", ["encoder.pretrained=true", "encoder.weights_paths=[/missing/dinov2.pth]"], None,
     "encoder.weights_paths[0]: /missing/dinov2.pth does not exist"),
    ("weights-without-pretrained", ["encoder.weights_paths=[/missing/dinov2.pth]"], None,
     "encoder.weights_paths: given with encoder.pretrained=false"),
    ("ds-conflict", _ds_json({"train_batch_size": 512}), None,
     "engine.deepspeed_config: the DeepSpeed JSON disagrees with the run config (change one of them): "
     "train_batch_size = 512 in"),
    ("ds-refused-key", _ds_json({"scheduler": {"type": "WarmupLR"}}), None, "'scheduler' is not supported here"),
    ("ds-not-json", _ds_json("{stage: 2"), None, "ds.json: not valid JSON"),
    ("ds-missing", ["engine.deepspeed_config=/missing/ds.json"], None, "DeepSpeed config not found"),
    ("no-tensorboard", ["logging.tensorboard=true"], "tensorboard",
     "logging.tensorboard: TensorBoard logging needs the tensorboard package, which is not installed (pip install "
     "'erw-fast[tb]'"),
    ("no-wandb", ["logging.wandb=true"], "wandb",
     "logging.wandb: W&B logging needs the wandb package, which is not installed (pip install 'erw-fast[wandb]'"),
    ("no-dali", _shards("data.kind=dali"), "nvidia.dali", "data.kind: the DALI loader needs the nvidia.dali package"),
    ("no-triton", ["alignment.backend=triton"], "triton", "alignment.backend: the Triton alignment backend needs"),
    ("no-deepspeed", ["engine.kind=deepspeed"], "deepspeed", "engine.kind: the DeepSpeed engine needs the deepspeed"),
    ("no-matplotlib", ["logging.plot=true"], "matplotlib", "logging.plot: the loss-curve plot needs the matplotlib"),
    ("resume-missing", ["checkpoint.resume=/missing/step_0001000.pt"], None,
     "checkpoint.resume: /missing/step_0001000.pt does not exist"),
    ("reference-missing", ["checkpoint.init_from_reference=/missing/0300000.pt"], None,
     "checkpoint.init_from_reference: /missing/0300000.pt does not exist"),
    ("cknna-beyond-dataset", ["logging.cknna_every=5", "logging.cknna_samples=1000"], None,
     "logging.cknna_samples: 1000 is more than the dataset's 64 samples"),
    ("fid-inception-missing", ["logging.fid_every=5", "logging.fid_inception=/missing/pt_inception.pth"], None,
     "logging.fid_inception: /missing/pt_inception.pth does not exist"),
    ("sample-vae-missing", ["logging.sample_every=5", "logging.sample_vae=/missing/vae"], None,
     "logging.sample_vae: /missing/vae does not exist"),
]


@pytest.mark.parametrize("overrides, hidden, expected",
                         [pytest.param(*c[1:4], id=c[0], marks=c[4:]) for c in CASES])
def test_bad_config_is_one_clean_line_before_anything_is_built(tmp_path, shards, capsys, monkeypatch, overrides,
                                                               hidden, expected):
    if callable(overrides):
        overrides = overrides(tmp_path, shards)
    if hidden is not None:
        real = preflight_module._installed
        monkeypatch.setattr(preflight_module, "_installed", lambda module: module != hidden and real(module))

    def never(*args, **kwargs):
        raise AssertionError("the Trainer was built for a bad config")

    monkeypatch.setattr(trainer_module, "Trainer", never)
    out_dir = tmp_path / "runs"
    argv = [*TINY, f"run.output_dir={out_dir}", "run.name=bad", *overrides]
    argv = _flags_first(argv)
    assert trainer_module.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and all(line.startswith("config error: ") for line in lines), captured.err
    assert any(expected in line for line in lines), captured.err
    assert all(LINE.match(line) for line in lines if expected in line), lines
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out_dir.exists()


def _flags_first(argv):
    """--deepspeed_config PATH pairs before the key=value overrides (argparse's positional list comes last)."""
    flags, rest, i = [], [], 0
    while i < len(argv):
        if argv[i].startswith("--"):
            flags += argv[i:i + 2]
            i += 2
        else:
            rest.append(argv[i])
            i += 1
    return flags + rest


def test_every_problem_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight_module, "_installed", lambda module: module not in ("tensorboard", "wandb"))
    config = tiny_config(tmp_path, "many", "logging.tensorboard=true", "logging.wandb=true", "run.name=../x",
                         "checkpoint.resume=/missing.pt")
    found = problems(config)
    assert [line.split(":")[0] for line in found] == ["run.name", "logging.tensorboard", "checkpoint.resume"]


@pytest.mark.parametrize("name", ["demo", "erw_sit_b2"])
def test_good_configs_pass(tmp_path, shards, name):
    assert problems(tiny_config(tmp_path)) == []
    assert problems(tiny_config(tmp_path, "s", "data.kind=webdataset", f"data.path={shards}")) == []
    preset = load_config(REPO / "configs" / f"{name}.yaml", [f"run.output_dir={tmp_path}", "run.device=cpu"] +
                         ([f"data.path={shards}"] if name != "demo" else []))
    found = problems(preset)
    if name == "demo":
        assert found == []
    else:  # the ImageNet preset against the tiny test shards: only the data/shape mismatches are reported
        assert found and all(line.split(":")[0] in ("data.image_size", "encoder.names", "encoder.resolution")
                             for line in found), found


@pytest.mark.multiprocess
def test_train_py_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, f"run.output_dir={tmp_path}",
                             "checkpoint.every=0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: checkpoint.every: must be ≥ 1, got 0 (steps between checkpoints)"
    assert not (tmp_path / "run").exists()
