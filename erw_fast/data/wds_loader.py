"""The webdataset-shard loader: random access through the shard index, torch ``DataLoader`` workers.

Instead of streaming tars (webdataset's sequential reader, whose order depends on shard and worker layout), every
step's samples are fetched by global index: the DataLoader's items are *steps*, each worker assembles whole batches
(``BatchAssembler.load_step``: one ``preadv`` per run of members, ``.npy`` payloads straight into the batch,
images decoded as webdataset's ``rgb8`` decoder does), and the DataLoader returns them in step order. Workers take
steps round-robin, so the data never depends on ``num_workers``; resuming at step ``s`` starts the step sequence
at ``s``. Latents are drawn on the training device (``finish_shard_batch``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from erw_fast.data.batches import BatchAssembler
from erw_fast.data.train_loader import TrainLoader, finish_shard_batch


class _Steps(torch.utils.data.Sampler[int]):
    """start, start + 1, … forever (one DataLoader item per training step)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class _StepDataset(torch.utils.data.Dataset):
    def __init__(self, assembler: BatchAssembler) -> None:
        self.assembler = assembler

    def __getitem__(self, step: int) -> dict[str, Any]:
        return self.assembler.load_step(step)  # numpy labels/indices/keys: converted in the main process


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class WebDatasetLoader(TrainLoader):
    """``kind="webdataset"``: see the module docstring. Build through ``erw_fast.data.build_loader``."""

    kind = "webdataset"

    def __init__(
        self,
        assembler: BatchAssembler,
        *,
        start_step: int,
        device: torch.device,
        num_workers: int = 4,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        latent_scale: float,
    ) -> None:
        super().__init__(assembler.sampler, start_step, assembler.num_classes, device)
        self.assembler = assembler
        self.latent_scale = latent_scale
        pin = device.type == "cuda" if pin_memory is None else pin_memory
        self._loader = torch.utils.data.DataLoader(
            _StepDataset(assembler),
            batch_size=None,  # items are already batches
            sampler=_Steps(start_step),
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=pin,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=False,
            # Its own generator: otherwise starting the iterator draws a worker seed from the global RNG and the
            # training noise would depend on the loader kind and worker count.
            generator=torch.Generator().manual_seed(assembler.opts.seed),
        )
        self._it: Iterator[dict[str, Any]] | None = None

    def next_host(self) -> dict[str, Any]:
        """The next step's batch as assembled on the host (moments and keys; latents not drawn yet)."""
        if self._it is None:
            self._it = iter(self._loader)
        batch = self.assembler.as_tensors(next(self._it))
        if batch["step"] != self.step:  # cannot happen with an in-order DataLoader; guards the resume contract
            raise RuntimeError(f"loader out of order: expected step {self.step}, got {batch['step']}")
        self._count_skips(batch["skipped"])
        self.step += 1
        return batch

    def __next__(self) -> dict[str, torch.Tensor]:
        return finish_shard_batch(self.next_host(), self.device, self.latent_scale)

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # stop worker processes now rather than at garbage collection
        self.assembler.shards.close()
