"""``build_loader``: the one factory the trainer calls, for every data kind.

Kinds:
    demo        the procedural DemoShapesDataset (in memory, toy latents), same iterator contract
    webdataset  prepared shards, torch DataLoader workers (``wds_loader``)
    dali        prepared shards, DALI pipeline with GPU (nvJPEG) decoding on CUDA (``dali_loader``)

All kinds yield the same dict per step (see ``train_loader``) and take their order from
``ResumableBatchSampler(num_samples, global_batch_size, seed, rank, world_size)``; "webdataset" and "dali" yield
identical batches for the same arguments.

``build_loader`` takes the run's ``data`` section (``erw_fast.config.DataConfig``: kind, path, workers, prefetch,
verification, ...) and, from the rest of the run, where this rank's share of the global batch goes.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from erw_fast.config import DataConfig
from erw_fast.data.sampler import ResumableBatchSampler
from erw_fast.data.shards import DataError, ShardSet
from erw_fast.data.train_loader import TrainLoader

KINDS = ("demo", "webdataset", "dali")
DEFAULT_MAX_WORKERS = 4


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: what a container or SLURM grants, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_num_workers(requested: int | None, loader_threads: int = 0) -> tuple[int, str]:
    """``data.num_workers`` and a phrase for the log: the configured count, or min(4, this rank's share of the
    usable cores) (the ranks on a node share them: LOCAL_WORLD_SIZE); 0 with ``data.loader_threads``."""
    cores = usable_cores()
    if requested is None and loader_threads:
        return 0, f"0 loader workers ({loader_threads} loader threads in the training process)"
    if requested is not None:
        note = f", more than the {cores} usable cores" if requested > cores else ""
        return requested, f"{requested} loader workers (data.num_workers{note})"
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    n = max(1, min(DEFAULT_MAX_WORKERS, cores // ranks))
    return n, f"{n} loader workers (min({DEFAULT_MAX_WORKERS}, {cores} usable cores / {ranks} rank(s) on this node))"


class DemoLoader(TrainLoader):
    """``kind="demo"``: batches of the in-memory DemoShapesDataset in the sampler's order."""

    kind = "demo"

    def __init__(self, dataset: Any, sampler: ResumableBatchSampler, start_step: int, device: torch.device,
                 images: bool = True) -> None:
        super().__init__(sampler, start_step, dataset.num_classes, device)
        self.dataset, self.images = dataset, images

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(self.sampler.indices(self.step))
        self.step += 1
        out = {
            "latents": self.dataset.latents[idx].to(self.device, non_blocking=True),
            "labels": self.dataset.labels[idx].to(self.device, non_blocking=True),
            "indices": idx,
        }
        if self.images:
            out["images"] = self.dataset.images[idx].to(self.device, non_blocking=True)
        return out


def _check_manifest(shards: ShardSet, image_size: int, latent_scale: float | None, latent_size: int | None,
                    latent_channels: int | None) -> None:
    man, where = shards.manifest, shards.root / "manifest.json"
    if man.image_size != image_size:
        raise DataError(f"{where}: images are {man.image_size} px, the run expects image_size={image_size}")
    if latent_scale is not None and abs(man.scaling_factor - latent_scale) > 1e-9 * max(1.0, abs(latent_scale)):
        raise DataError(f"{where}: VAE scaling_factor {man.scaling_factor} ({man.vae.get('name')}), "
                        f"the run expects latent_scale={latent_scale}")
    c2, h, w = man.moments_shape
    if latent_size is not None and (h, w) != (latent_size, latent_size):
        raise DataError(f"{where}: latents are {h}x{w}, the model expects {latent_size}x{latent_size}")
    if latent_channels is not None and c2 // 2 != latent_channels:
        raise DataError(f"{where}: latents have {c2 // 2} channels, the model expects {latent_channels}")


def build_loader(
    data: DataConfig,
    *,
    global_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    images: bool = True,
    latent_size: int | None = None,
    latent_channels: int | None = None,
    drop_last: bool = True,
) -> TrainLoader:
    """Build this rank's loader for ``data``, positioned at ``start_step``.

    ``images=False`` skips reading/decoding images (plain SiT); ``data.features`` loads precomputed teacher
    features. Shard kinds check the manifest against ``data.image_size`` and ``data.latent_scale``,
    ``num_classes``, ``latent_size`` and ``latent_channels`` (those given) and raise ``DataError`` naming the
    mismatch. ``data.device_prefetch`` (None: on CUDA) wraps the loader in a ``DevicePrefetcher`` (same batches,
    staged one step ahead).
    """
    kind, path, flip, features, on_error = data.kind, data.path, data.flip, data.features, data.on_error
    num_workers = resolve_num_workers(data.num_workers, data.loader_threads)[0]
    device = torch.device(device)
    device_prefetch = device.type == "cuda" if data.device_prefetch is None else data.device_prefetch
    loader_threads = data.loader_threads
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    if loader_threads and kind != "webdataset":
        raise ValueError(f"loader_threads={loader_threads} applies to the webdataset kind only, not {kind!r}")
    if kind == "demo":
        from erw_fast.data.demo import DemoShapesDataset

        if flip or features:
            raise ValueError("the demo dataset has no flipped moments or precomputed features (flip/features)")
        dataset = DemoShapesDataset(num_samples=data.num_samples, num_classes=num_classes or 8,
                                    image_size=data.image_size,
                                    latent_size=latent_size or 8, latent_channels=latent_channels or 4, seed=seed)
        sampler = ResumableBatchSampler(len(dataset), global_batch_size, seed, rank, world_size, drop_last)
        return _staged(DemoLoader(dataset, sampler, start_step, device, images), device_prefetch)

    if not path:
        raise ValueError(f"data kind {kind!r} needs a path (the prepared dataset directory)")
    from erw_fast.data.batches import BatchAssembler, LoadOptions

    shards = ShardSet(path, verify=data.verify, on_error=on_error)
    _check_manifest(shards, data.image_size, data.latent_scale, latent_size, latent_channels)
    sampler = ResumableBatchSampler(shards.num_samples, global_batch_size, seed, rank, world_size, drop_last)
    opts = LoadOptions(seed=seed, images=images, features=features, flip=flip, on_error=on_error,
                       num_classes=num_classes)
    assembler = BatchAssembler(shards, sampler, opts)
    scale = shards.manifest.scaling_factor
    if kind == "webdataset":
        from erw_fast.data.wds_loader import WebDatasetLoader

        loader: TrainLoader = WebDatasetLoader(
            assembler, start_step=start_step, device=device, num_workers=num_workers,
            num_threads=loader_threads, prefetch_factor=data.prefetch, pin_memory=data.pin_memory, latent_scale=scale,
        )
        return _staged(loader, device_prefetch)
    from erw_fast.data.dali_loader import DaliLoader

    loader = DaliLoader(assembler, start_step=start_step, device=device, num_workers=num_workers,
                        num_threads=data.dali_threads, prefetch=data.prefetch, latent_scale=scale,
                        decoder_device=data.dali_decoder)
    return _staged(loader, device_prefetch)


def _staged(loader: TrainLoader, device_prefetch: bool) -> TrainLoader:
    if not device_prefetch:
        return loader
    from erw_fast.data.device_prefetch import DevicePrefetcher

    return DevicePrefetcher(loader)
