"""The webdataset-shard loader: random access through the shard index, torch ``DataLoader`` workers.

Instead of streaming tars (webdataset's sequential reader, whose order depends on shard and worker layout), every
step's samples are fetched by global index: the DataLoader's items are *steps*, each worker assembles whole batches
(``BatchAssembler.load_step``: one ``preadv`` per run of members, ``.npy`` payloads straight into the batch,
images decoded as webdataset's ``rgb8`` decoder does), and the DataLoader returns them in step order. Workers take
steps round-robin, so the data never depends on ``num_workers``; resuming at step ``s`` starts the step sequence
at ``s``. Latents are drawn on the training device (``finish_shard_batch``).

With ``num_threads`` (and no worker processes) threads of the training process assemble the steps instead. Reads
(``preadv``) and PIL decodes release the GIL, and no batch crosses a process boundary, whose shared-memory
segments cost more than reading a raw image: for raw-image or latents-only shards this is the cheapest mode per
CPU core. The data are the same as with workers (steps are assembled by step number).
"""

from __future__ import annotations

import itertools
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from erw_fast.data.batches import BatchAssembler
from erw_fast.data.train_loader import TrainLoader, finish_shard_batch
from erw_fast.stop_signals import children_inherit_blocked, loader_worker_init


def quiet_worker_count_warning() -> None:
    """torch warns (twice) at every DataLoader start when the workers exceed the usable cores, and again after any
    change to the warning filters; the trainer's ``data:`` line says it once (``loaders.resolve_num_workers``)."""
    warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes",
                            category=UserWarning)


quiet_worker_count_warning()


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


class _ThreadedSteps(Iterator[dict[str, Any]]):
    """Steps start, start + 1, … assembled by a thread pool in this process, returned in order.

    ``depth`` steps are in flight at once; a step's exception is raised when that step is due.
    """

    def __init__(self, assembler: BatchAssembler, start: int, threads: int, depth: int, pin: bool) -> None:
        self._assembler, self._pin = assembler, pin
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="erw-loader")
        self._pending: deque[Future[dict[str, Any]]] = deque()
        self._next, self._depth = start, max(1, depth)

    def _load(self, step: int) -> dict[str, Any]:
        # Pinned batches are assembled in page-locked buffers directly: no pin-memory copy afterwards.
        return self._assembler.load_step(step, pin_memory=self._pin)

    def __next__(self) -> dict[str, Any]:
        while len(self._pending) < self._depth:
            self._pending.append(self._pool.submit(self._load, self._next))
            self._next += 1
        return self._pending.popleft().result()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


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
        num_threads: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        latent_scale: float,
    ) -> None:
        super().__init__(assembler.sampler, start_step, assembler.num_classes, device)
        if num_threads < 0 or num_workers < 0:
            raise ValueError(f"num_workers and num_threads must be >= 0, got {num_workers} and {num_threads}")
        if num_threads and num_workers:
            raise ValueError(
                f"num_workers={num_workers} and num_threads={num_threads}: choose worker processes or loader "
                "threads in the training process, not both"
            )
        self.assembler = assembler
        self.latent_scale = latent_scale
        pin = device.type == "cuda" if pin_memory is None else pin_memory
        self.num_threads, self._prefetch, self._pin = num_threads, prefetch_factor, pin
        self._loader = torch.utils.data.DataLoader(
            _StepDataset(assembler),
            batch_size=None,  # items are already batches
            sampler=_Steps(start_step),
            num_workers=num_workers,
            collate_fn=_identity,
            pin_memory=pin,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=False,
            # Workers ignore the stop signals (and SIGINT) a scheduler sends the whole process group: the trainer
            # saves and stops; a worker dying of them would fail the run first.
            worker_init_fn=loader_worker_init,
            # Its own generator: otherwise starting the iterator draws a worker seed from the global RNG and the
            # training noise would depend on the loader kind and worker count.
            generator=torch.Generator().manual_seed(assembler.opts.seed),
        )
        self._it: Iterator[dict[str, Any]] | None = None

    def next_host(self) -> dict[str, Any]:
        """The next step's batch as assembled on the host (moments and keys; latents not drawn yet)."""
        if self._it is None:
            if self.num_threads:
                self._it = _ThreadedSteps(
                    self.assembler, self.step, self.num_threads, self.num_threads * self._prefetch, self._pin
                )
            else:
                with children_inherit_blocked():  # the workers are forked here
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
        if isinstance(it, _ThreadedSteps):
            it.close()
        elif it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # stop worker processes now rather than at garbage collection
            for worker in getattr(it, "_workers", []):  # one that outlived the join: its SIGTERM is ignored
                if worker.is_alive():
                    worker.kill()
        self.assembler.shards.close()
