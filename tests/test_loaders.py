"""Loaders: webdataset ≡ DALI (CPU), resume ≡ uninterrupted (any worker count), rank split, latents vs an
independent reference, error policy, manifest checks, the demo kind."""

from __future__ import annotations

import io
import json
import math
import zlib

import numpy as np
import pytest
import torch
from _shard_helpers import SCALE, make_loader, patch_image, write_dataset
from PIL import Image

from erw_fast.data import DemoShapesDataset, ResumableBatchSampler
from erw_fast.data.latents import flip_decision, sample_key, standard_normal, stream_words
from erw_fast.data.shards import DataError, SampleError

pytest.importorskip("nvidia.dali")

BATCH = 8


def _loader(kind, path, **kw):
    args = dict(global_batch_size=BATCH, seed=7, image_size=32, num_workers=0, flip=True, features=True)
    args.update(kw)
    return make_loader(kind, path, **args)


def _take(loader, steps):
    with loader:
        return [next(loader) for _ in range(steps)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for s, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys() == y.keys(), s
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"step {s}: {k} differs"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = {}
    for fmt in ("png", "jpg", "raw"):
        root = tmp_path_factory.mktemp(fmt)
        out[fmt] = (root, write_dataset(root, image_format=fmt))
    return out


# ----------------------------------------------------------------------------------------------------- noise


def _mix64(z):
    m = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_noise_stream_matches_python_splitmix64():
    keys = [0, 1, 123456789, (1 << 64) - 1, sample_key(7, 3, 999)]
    words = stream_words(torch.tensor([k - (1 << 64) if k >= 1 << 63 else k for k in keys]), 37)
    for r, key in enumerate(keys):
        ref = [_mix64((key + c * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)) for c in range(1, 38)]
        assert [w & ((1 << 64) - 1) for w in words[r].tolist()] == ref


def test_standard_normal_statistics_and_independence():
    keys = torch.tensor([sample_key(0, 0, i) - (1 << 63) for i in range(512)])  # any int64 bits are valid keys
    eps = standard_normal(keys, 4 * 16 * 16).double()
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01
    assert abs(((eps**4).mean() - 3).item()) < 0.08  # Gaussian kurtosis
    corr = torch.corrcoef(eps[:, :256])  # samples with neighbouring indices are uncorrelated
    assert corr.fill_diagonal_(0).abs().max() < 0.3
    assert abs(np.mean([flip_decision(sample_key(1, 0, i)) for i in range(4000)]) - 0.5) < 0.03


# ----------------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("fmt", ["png", "jpg", "raw"])
@pytest.mark.multiprocess
def test_webdataset_and_dali_yield_identical_batches(datasets, fmt):
    root, _ = datasets[fmt]
    steps = 7  # crosses an epoch boundary (40 samples / 8)
    wds_batches = _take(_loader("webdataset", root), steps)
    dali_batches = _take(_loader("dali", root, num_workers=2), steps)
    _assert_batches_equal(wds_batches, dali_batches)
    assert set(wds_batches[0]) == {"images", "latents", "labels", "features", "indices"}


def test_batches_match_independent_reference(datasets):
    """Every slot against the ground truth and the documented formulas, computed here from scratch."""
    root, truth = datasets["png"]
    batches = _take(_loader("webdataset", root), 6)
    sampler = ResumableBatchSampler(40, BATCH, seed=7)
    n_flipped = 0
    for step, batch in enumerate(batches):
        epoch = step // sampler.steps_per_epoch
        for slot, i in enumerate(sampler.indices(step)):
            key = sample_key(7, epoch, i)
            flip = flip_decision(key)
            n_flipped += flip
            assert batch["indices"][slot] == i and batch["labels"][slot] == truth["labels"][i]
            image = truth["images"][i][:, ::-1] if flip else truth["images"][i]
            np.testing.assert_array_equal(batch["images"][slot].permute(1, 2, 0).numpy(), image)
            np.testing.assert_array_equal(batch["features"][slot].numpy(), truth["features"][i].astype(np.float32))
            moments = (truth["moments_flip"] if flip else truth["moments"])[i].astype(np.float64)
            mean, std = moments[:4], moments[4:]
            # ε from the documented recipe in float64 (python ints for the hash)
            n = mean.size
            eps = np.empty(2 * ((n + 1) // 2))
            half = (n + 1) // 2
            for c in range(half):
                w = _mix64((key + (c + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
                u1 = ((w >> 41) + 0.5) * 2.0**-23
                u2 = (((w >> 18) & 0x7FFFFF) + 0.5) * 2.0**-23
                r = math.sqrt(-2 * math.log(u1))
                eps[c], eps[half + c] = r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)
            ref = (mean + std * eps[:n].reshape(mean.shape)) * SCALE
            np.testing.assert_allclose(batch["latents"][slot].numpy(), ref, rtol=1e-5, atol=1e-5)
    assert 0 < n_flipped < 6 * BATCH


@pytest.mark.multiprocess
def test_resume_equals_uninterrupted_any_worker_count(datasets):
    root, _ = datasets["jpg"]
    full = _take(_loader("webdataset", root, num_workers=0), 9)
    for workers, start in ((2, 3), (1, 5), (0, 6)):
        _assert_batches_equal(full[start:], _take(_loader("webdataset", root, num_workers=workers, start_step=start),
                                                  9 - start))
    _assert_batches_equal(full[4:], _take(_loader("dali", root, num_workers=1, start_step=4), 5))


@pytest.mark.parametrize("fmt", ["raw", "png"])
@pytest.mark.multiprocess
def test_loader_threads_yield_the_worker_batches(datasets, fmt):
    # Threads of the training process assemble steps concurrently (4 threads, 8 steps in flight, over 4
    # shards): the same batches as worker processes, from the start and resumed mid-epoch.
    root, _ = datasets[fmt]
    full = _take(_loader("webdataset", root, num_workers=2), 9)
    _assert_batches_equal(full, _take(_loader("webdataset", root, loader_threads=4), 9))
    _assert_batches_equal(full[5:], _take(_loader("webdataset", root, loader_threads=2, start_step=5), 4))


def test_loader_threads_refuse_to_mix_with_workers_or_dali(datasets):
    root, _ = datasets["raw"]
    with pytest.raises(ValueError, match="num_workers=2 and num_threads=3: choose worker processes or loader"):
        _loader("webdataset", root, num_workers=2, loader_threads=3)
    with pytest.raises(ValueError, match="loader_threads=2 applies to the webdataset kind only, not 'dali'"):
        _loader("dali", root, loader_threads=2)


def test_rank_split_concatenates_to_the_global_batch(datasets):
    root, _ = datasets["raw"]
    whole = _take(_loader("webdataset", root), 3)
    parts = [_take(_loader("webdataset", root, rank=r, world_size=2), 3) for r in range(2)]
    for s in range(3):
        for k in whole[s]:
            torch.testing.assert_close(torch.cat([parts[0][s][k], parts[1][s][k]]), whole[s][k], rtol=0, atol=0)


def test_position_is_plain_data(datasets):
    root, _ = datasets["png"]
    with _loader("webdataset", root, start_step=11) as loader:
        next(loader)
        pos = loader.position()
        assert pos["step"] == 12 and pos["epoch"] == 2 and pos["offset_in_epoch"] == 16
        assert json.loads(json.dumps(loader.position(3)))["step"] == 3
        assert loader.num_samples == 40 and loader.num_classes == 5


def test_images_off_skips_image_member(datasets):
    root, _ = datasets["png"]
    (b,) = _take(_loader("webdataset", root, images=False, features=False), 1)
    assert set(b) == {"latents", "labels", "indices"}
    (d,) = _take(_loader("dali", root, images=False, features=False), 1)
    _assert_batches_equal([b], [d])


# ----------------------------------------------------------------------------------------------------- errors


def _zeros(png):
    return bytes(len(png))


def _broken_stream_valid_crc(png):
    """Garble the IDAT payload but fix its CRC: only a real decoder (PIL, DALI) can tell."""
    data = bytearray(png)
    pos = data.find(b"IDAT") - 4
    length = int.from_bytes(data[pos : pos + 4], "big")
    data[pos + 8 + 2 : pos + 8 + length] = bytes(x ^ 0x5A for x in data[pos + 8 + 2 : pos + 8 + length])
    data[pos + 8 + length : pos + 12 + length] = zlib.crc32(data[pos + 4 : pos + 8 + length]).to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("corrupt", [_zeros, _broken_stream_valid_crc])
@pytest.mark.multiprocess
def test_corrupt_sample_raises_or_is_skipped(tmp_path, corrupt):
    write_dataset(tmp_path, image_format="png")
    sampler = ResumableBatchSampler(40, BATCH, seed=7)
    bad = sampler.indices(1)[3]
    shard = patch_image(tmp_path, bad, corrupt)
    where = f"shard {shard}, key {bad:08d}: png"
    with pytest.raises(SampleError, match=where):
        _take(_loader("webdataset", tmp_path), 2)
    with pytest.raises(SampleError, match=where):
        _take(_loader("dali", tmp_path, num_workers=1), 2)

    with pytest.raises(SampleError, match=where):  # raised by a loader thread, surfaced at its step
        _take(_loader("webdataset", tmp_path, loader_threads=2), 2)

    with _loader("webdataset", tmp_path, on_error="skip", num_workers=2) as loader:
        batches = [next(loader) for _ in range(3)]
        assert loader.skipped == 1 and loader.position()["skipped"] == 1
    with _loader("webdataset", tmp_path, on_error="skip", loader_threads=2) as threaded:
        _assert_batches_equal(batches, [next(threaded) for _ in range(3)])
        assert threaded.skipped == 1
    replaced = batches[1]["indices"][3].item()
    assert replaced == (bad + 1) % 40  # the next readable index takes the slot
    clean = write_dataset(tmp_path / "clean", image_format="png")
    assert batches[1]["labels"][3] == clean["labels"][replaced]
    with _loader("dali", tmp_path, on_error="skip", num_workers=1) as dali:
        _assert_batches_equal(batches, [next(dali) for _ in range(3)])
        assert dali.skipped == 1


def test_missing_shard_raises_or_is_skipped(tmp_path):
    write_dataset(tmp_path, num_samples=40, per_shard=12)
    (tmp_path / "shards" / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="shard shard-000001.*tar file missing"):
        _loader("webdataset", tmp_path)
    with _loader("webdataset", tmp_path, on_error="skip") as loader:
        batches = [next(loader) for _ in range(5)]  # a whole epoch
        wanted = sum((loader.sampler.indices(s) for s in range(5)), [])
        loaded = torch.cat([b["indices"] for b in batches]).tolist()
        assert loader.skipped == sum(12 <= i < 24 for i in wanted)
    for i, got in zip(wanted, loaded, strict=True):
        # a lost shard's slots move to the same position (+1) in the next shard: spread, not piled on one sample
        assert got == (i if not 12 <= i < 24 else 24 if i == 23 else i + 13)


def test_label_out_of_range_and_manifest_mismatches(tmp_path):
    write_dataset(tmp_path, num_classes=5)
    with pytest.raises(DataError, match="5 classes, more than the model's num_classes=3"):
        _loader("webdataset", tmp_path, num_classes=3)
    with pytest.raises(DataError, match="scaling_factor 0.18215.*latent_scale=0.13025"):
        _loader("webdataset", tmp_path, latent_scale=0.13025)
    with pytest.raises(DataError, match="images are 32 px.*image_size=256"):
        _loader("webdataset", tmp_path, image_size=256)
    with pytest.raises(DataError, match="latents are 4x4, the model expects 32x32"):
        _loader("webdataset", tmp_path, latent_size=32)
    _loader("webdataset", tmp_path, latent_scale=0.18215, latent_size=4, latent_channels=4).close()

    (tmp_path / "noflip").mkdir()
    write_dataset(tmp_path / "noflip", flip=False, features=False)
    with pytest.raises(DataError, match="--flip-moments"):
        _loader("webdataset", tmp_path / "noflip")
    with pytest.raises(DataError, match="no precomputed encoder features"):
        _loader("webdataset", tmp_path / "noflip", flip=False)

    # a label beyond the manifest's classes inside a shard: a sample error naming shard and key
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["num_classes"], man["classes"] = 2, ["a", "b"]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(SampleError, match=r"shard shard-0000\d\d, key \d{8}: label [234] outside \[0, 2\)"):
        _take(_loader("webdataset", tmp_path), 5)


# ----------------------------------------------------------------------------------------------------- demo


def test_demo_kind_follows_the_sampler():
    demo = make_loader("demo", None, global_batch_size=4, seed=3, image_size=32, num_classes=4,
                  latent_size=8, latent_channels=4, num_samples=16, start_step=2)
    ds = DemoShapesDataset(num_samples=16, num_classes=4, image_size=32, latent_size=8, seed=3)
    sampler = ResumableBatchSampler(16, 4, seed=3)
    for step in (2, 3, 4, 5):
        b = next(demo)
        idx = torch.as_tensor(sampler.indices(step))
        assert torch.equal(b["images"], ds.images[idx]) and torch.equal(b["latents"], ds.latents[idx])
        assert torch.equal(b["labels"], ds.labels[idx])
    assert demo.position()["step"] == 6


def test_jpeg_bytes_decode_like_pil(datasets):
    """The DALI-vs-webdataset JPEG equality above is meaningful: both equal PIL's decode of the stored bytes."""
    root, truth = datasets["jpg"]
    (b,) = _take(_loader("webdataset", root, flip=False), 1)
    i = b["indices"][0].item()
    ref = np.asarray(Image.open(io.BytesIO(truth["encoded"][i])).convert("RGB"))
    np.testing.assert_array_equal(b["images"][0].permute(1, 2, 0).numpy(), ref)


@pytest.mark.slow
def test_loader_benchmark_smoke(tmp_path):
    """benchmarks/bench_loader.py end to end on a tiny set (its numbers are not a measurement)."""
    from _script_helpers import benchmark_script

    with benchmark_script("bench_loader") as module:
        assert module.main(["--quick", "--data", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "loader_quick.json").read_text())
    modes = {(c["layout"], c["loader"], c["mode"]) for c in report["cases"]}
    assert ("shards (raw)", "webdataset", "latents+image") in modes and ("per-file (REPA)", "torch",
                                                                          "latents+features") in modes
    assert all(c["samples_per_s"] > 0 for c in report["cases"])
    assert ("shards (raw)", "webdataset (threads)", "latents+image") in modes
    assert "| shards (png) | webdataset | latents+labels | 0 |" in (tmp_path / "loader_quick.md").read_text()
