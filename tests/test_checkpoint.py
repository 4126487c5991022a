"""Checkpoint I/O: plain-data round trips, RNG resume, crash safety, rotation, reference layout."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from erw_fast import checkpoint as ckpt
from erw_fast.checkpoint import (
    capture_rng_state,
    export_reference_checkpoint,
    export_safetensors,
    import_reference_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _assert_equal(a, b, path="state"):
    """Structural equality; tensors bitwise (dtype, shape, device and bytes)."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.device == b.device, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _training_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "ema": {k: v.detach().clone().to(torch.bfloat16) for k, v in model.state_dict().items()},
        "opt": opt.state_dict(),
        "step": 7,
        "loss": 0.125,
        "name": "sit-b-2",
        "nested": {"lst": [1, 2.5, "x", None, True, [3, (4, 5)]], "size": torch.Size([2, 3]), "dtype": torch.float16},
        "rng": capture_rng_state(),
    }


def test_round_trip_weights_only(tmp_path):
    state = _training_state()
    path = save_checkpoint(state, tmp_path, step=7)
    assert path == tmp_path / "checkpoints" / "step_0000007.pt"
    loaded = load_checkpoint(path)
    _assert_equal(state, loaded)
    # load_checkpoint promises weights_only; check it independently too (the file adds the tensors' checksums).
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw.pop(ckpt.CHECKSUM_KEY) == ckpt.tensor_checksums(state)
    _assert_equal(state, raw)
    # The AdamW state actually took a step (so its per-parameter tensors were exercised).
    assert all(int(s["step"]) == 1 for s in loaded["opt"]["state"].values())
    fresh = nn.Linear(4, 3)
    fresh.load_state_dict(loaded["model"], strict=True)


def test_rng_capture_restore():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.standard_normal()  # leave a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and one in Python's
    state = capture_rng_state()
    expected = (torch.rand(8), [random.random() for _ in range(4)], random.gauss(0, 1), np.random.standard_normal(6))
    # Scramble everything, then restore through a weights-only save/load.
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    buf = _roundtrip_bytes(state)
    restore_rng_state(buf)
    got = (torch.rand(8), [random.random() for _ in range(4)], random.gauss(0, 1), np.random.standard_normal(6))
    assert torch.equal(expected[0], got[0])
    assert expected[1] == got[1] and expected[2] == got[2]
    np.testing.assert_array_equal(expected[3], got[3])


def _roundtrip_bytes(obj):
    import io

    b = io.BytesIO()
    torch.save(obj, b)
    b.seek(0)
    return torch.load(b, weights_only=True)


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    good = save_checkpoint({"w": torch.arange(4)}, tmp_path, step=100)
    real_save = torch.save

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")  # looks like the start of a zip archive, then "crash"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"w": torch.arange(8)}, tmp_path, step=200)
    monkeypatch.setattr(torch, "save", real_save)

    ckdir = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    assert not (ckdir / "step_0000200.pt").exists()
    assert [p.name for p in ckdir.iterdir()] == [good.name]  # the temp file was removed on the exception path
    assert torch.equal(load_checkpoint(good)["w"], torch.arange(4))


@pytest.mark.multiprocess
def test_hard_kill_mid_save_leaves_ignored_temp(tmp_path):
    good = save_checkpoint({"w": torch.arange(4)}, tmp_path, step=100)
    # A SIGKILL / power loss gets no chance to clean up: a child process dies (os._exit) inside torch.save.
    code = textwrap.dedent(
        f"""
        import os, torch
        from erw_fast.checkpoint import save_checkpoint
        def dying_save(obj, f, *a, **k):
            f.write(b"PK\\x03\\x04" + b"x" * 1000)
            f.flush()
            os._exit(9)
        torch.save = dying_save
        save_checkpoint({{"w": torch.arange(8)}}, {str(tmp_path)!r}, step=200, keep_last=1)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    ckdir = tmp_path / "checkpoints"
    temps = [p for p in ckdir.iterdir() if p.name.startswith(".tmp-")]
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    # Readers ignore the torn temp file; the previous checkpoint is intact and still the latest.
    assert latest_checkpoint(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    assert torch.equal(load_checkpoint(good)["w"], torch.arange(4))
    # The next successful save removes the leftover.
    new = save_checkpoint({"w": torch.arange(8)}, tmp_path, step=200)
    assert sorted(p.name for p in ckdir.iterdir()) == [good.name, new.name]
    assert latest_checkpoint(tmp_path) == new


def test_write_is_fsynced_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_checkpoint({"w": torch.ones(2)}, tmp_path, step=1)
    expected = ["fsync", "replace", "fsync"] if os.name != "nt" else ["fsync", "replace"]
    assert events == expected  # file data, then the rename, then the directory entry


def test_keep_last_and_tags(tmp_path):
    for step in (10, 20):
        save_checkpoint({"s": step}, tmp_path, step=step, keep_last=2)
    phase1 = save_checkpoint({"s": 25}, tmp_path, step=25, tag="phase1", keep_last=2)
    for step in (30, 40, 50):
        save_checkpoint({"s": step}, tmp_path, step=step, keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["phase1_0000025.pt", "step_0000040.pt", "step_0000050.pt"]
    assert phase1.exists()
    assert latest_checkpoint(tmp_path).name == "step_0000050.pt"

    # Tie at one step: sorted tagged-first, and the untagged checkpoint is the latest.
    save_checkpoint({"s": 60}, tmp_path, step=60, tag="phase1", keep_last=2)
    save_checkpoint({"s": 60}, tmp_path, step=60, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)][-2:] == ["phase1_0000060.pt", "step_0000060.pt"]
    assert latest_checkpoint(tmp_path).name == "step_0000060.pt"
    assert (tmp_path / "checkpoints" / "phase1_0000025.pt").exists()

    # The file just written survives rotation even when stale higher-numbered checkpoints exist.
    save_checkpoint({"s": 5}, tmp_path, step=5, keep_last=1)
    assert (tmp_path / "checkpoints" / "step_0000005.pt").exists()
    assert [p.name for p in list_checkpoints(tmp_path) if p.name.startswith("step_")] == ["step_0000005.pt"]

    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint({}, tmp_path, step=1, keep_last=0)
    with pytest.raises(ValueError, match="tag"):
        save_checkpoint({}, tmp_path, step=1, tag="step")
    assert latest_checkpoint(tmp_path / "nope") is None and list_checkpoints(tmp_path / "nope") == []


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-4


@pytest.mark.parametrize(
    ("bad_state", "key_path", "type_name"),
    [
        ({"config": {"data": {"path": Path("/data/imagenet")}}}, "state['config']['data']['path']", "Path"),
        ({"config": _Cfg()}, "state['config']", "_Cfg"),
        ({"x": [1, {"arr": np.zeros(3)}]}, "state['x'][1]['arr']", "ndarray"),
        ({"loss": np.float64(0.5)}, "state['loss']", "float64"),
        ({"model": nn.Linear(2, 2)}, "state['model']", "Linear"),
    ],
)
def test_non_plain_state_rejected_before_writing(tmp_path, bad_state, key_path, type_name):
    with pytest.raises(TypeError) as info:
        save_checkpoint(bad_state, tmp_path / "run", step=1)
    assert key_path in str(info.value) and type_name in str(info.value)
    assert not (tmp_path / "run").exists()  # not even the directory was created


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="step_0000001.pt"):
        load_checkpoint(tmp_path / "checkpoints" / "step_0000001.pt")
    prev = save_checkpoint({"w": torch.randn(64, 64)}, tmp_path, step=1)
    bad = save_checkpoint({"w": torch.randn(64, 64)}, tmp_path, step=2)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated, as after a copy that was cut off
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(bad)
    msg = str(info.value)
    assert str(bad) in msg and "previous checkpoint" in msg and str(prev) in msg


class _TinySiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(4, 8, 2, 2)
        self.final_layer = nn.Linear(8, 4)
        self.register_buffer("pos_embed", torch.randn(1, 4, 8))


def test_reference_export_layout(tmp_path):
    torch.manual_seed(0)
    model, ema = _TinySiT(), _TinySiT()
    # Exported from a compiled DDP model: the wrapper prefixes must not reach the reference file.
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    args = {"model": "SiT-XL/2", "encoder_depth": 8, "enc_type": "dinov2-vit-b", "proj_coeff": 0.5}
    path = export_reference_checkpoint(wrapped, ema.state_dict(), args, step=4000, out_dir=tmp_path / "ref")
    assert path == tmp_path / "ref" / "0004000.pt"
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "ema", "args", "steps"}
    assert raw["args"] == args and raw["steps"] == 4000
    fresh = _TinySiT()
    fresh.load_state_dict(raw["model"], strict=True)
    _assert_equal(dict(fresh.state_dict()), dict(model.state_dict()))
    _TinySiT().load_state_dict(raw["ema"], strict=True)
    with pytest.raises(TypeError, match="args"):
        export_reference_checkpoint(model.state_dict(), ema.state_dict(), {"out": Path("x")}, 1, tmp_path / "ref")


def test_reference_import_namespace_and_prefixes(tmp_path):
    torch.manual_seed(0)
    model, ema = _TinySiT(), _TinySiT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ns = argparse.Namespace(model="SiT-XL/2", resolution=256, encoder_depth=8, output_dir="exps")
    # Exactly what the reference train.py writes: DDP-wrapped keys, the argparse Namespace pickled as an object.
    ref = {
        "model": {f"module.{k}": v for k, v in model.state_dict().items()},
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "args": ns,
        "steps": 400000,
    }
    path = tmp_path / "0400000.pt"
    torch.save(ref, path)
    with pytest.raises(pickle.UnpicklingError):  # precondition: plain weights_only refuses the Namespace
        torch.load(path, weights_only=True)
    out = import_reference_checkpoint(path)
    assert set(out) == {"model", "ema", "args", "steps"}
    assert out["args"] == vars(ns) and type(out["args"]) is dict and out["steps"] == 400000
    _TinySiT().load_state_dict(out["model"], strict=True)
    _TinySiT().load_state_dict(out["ema"], strict=True)
    _assert_equal(out["model"], dict(model.state_dict()))

    # A bare (compiled-model) state dict.
    bare = tmp_path / "bare.pt"
    torch.save({f"_orig_mod.{k}": v for k, v in ema.state_dict().items()}, bare)
    out = import_reference_checkpoint(bare)
    assert out["ema"] is None and out["args"] == {} and out["steps"] is None
    assert "x_embedder.proj.weight" in out["model"]
    _TinySiT().load_state_dict(out["model"], strict=True)

    # Our own export reads back too.
    exported = export_reference_checkpoint(model.state_dict(), ema.state_dict(), {"a": 1}, 5, tmp_path / "exp")
    out = import_reference_checkpoint(exported)
    assert out["args"] == {"a": 1} and out["steps"] == 5


def test_reference_import_refuses_other_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": nn.Linear(2, 2).state_dict(), "args": _Cfg()}, path)
    with pytest.raises(RuntimeError, match="weights_only"):
        import_reference_checkpoint(path)


def test_export_safetensors_shared_storage(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(4, 4)
    sd = {"a.weight": w, "b.weight": w, "t.weight": w.t(), "slice": w[1:3], "x": torch.arange(3)}
    path = export_safetensors(sd, tmp_path / "sub" / "model.safetensors")
    got = load_file(path)
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_tmp_names_never_parse_as_checkpoints(tmp_path):
    ckdir = tmp_path / "checkpoints"
    ckdir.mkdir()
    (ckdir / ".tmp-step_0009999.pt.123.abcd").write_bytes(b"torn")
    (ckdir / "step_0009999.pt.partial").write_bytes(b"x")
    (ckdir / "notes.txt").write_text("hi")
    assert latest_checkpoint(tmp_path) is None
    assert ckpt.list_checkpoints(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_rng_and_map_location(tmp_path):
    torch.cuda.manual_seed_all(5)
    state = {"rng": capture_rng_state(), "w": torch.randn(3, device="cuda")}
    expected = torch.rand(4, device="cuda")
    path = save_checkpoint(state, tmp_path, step=1)
    torch.cuda.manual_seed_all(6)
    loaded = load_checkpoint(path, map_location="cuda")  # RNG tensors land on the GPU; restore moves them back
    restore_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(4, device="cuda"), expected)
    assert loaded["w"].is_cuda and torch.equal(loaded["w"], state["w"])
