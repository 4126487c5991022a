"""Procedural demo dataset, toy autoencoder and resumable sampler."""

from __future__ import annotations

import itertools

import pytest
import torch

from erw_fast.data import (
    SHAPES,
    TOY_LATENT_SCALE,
    DemoShapesDataset,
    ResumableBatchSampler,
    toy_decode,
    toy_encode,
    toy_projection,
)


@pytest.fixture(scope="module")
def ds() -> DemoShapesDataset:
    return DemoShapesDataset(num_samples=256, num_classes=8, image_size=32, latent_size=4, latent_channels=4, seed=3)


# ---------------------------------------------------------------------------------------------- dataset


def test_shapes_dtypes_and_items(ds: DemoShapesDataset) -> None:
    assert len(ds) == 256
    assert ds.images.shape == (256, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.latents.shape == (256, 4, 4, 4) and ds.latents.dtype == torch.float32
    assert ds.labels.shape == (256,) and ds.labels.dtype == torch.int64
    item = ds[5]
    assert set(item) == {"image", "latent", "label"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert item["latent"].shape == (4, 4, 4) and item["latent"].dtype == torch.float32
    assert item["label"].ndim == 0 and item["label"].dtype == torch.int64 and int(item["label"]) == 5
    assert torch.equal(ds[-1]["image"], ds.images[255])
    with pytest.raises(IndexError):
        ds[256]


def test_labels_balanced(ds: DemoShapesDataset) -> None:
    assert torch.equal(ds.labels, torch.arange(256) % 8)
    assert torch.bincount(ds.labels).tolist() == [32] * 8
    odd = DemoShapesDataset(num_samples=30, num_classes=7, image_size=16, latent_size=4)
    assert torch.bincount(odd.labels).tolist() == [5, 5, 4, 4, 4, 4, 4]


def test_deterministic_and_seed_dependent(ds: DemoShapesDataset) -> None:
    again = DemoShapesDataset(num_samples=256, image_size=32, latent_size=4, seed=3)
    assert torch.equal(again.images, ds.images)
    assert torch.equal(again.latents, ds.latents)
    assert torch.equal(again.labels, ds.labels)
    other = DemoShapesDataset(num_samples=256, image_size=32, latent_size=4, seed=4)
    assert torch.equal(other.labels, ds.labels)
    # Every sample changes with the seed, not just some.
    differs = (other.images != ds.images).flatten(1).any(dim=1)
    assert differs.all()


def test_sample_depends_only_on_seed_and_index(ds: DemoShapesDataset) -> None:
    # A smaller and a larger set (across the internal chunk boundary of 512) share their common prefix exactly.
    small = DemoShapesDataset(num_samples=100, image_size=32, latent_size=4, seed=3)
    assert torch.equal(small.images, ds.images[:100])
    assert torch.equal(small.latents, ds.latents[:100])
    big = DemoShapesDataset(num_samples=600, image_size=32, latent_size=4, seed=3)
    assert torch.equal(big.images[:256], ds.images)


def test_pixel_statistics(ds: DemoShapesDataset) -> None:
    imgs = ds.images.float()
    assert imgs.std() > 30  # not a blank image
    assert int(ds.images.min()) < 40 and int(ds.images.max()) > 200  # dark background, bright foreground
    # Latents are roughly unit-variance (the fixed scale was measured on the 64 px defaults).
    assert 0.5 < float(ds.latents.std()) < 2.0


def test_classes_distinguishable(ds: DemoShapesDataset) -> None:
    means = torch.stack([ds.images[ds.labels == k].float().mean(0) for k in range(8)])  # (8, 3, H, W)
    dist = torch.cdist(means.flatten(1), means.flatten(1)) / (means[0].numel() ** 0.5)  # RMS pixel difference
    off_diag = dist[~torch.eye(8, dtype=torch.bool)]
    assert float(off_diag.min()) > 10.0, dist
    # Raw-pixel means blur over the position jitter, so check per-sample separability on the foreground colour
    # (mean of bright pixels): a nearest-class-mean classifier on it is (near) perfect.
    x = ds.images.float()
    fg = (x.amax(dim=1, keepdim=True) > 150).float()
    colour = (x * fg).sum((2, 3)) / fg.sum((2, 3)).clamp(min=1)
    centres = torch.stack([colour[ds.labels == k].mean(0) for k in range(8)])
    assert float((torch.cdist(colour, centres).argmin(dim=1) == ds.labels).float().mean()) > 0.97


def test_more_classes_than_shapes_get_distinct_colours() -> None:
    d = DemoShapesDataset(num_samples=160, num_classes=16, image_size=16, latent_size=4)
    assert d.class_names[0] == SHAPES[0] and d.class_names[8] == SHAPES[0] + "1"
    mean_colour = torch.stack([d.images[d.labels == k].float().mean((0, 2, 3)) for k in range(16)])
    assert float((mean_colour[0] - mean_colour[8]).abs().max()) > 10


def _reference_encode(images: torch.Tensor, latent_size: int, latent_channels: int) -> torch.Tensor:
    """float64, explicit loops: space-to-depth with channel index c·f² + dy·f + dx, then the projection."""
    n, _, size, _ = images.shape
    f = size // latent_size
    proj = toy_projection(3 * f * f, latent_channels).double()
    x = images.double() / 127.5 - 1.0
    patches = torch.empty(n, 3 * f * f, latent_size, latent_size, dtype=torch.float64)
    for c in range(3):
        for dy in range(f):
            for dx in range(f):
                patches[:, c * f * f + dy * f + dx] = x[:, c, dy::f, dx::f]
    out = torch.zeros(n, latent_channels, latent_size, latent_size, dtype=torch.float64)
    for k in range(latent_channels):
        for j in range(3 * f * f):
            out[:, k] += proj[k, j] * patches[:, j]
    return out / TOY_LATENT_SCALE


@pytest.mark.parametrize(("size", "latent_size", "channels"), [(32, 4, 4), (16, 8, 3), (8, 8, 2), (12, 3, 16)])
def test_toy_encode_matches_reference(size: int, latent_size: int, channels: int) -> None:
    images = torch.randint(0, 256, (5, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    got = toy_encode(images, latent_size, channels)
    assert got.shape == (5, channels, latent_size, latent_size) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference_encode(images, latent_size, channels), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(toy_encode(images[2], latent_size, channels), got[2])


def test_dataset_latents_are_toy_encode(ds: DemoShapesDataset) -> None:
    torch.testing.assert_close(ds.latents.double(), _reference_encode(ds.images, 4, 4), atol=1e-4, rtol=1e-5)


def test_projection_orthonormal_and_fixed() -> None:
    p = toy_projection(48, 4).double()
    torch.testing.assert_close(p @ p.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(toy_projection(48, 4), toy_projection(48, 4))
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(toy_projection(48, 4), p.float())


def test_toy_decode_is_right_inverse() -> None:
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1  # small: no clamping in decode
    img = toy_decode(z, image_size=16)
    assert img.shape == (3, 3, 16, 16) and img.dtype == torch.uint8
    # uint8 rounding costs ≤ 0.5/127.5 per pixel; the projection has orthonormal rows.
    torch.testing.assert_close(toy_encode(img, 4, 4), z, atol=0.05, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"num_classes": 0}, "num_classes"),
        ({"image_size": 30, "latent_size": 8}, "divisible"),
        ({"image_size": 4, "latent_size": 4}, "image_size"),
        ({"latent_size": 0}, "latent_size"),
        ({"image_size": 16, "latent_size": 16, "latent_channels": 4}, "latent_channels"),
        ({"latent_channels": 0}, "latent_channels"),
    ],
)
def test_dataset_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DemoShapesDataset(**kwargs)


def test_toy_encode_bad_args() -> None:
    with pytest.raises(ValueError, match="uint8"):
        toy_encode(torch.zeros(1, 3, 16, 16), 4, 4)
    with pytest.raises(ValueError, match="divisible"):
        toy_encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 5, 4)
    with pytest.raises(ValueError, match="latent_channels"):
        toy_encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 8, 4)


# ---------------------------------------------------------------------------------------------- sampler


def _take(sampler: ResumableBatchSampler, start: int, n: int) -> list[list[int]]:
    return list(itertools.islice(sampler.batches(start), n))


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_equals_uninterrupted(drop_last: bool) -> None:
    s = ResumableBatchSampler(num_samples=50, global_batch_size=8, seed=7, drop_last=drop_last)
    assert s.steps_per_epoch == (6 if drop_last else 7)
    full = _take(s, 0, 40)
    spe = s.steps_per_epoch
    for k in [1, 5, spe - 1, spe, spe + 1, 2 * spe, 2 * spe + 3, 33]:
        fresh = ResumableBatchSampler(num_samples=50, global_batch_size=8, seed=7, drop_last=drop_last)
        assert _take(fresh, k, 40 - k) == full[k:], k
    # iter() after set_start_step (the DataLoader(batch_sampler=...) path) agrees as well.
    s.set_start_step(spe)
    assert list(itertools.islice(iter(s), 3)) == full[spe : spe + 3]


def test_resume_is_a_seek() -> None:
    # Step 10**12 is reached without walking: only that epoch's permutation is drawn.
    s = ResumableBatchSampler(num_samples=1000, global_batch_size=10, seed=1)
    batch = next(s.batches(10**12))
    assert len(batch) == 10 and len(set(batch)) == 10
    assert s.position(10**12) == {"epoch": 10**10, "offset_in_epoch": 0, "step": 10**12}


def test_each_epoch_is_a_permutation() -> None:
    s = ResumableBatchSampler(num_samples=48, global_batch_size=12, seed=0)
    batches = _take(s, 0, 3 * s.steps_per_epoch)
    epochs = [sum(batches[e * 4 : (e + 1) * 4], []) for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == list(range(48))
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch


def test_drop_last_semantics() -> None:
    s = ResumableBatchSampler(num_samples=50, global_batch_size=8, seed=2, drop_last=True)
    ep = sum(_take(s, 0, s.steps_per_epoch), [])
    assert len(ep) == 48 and len(set(ep)) == 48
    s = ResumableBatchSampler(num_samples=50, global_batch_size=8, seed=2, drop_last=False)
    batches = _take(s, 0, s.steps_per_epoch)
    assert all(len(b) == 8 for b in batches)
    assert set(sum(batches, [])) == set(range(50))


def test_ranks_partition_global_batch() -> None:
    world = 4
    samplers = [ResumableBatchSampler(64, 16, seed=9, rank=r, world_size=world) for r in range(world)]
    single = ResumableBatchSampler(64, 16, seed=9)
    for step in [0, 1, 3, 4, 11]:
        parts = [next(s.batches(step)) for s in samplers]
        assert all(len(p) == 4 for p in parts)
        assert len(set(sum(parts, []))) == 16  # no overlap
        assert sum(parts, []) == next(single.batches(step))  # contiguous slices of the global batch, in rank order


def test_seed_changes_order_and_position() -> None:
    a = _take(ResumableBatchSampler(100, 10, seed=0), 0, 3)
    b = _take(ResumableBatchSampler(100, 10, seed=1), 0, 3)
    assert a != b
    s = ResumableBatchSampler(100, 30, seed=0)
    assert s.position(0) == {"epoch": 0, "offset_in_epoch": 0, "step": 0}
    assert s.position(4) == {"epoch": 1, "offset_in_epoch": 30, "step": 4}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 10, "global_batch_size": 12, "seed": 0}, "num_samples"),
        ({"num_samples": 10, "global_batch_size": 6, "seed": 0, "world_size": 4}, "divisible by world_size"),
        ({"num_samples": 10, "global_batch_size": 4, "seed": 0, "rank": 2, "world_size": 2}, "rank"),
        ({"num_samples": 10, "global_batch_size": 0, "seed": 0}, "global_batch_size"),
        ({"num_samples": 0, "global_batch_size": 1, "seed": 0}, "num_samples"),
        ({"num_samples": 10, "global_batch_size": 2, "seed": -1}, "seed"),
    ],
)
def test_sampler_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResumableBatchSampler(**kwargs)


def test_negative_start_step_rejected() -> None:
    with pytest.raises(ValueError, match="start_step"):
        next(ResumableBatchSampler(10, 2, seed=0).batches(-1))
