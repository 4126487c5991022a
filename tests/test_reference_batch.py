"""erw-eval make-ref (ADM-style reference batches for custom data) and erw-eval's warnings, with a randomly
initialised Inception of the real architecture (no weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _shard_helpers import write_dataset
from PIL import Image

from erw_fast.cli import evaluate
from erw_fast.data.images import center_crop_arr, load_rgb
from erw_fast.evaluation import build_fid_inception
from erw_fast.evaluation.evaluator import read_npz_images, reference_statistics


@pytest.fixture(scope="module")
def inception():
    return build_fid_inception(pretrained=False, seed=0)


def _folder(root, rng):
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _float64_stats(x):
    x = np.asarray(x, np.float64)
    centred = x - x.sum(0) / len(x)
    return x.sum(0) / len(x), centred.T @ centred / (len(x) - 1)


@pytest.mark.slow
def test_make_ref_from_a_folder_matches_float64_statistics(inception, tmp_path, capsys, monkeypatch):
    import erw_fast.evaluation.reference as reference

    seen = []  # the activations the builder computed: the statistics must be their float64 mean and covariance
    real = reference.compute_activations
    monkeypatch.setattr(reference, "compute_activations", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    monkeypatch.setattr(evaluate, "_extractor", lambda args, device: inception)  # built once, in the fixture
    folder = _folder(tmp_path / "images", np.random.default_rng(0))
    out = tmp_path / "ref" / "custom_ref.npz"
    argv = ["make-ref", str(folder), str(out), "--image-size", "32", "--num-samples", "4", "--seed", "1",
            "--random-inception", "0", "--batch-size", "2"]
    assert evaluate.main(argv) == 0
    assert "fewer than 2048" in capsys.readouterr().err
    with np.load(out) as f:  # no pickles: ADM's evaluator and np.load's defaults read it
        images, labels, stored = f["arr_0"], f["arr_1"], {k: f[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
        protocol = json.loads(str(f["protocol"]))
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    # Every image is ADM's centre crop of a distinct source file, with that file's class label.
    crops = {(int(p.parent.name[-1]), p.name): center_crop_arr(load_rgb(str(p)), 32)
             for p in sorted(folder.rglob("*.png"))}
    matched = [next(k for k, v in crops.items() if np.array_equal(v, img)) for img in images]
    assert len(set(matched)) == 4 and [k[0] for k in matched] == labels.tolist()

    (acts,) = seen
    assert acts.pool.shape == (4, 2048) and acts.spatial.shape == (4, 2023)
    for key, x in (("", acts.pool), ("_s", acts.spatial)):
        mu, sigma = _float64_stats(x)
        assert stored["mu" + key].dtype == np.float64 and stored["sigma" + key].shape == sigma.shape
        np.testing.assert_allclose(stored["mu" + key], mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stored["sigma" + key], sigma, rtol=1e-9, atol=1e-12 * np.abs(sigma).max())

    assert protocol == json.loads(out.with_suffix(".json").read_text())
    assert protocol["num_samples"] == 4 and protocol["resolution"] == [32, 32]
    assert protocol["source"]["kind"] == "image folder" and protocol["source"]["images"] == 8
    assert "center_crop_arr" in protocol["crop"] and protocol["inception"]["comparable"] is False
    # The project's evaluator reads it as a reference batch: its images and its stored statistics.
    assert np.array_equal(read_npz_images(out), images)
    pool_stats, spatial_stats = reference_statistics(out)
    np.testing.assert_array_equal(pool_stats.sigma, stored["sigma"])
    np.testing.assert_array_equal(spatial_stats.mu, stored["mu_s"])


def test_make_ref_from_shards_takes_the_stored_images(tmp_path):
    from erw_fast.evaluation.reference import load_reference_images

    truth = write_dataset(tmp_path / "data", num_samples=5, per_shard=3, image_size=16, features=False)
    ref = load_reference_images(tmp_path / "data")
    assert np.array_equal(ref.images, truth["images"]) and ref.labels.tolist() == truth["labels"].tolist()
    assert ref.protocol["source"]["kind"] == "prepared shards" and ref.protocol["selection"] == "all images"
    some = load_reference_images(tmp_path / "data", num_samples=3, seed=2)
    idx = [next(i for i in range(5) if np.array_equal(truth["images"][i], img)) for img in some.images]
    assert len(set(idx)) == 3 and idx == sorted(idx) and some.protocol["selection"].startswith("3 drawn")
    assert load_reference_images(tmp_path / "data", num_samples=5).protocol["selection"] == "all images"
    with pytest.raises(ValueError, match="stores 16 px images"):
        load_reference_images(tmp_path / "data", image_size=32)


def test_eval_warns_for_small_batches_and_a_resolution_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (3000, 4, 4, 3), dtype=np.uint8))
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8))
    found = evaluate.batch_warnings(tmp_path / "s.npz", tmp_path / "r.npz")
    assert len(found) == 2
    assert found[0].startswith("the reference batch has 10 images, fewer than 2048") and "biased" in found[0]
    assert found[1].startswith("samples are 4x4 but the reference is 8x8")
    assert evaluate.batch_warnings(tmp_path / "s.npz", tmp_path / "s.npz") == []
