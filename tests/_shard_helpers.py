"""Test helpers: a small latent-shard dataset written with known contents (no VAE), and the diffusers import.

``write_dataset`` produces the format through ``ShardWriter`` and a hand-assembled manifest, and returns the ground
truth (moments, flipped moments, images, labels, features) the readers must reproduce bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from erw_fast.data.images import IMAGE_MEMBER, encode_image
from erw_fast.data.shards import (
    MEMBER_FEATURES,
    MEMBER_LABEL,
    MEMBER_MOMENTS,
    MEMBER_MOMENTS_FLIP,
    SHARD_DIR,
    Manifest,
    ShardEntry,
    ShardSet,
    ShardWriter,
    npy_bytes,
    sample_key,
    shard_name,
)

SCALE = 0.18215


def write_dataset(
    root: Path,
    *,
    num_samples: int = 40,
    per_shard: int = 12,
    image_size: int = 32,
    image_format: str = "png",
    flip: bool = True,
    features: bool = True,
    num_classes: int = 5,
    latent_channels: int = 4,
    seed: int = 0,
    feature_shape: tuple[int, int] = (4, 6),
    feature_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ls = image_size // 8
    n = num_samples
    truth: dict[str, Any] = {
        "labels": rng.integers(0, num_classes, n),
        "moments": np.concatenate([rng.normal(0, 4, (n, latent_channels, ls, ls)),
                                   rng.uniform(0.01, 0.5, (n, latent_channels, ls, ls))], axis=1).astype(np.float16),
        "images": np.empty((n, image_size, image_size, 3), np.uint8),
        "encoded": [],
    }
    truth["moments_flip"] = (truth["moments"][..., ::-1] + np.float16(0.5)).astype(np.float16)
    truth["features"] = rng.normal(0, 1, (n, *feature_shape)).astype(np.float16)
    yy, xx = np.mgrid[0:image_size, 0:image_size]
    for i in range(n):  # smooth-ish images so JPEG is realistic; asymmetric so flips are visible
        base = (xx * (i % 7 + 1) + yy * 3 + i * 11) % 256
        noise = rng.integers(0, 40, (image_size, image_size, 3))
        truth["images"][i] = np.clip(base[..., None] + noise + np.array([0, 60, 120]), 0, 255).astype(np.uint8)
    members = [MEMBER_LABEL, MEMBER_MOMENTS] + ([MEMBER_MOMENTS_FLIP] if flip else [])
    members += [IMAGE_MEMBER[image_format]] + ([MEMBER_FEATURES] if features else [])
    (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for k, start in enumerate(range(0, n, per_shard)):
        name = shard_name(k)
        tar, idx = root / SHARD_DIR / f"{name}.tar", root / SHARD_DIR / f"{name}.idx"
        with ShardWriter(tar, idx) as w:
            for i in range(start, min(start + per_shard, n)):
                enc = encode_image(truth["images"][i], image_format)
                truth["encoded"].append(enc)
                sample = [(MEMBER_LABEL, str(int(truth["labels"][i])).encode()),
                          (MEMBER_MOMENTS, npy_bytes(truth["moments"][i]))]
                if flip:
                    sample.append((MEMBER_MOMENTS_FLIP, npy_bytes(truth["moments_flip"][i])))
                sample.append((IMAGE_MEMBER[image_format], enc))
                if features:
                    sample.append((MEMBER_FEATURES, npy_bytes(truth["features"][i])))
                w.add(sample_key(i), sample)
            info = w.commit()
        entries.append(ShardEntry(name, f"{SHARD_DIR}/{name}.tar", f"{SHARD_DIR}/{name}.idx", start,
                                  info.num_samples, info.bytes, info.sha256))
    Manifest(
        num_samples=n, num_classes=num_classes, classes=[f"c{k}" for k in range(num_classes)],
        image_size=image_size, image_format=image_format, members=members, samples_per_shard=per_shard,
        moments_shape=[2 * latent_channels, ls, ls],
        vae={"name": "test", "scaling_factor": SCALE, "latent_channels": latent_channels, "latent_size": ls,
             "dtype": "float16"},
        flip_moments=flip, shards=entries,
        features={"encoder": "test", "shape": list(feature_shape), "dtype": "float16", **(feature_record or {})}
        if features else None,
    ).save(root)
    return truth


def tiny_vae(autoencoder_kl: type, seed: int = 0) -> Any:
    """A randomly initialised AutoencoderKL with the SD layout (4 levels → stride 8) but 8 channels per level."""
    import torch

    torch.manual_seed(seed)
    return autoencoder_kl(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).eval()


def patch_image(root, index, corrupt):
    """Replace the stored PNG of ``index`` by ``corrupt(png_bytes)`` (same length); returns the shard name."""
    shards = ShardSet(root)
    j = shards.members.index("png")
    sid = shards.shard_of(index)
    off, size = int(shards.offsets[index, j]), int(shards.sizes[index, j])
    tar = root / shards.manifest.shards[sid].tar
    data = bytearray(tar.read_bytes())
    new = corrupt(bytes(data[off : off + size]))
    assert len(new) == size
    data[off : off + size] = new
    tar.write_bytes(bytes(data))
    return shards.manifest.shards[sid].name


def make_loader(kind, path, **kwargs):
    """build_loader with the data section's keys and the placement keys given together, as the tests write them."""
    import dataclasses

    from erw_fast.config import DataConfig
    from erw_fast.data.loaders import build_loader

    data_keys = {f.name for f in dataclasses.fields(DataConfig)}
    data = DataConfig(kind=kind, path=None if path is None else str(path),
                      **{k: v for k, v in kwargs.items() if k in data_keys})
    return build_loader(data, **{k: v for k, v in kwargs.items() if k not in data_keys})
