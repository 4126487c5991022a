"""Untrusted inputs (issue #17): no file the trainer or the tools read runs code or points outside its directory,
a flipped bit in a checkpoint is refused, non-finite data names its sample, and file problems end in one line.

Payloads here are real: a pickle whose unpickling runs ``os.system("touch …")`` and a TorchScript archive whose
``__setstate__`` writes a file. Each test checks that the marker file was not written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple  # noqa: UP035 - TorchScript needs typing.Tuple in the annotations it compiles

import numpy as np
import pytest
import torch
from _shard_helpers import make_loader, write_dataset
from _trainer_helpers import REPO, TINY, tiny_config

from erw_fast import checkpoint as ckpt
from erw_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from erw_fast.cli import export as export_cli
from erw_fast.data.shards import MEMBER_MOMENTS, DataError, Manifest, SampleError, ShardSet
from erw_fast.errors import one_line, one_line_errors
from erw_fast.trainer import main


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _deepspeed_state(tmp_path: Path, **engine) -> dict:
    return {"step": 4, "phase": "full", "config": tiny_config(tmp_path, "crafted").to_dict(),
            "ema": {"w": torch.zeros(2)}, "engine": {"kind": "deepspeed", "zero_stage": 1, "world_size": 1,
                                                     "precision": "fp32", **engine}}


def _plant_payload(directory: Path, marker: Path) -> None:
    """DeepSpeed-named files (model and optimizer states) that run the payload when fully unpickled."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"buffer_names": [], "module": _Payload(marker)}, directory / name)


# ------------------------------------------------------------------------------------------ DeepSpeed files


@pytest.mark.parametrize("engine", [
    {"dir": "../../evil", "tag": "step_0000004"},
    {"dir": "deepspeed", "tag": "../../../evil/step_0000004"},
    {"dir": "/tmp", "tag": "step_0000004"},
    {"dir": "deepspeed", "tag": "step_0000004", "symlink": True},
], ids=["dir", "tag", "absolute-dir", "symlink"])
def test_a_crafted_deepspeed_location_is_refused_before_anything_is_read(tmp_path, capsys, engine):
    marker = tmp_path / "pwned"
    _plant_payload(tmp_path / "evil" / "step_0000004", marker)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    if engine.pop("symlink", False):
        (checkpoints / "deepspeed").mkdir()
        (checkpoints / "deepspeed" / "step_0000004").symlink_to(tmp_path / "evil" / "step_0000004")
    path = checkpoints / "step_0000004.pt"
    torch.save(_deepspeed_state(tmp_path, **engine), path)  # plain data: passes weights_only=True itself

    assert export_cli.main([str(path)]) == 2  # erw-export
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "refusing" in err
    assert ("engine.dir" in err) or ("engine.tag" in err)
    # erw-sample / erw-analyze / checkpoint.init_from_reference read it through import_reference_checkpoint
    with pytest.raises(CheckpointError, match="refusing"):
        ckpt.import_reference_checkpoint(path)
    assert not marker.exists()


def test_deepspeed_files_holding_a_pickle_payload_are_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoints = tmp_path / "run" / "checkpoints"
    _plant_payload(checkpoints / "deepspeed" / "step_0000004", marker)
    path = checkpoints / "step_0000004.pt"
    torch.save(_deepspeed_state(tmp_path, dir="deepspeed", tag="step_0000004"), path)

    assert export_cli.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mp_rank_00_model_states.pt: refused to load this DeepSpeed file" in err and "posix.system" in err
    with pytest.raises(CheckpointError, match="refused to load this DeepSpeed file"):
        ckpt.import_reference_checkpoint(path)
    assert not marker.exists()


_REAL_DEEPSPEED = """
import sys, torch
from erw_fast.engines.deepspeed_files import deepspeed_safe_globals
from erw_fast.trainer import Trainer
from _trainer_helpers import tiny_config
config = tiny_config(sys.argv[1], "ds", "engine.zero_stage=1", "train.precision=bf16", "train.total_steps=5",
                     "erw.warmup_steps=3", "checkpoint.every=100")
Trainer(config, engine="deepspeed").run()
allowed = {f"{g.__module__}.{g.__qualname__}" for g in deepspeed_safe_globals()}
files = sorted((config.run_dir / "checkpoints" / "deepspeed").rglob("*.pt"))
assert files
for f in files:
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    assert needed <= allowed, (f, needed - allowed)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_real_deepspeed_checkpoints_need_only_the_allow_list_and_export_through_it(tmp_path):
    pytest.importorskip("deepspeed")
    result = subprocess.run([sys.executable, "-c", _REAL_DEEPSPEED, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [pt, *_] = export_cli.export(tmp_path / "ds" / "checkpoints" / "step_0000005.pt", tmp_path / "export")
    offline, in_run = (torch.load(p, weights_only=True) for p in (pt, tmp_path / "ds" / "reference" / "0000005.pt"))
    assert all(torch.equal(offline["model"][k], in_run["model"][k]) for k in in_run["model"])


# ------------------------------------------------------------------------------------------ encoder weights


class _WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose __setstate__, run by torch.jit.load, creates and fills the file ``target``."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:  # noqa: UP006
        return (self.w, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:  # noqa: UP006
        self.w = state[0]
        self.target = state[1]
        written = torch.from_file(self.target, True, 16, dtype=torch.uint8).fill_(33)
        self.training = state[2] and bool(written.sum() > 0)


def _torchscript_archive(tmp_path: Path) -> tuple[Path, Path]:
    marker, archive = tmp_path / "pwned", tmp_path / "encoder.pt"
    torch.jit.script(_WritesOnLoad(str(marker))).save(str(archive))
    assert not marker.exists()
    return archive, marker


def test_an_unknown_torchscript_archive_is_refused(tmp_path, monkeypatch):
    from erw_fast.encoders import checkpoints as enc_ckpt

    archive, marker = _torchscript_archive(tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(enc_ckpt.EncoderWeightsError, match=f"TorchScript archive \\(sha256 {digest}\\) that is not a "
                                                           "known release.*encoder.trust_torchscript=true"):
        enc_ckpt.read_checkpoint(archive)
    assert not marker.exists()
    # Why: loading it runs its code. A known release's hash, or the explicit trust, lets it load.
    monkeypatch.setitem(enc_ckpt.KNOWN_TORCHSCRIPT_SHA256, digest, "a test release")
    assert set(enc_ckpt.read_checkpoint(archive)) == {"w"}
    assert marker.exists()
    marker.unlink()
    monkeypatch.delitem(enc_ckpt.KNOWN_TORCHSCRIPT_SHA256, digest)
    assert set(enc_ckpt.read_checkpoint(archive, trust_torchscript=True)) == {"w"}


def test_the_run_config_refuses_a_torchscript_teacher_unless_trusted(tmp_path):
    from erw_fast.encoders import EncoderWeightsError, load_encoders

    archive, marker = _torchscript_archive(tmp_path)
    with pytest.raises(EncoderWeightsError, match="not a known release"):
        load_encoders(["demo-vit-t"], resolution=64, weights_paths=[archive])
    assert not marker.exists()
    with pytest.raises(EncoderWeightsError, match="do not fit encoder 'demo-vit-t'"):  # read, then not a ViT
        load_encoders(["demo-vit-t"], resolution=64, weights_paths=[archive], trust_torchscript=True)
    assert tiny_config(tmp_path, "t", "encoder.trust_torchscript=true").encoder.trust_torchscript


def test_published_hashes_are_read_from_release_urls():
    from erw_fast.encoders.encoder import published_sha256
    from erw_fast.encoders.registry import ENCODER_SPECS

    clip = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
    assert published_sha256(f"https://openaipublic.azureedge.net/clip/models/{clip}/ViT-L-14.pt") == clip
    assert published_sha256("https://download.pytorch.org/models/resnet18-f37072fd.pth") == "f37072fd"
    # The releases the registry downloads publish none (their files are still read with weights_only=True).
    assert all(published_sha256(s.weights_url) is None for s in ENCODER_SPECS.values() if s.weights_url)


def test_release_downloads_are_checked_against_the_published_hash(tmp_path, monkeypatch):
    import dataclasses

    from erw_fast.encoders import EncoderWeightsError
    from erw_fast.encoders import encoder as enc
    from erw_fast.encoders.registry import get_encoder_spec

    weights = tmp_path / "weights.pt"
    torch.save(enc.build_encoder_model("demo-vit-t", 64).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append(hash_prefix)
        Path(dst).write_bytes(weights.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    spec = dataclasses.replace(get_encoder_spec("demo-vit-t"), weights_url=f"https://x/models/{digest}/demo.pt")
    raw, source = enc._fetch_pretrained(spec, 64, None)
    assert calls == [digest] and "sha256 verified" in source and set(raw) == set(torch.load(weights))
    cached = tmp_path / "hub" / "checkpoints" / "demo.pt"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 1  # the cached copy changes
    cached.write_bytes(bytes(data))
    with pytest.raises(EncoderWeightsError, match="demo.pt is not the file its release publishes"):
        enc._fetch_pretrained(spec, 64, None)


def test_hugging_face_cache_files_are_checked_against_their_published_sha256(tmp_path):
    from erw_fast.encoders.encoder import corrupt_hub_files

    content = b"weights"
    digest = hashlib.sha256(content).hexdigest()
    repo = tmp_path / "models--timm--demo"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(content)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model.safetensors").symlink_to(repo / "blobs" / digest)
    assert corrupt_hub_files("timm/demo", cache_dir=str(tmp_path)) == []
    (repo / "blobs" / digest).write_bytes(b"weightz")
    assert corrupt_hub_files("timm/demo", cache_dir=str(tmp_path)) == [
        str(repo / "snapshots" / "abc123" / "model.safetensors")]


# ------------------------------------------------------------------------------------------ checkpoint checksums


def _flip_a_bit(path: Path, pattern: torch.Tensor) -> None:
    """Flip one bit inside the stored bytes of the tensor holding ``pattern``."""
    data = bytearray(path.read_bytes())
    at = bytes(data).find(pattern.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_saved_tensor_is_refused_naming_the_last_good_checkpoint(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32) * 0.37
    good = save_checkpoint({"model": {"w": weights}}, tmp_path, step=1)
    broken = save_checkpoint({"model": {"w": weights}}, tmp_path, step=2)
    worse = save_checkpoint({"model": {"w": weights}}, tmp_path, step=3)
    _flip_a_bit(worse, weights)
    _flip_a_bit(broken, weights)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(worse)
    message = str(info.value)
    assert f"checkpoint {worse} is corrupt: tensor /model/w is changed since it was saved" in message
    # step 2 is corrupt too: the suggestion skips it
    assert f"resume from the previous checkpoint {good}, the last good one: checkpoint.resume={good}" in message
    assert "\n" not in message
    assert torch.equal(load_checkpoint(good)["model"]["w"], weights)
    with pytest.raises(CheckpointError, match=f"checkpoint {worse} is corrupt"):  # erw-sample, erw-analyze
        ckpt.import_reference_checkpoint(worse)


def test_checkpoints_written_before_checksums_load_unverified(tmp_path):
    old = tmp_path / "checkpoints" / "step_0000001.pt"
    old.parent.mkdir()
    torch.save({"step": 1, "w": torch.ones(3)}, old)
    assert load_checkpoint(old)["step"] == 1


@pytest.mark.slow
def test_resume_auto_from_a_corrupt_latest_checkpoint_says_which_to_resume_from(tmp_path, capsys):
    args = [*TINY, f"run.output_dir={tmp_path}", "run.name=r", "train.max_steps_per_run=9"]
    assert main(args) == 0
    latest = tmp_path / "r" / "checkpoints" / "step_0000009.pt"
    state = torch.load(latest, weights_only=True)
    _flip_a_bit(latest, state["ema"]["final_layer.linear.weight"].reshape(-1)[:16].clone())
    capsys.readouterr()
    assert one_line_errors(lambda: main(args)) == 1
    err = capsys.readouterr().err.strip()
    previous = tmp_path / "r" / "checkpoints" / "step_0000008.pt"
    assert len(err.splitlines()) == 1
    assert f"checkpoint {latest} is corrupt: tensor /ema/final_layer.linear.weight" in err
    assert f"checkpoint.resume={previous}" in err
    assert main([*args, f"checkpoint.resume={previous}"]) == 0  # what the message says works


# ------------------------------------------------------------------------------------------ data


def _poison_moments(root: Path, index: int) -> str:
    """Store NaN in the latent moments of sample ``index`` (same bytes length); returns the shard name."""
    shards = ShardSet(root)
    j = shards.members.index(MEMBER_MOMENTS)
    sid = shards.shard_of(index)
    off, size = int(shards.offsets[index, j]), int(shards.sizes[index, j])
    tar = root / shards.manifest.shards[sid].tar
    data = bytearray(tar.read_bytes())
    data[off + size - 8: off + size] = np.full(4, np.nan, np.float16).tobytes()
    tar.write_bytes(bytes(data))
    return shards.manifest.shards[sid].name


def _nan_loader(root, **kw):
    args = dict(global_batch_size=8, seed=7, image_size=32, num_workers=0)
    return make_loader("webdataset", root, **{**args, **kw})


def test_non_finite_latents_name_their_sample_or_are_skipped(tmp_path):
    write_dataset(tmp_path, image_format="png", flip=False, features=False)
    with _nan_loader(tmp_path) as loader:
        bad = loader.sampler.indices(1)[3]
    shard = _poison_moments(tmp_path, bad)
    with pytest.raises(SampleError, match=f"shard {shard}, key {bad:08d}: moments.npy holds NaN or inf values"):
        with _nan_loader(tmp_path) as loader:
            [next(loader) for _ in range(2)]
    with _nan_loader(tmp_path, on_error="skip") as loader:
        batches = [next(loader) for _ in range(3)]
        assert loader.skipped == 1
    assert batches[1]["indices"][3].item() == (bad + 1) % 40  # replaced by the next readable sample
    assert all(torch.isfinite(b["latents"]).all() for b in batches)


@pytest.mark.multiprocess
def test_a_worker_process_reports_the_sample_in_one_line(tmp_path):
    write_dataset(tmp_path, image_format="png", flip=False, features=False)
    with _nan_loader(tmp_path) as loader:
        bad = loader.sampler.indices(0)[0]
    shard = _poison_moments(tmp_path, bad)
    with pytest.raises(SampleError) as info:
        with _nan_loader(tmp_path, num_workers=1) as loader:
            next(loader)
    assert one_line(info.value).endswith(f"shard {shard}, key {bad:08d}: moments.npy holds NaN or inf values")


def test_a_broken_manifest_is_one_line_naming_the_file(tmp_path):
    write_dataset(tmp_path, image_format="png")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:-40])  # cut short, as by a full disk or an interrupted copy
    with pytest.raises(DataError) as info:
        Manifest.load(tmp_path)
    assert str(info.value).startswith(f"{manifest} is damaged: not valid JSON (")
    assert "rerun erw-prepare" in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ disk full


def _full_disk_save(obj, f, *args, **kwargs):
    """torch.save as it fails on a full disk: its own RuntimeError, the ENOSPC only in the chain."""
    f.write(b"PK\x03\x04 partial")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as full:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from full


def test_disk_full_during_a_checkpoint_names_enospc_and_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.torch, "save", _full_disk_save)
    with pytest.raises(OSError) as info:
        save_checkpoint({"w": torch.ones(2)}, tmp_path, step=4)
    assert info.value.errno == errno.ENOSPC
    target = tmp_path / "checkpoints" / "step_0000004.pt"
    assert f"No space left on device (ENOSPC) while writing {target}; nothing was replaced" in str(info.value)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the temp file went too


def test_the_tools_report_a_full_disk_in_one_line(capsys):
    import argparse

    from erw_fast.cli import run_cli

    def run(args):
        raise OSError(errno.ENOSPC, "No space left on device (ENOSPC) while writing out/0000100.pt")

    assert run_cli("erw-export", argparse.ArgumentParser(), run, []) == 2
    assert capsys.readouterr().err == "erw-export: error: [Errno 28] No space left on device (ENOSPC) while " \
                                      "writing out/0000100.pt\n"


@pytest.mark.slow
def test_the_trainer_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ckpt.torch, "save", _full_disk_save)
    assert one_line_errors(lambda: main([*TINY, f"run.output_dir={tmp_path}"])) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: [Errno 28] No space left on device (ENOSPC) while writing ")
    assert "step_0000004.pt" in err and len(err.splitlines()) == 1
    with pytest.raises(OSError):  # --debug: the exception, with its traceback
        one_line_errors(lambda: main([*TINY, f"run.output_dir={tmp_path}", "run.name=debug"]), debug=True)
