"""Device prefetch: the next step's batch is staged on a side CUDA stream while the current step computes.

Without it, step ``s``'s host-to-device copies (and the latent sampling that follows them) are queued on the
compute stream behind step ``s - 1``'s backward and optimizer, so the GPU computes nothing while they run. Staged
on a side stream one step ahead, they run on the copy engine during step ``s - 1``; the compute stream only
waits on an event that has normally already fired.

``SideStreamStager`` is the mechanism (any producer of tensors); ``DevicePrefetcher`` wraps a ``TrainLoader``
with it and keeps the loader contract: the same batches in the same order, ``position(step)`` and the skip count
as of the batches handed out (not the one staged ahead), and an error raised while staging step ``s + 1`` is
raised when the trainer asks for step ``s + 1``, so step ``s`` still completes and checkpoints as it would have.
On a CPU device there is no stream: batches are produced one ahead in order (what the CPU tests exercise).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from erw_fast.data.train_loader import TrainLoader

T = TypeVar("T")


@dataclass
class _Staged(Generic[T]):
    item: T | None
    ready: torch.cuda.Event | None
    error: BaseException | None
    skipped: int  # the wrapped loader's skip count once this item was produced


def _tensors(item: Any) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, dict):
        for value in item.values():
            yield from _tensors(value)
    elif isinstance(item, list | tuple):
        for value in item:
            yield from _tensors(value)


class SideStreamStager(Generic[T]):
    """Calls ``produce()`` one item ahead; on CUDA under a side stream, handing items to the caller's stream.

    ``produce`` runs its device work (non-blocking copies from pinned memory, kernels) on the side stream. The
    consuming stream waits on an event recorded after it, and every CUDA tensor of the item is marked as used by
    the consuming stream (``record_stream``) so the caching allocator does not hand its memory back to the side
    stream while the step still reads it.
    """

    def __init__(self, produce: Callable[[], T], device: torch.device | str,
                 skip_count: Callable[[], int] = lambda: 0) -> None:
        self.device = torch.device(device)
        self._produce, self._skip_count = produce, skip_count
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._staged: _Staged[T] | None = None
        self.skipped = 0  # ``skip_count()`` as of the last item handed out

    def _stage(self) -> _Staged[T]:
        context = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        try:
            with context:
                item = self._produce()
                ready = self.stream.record_event() if self.stream is not None else None
        except Exception as err:  # handed out in order, at the step that would have raised it
            return _Staged(None, None, err, self._skip_count())
        return _Staged(item, ready, None, self._skip_count())

    def __iter__(self) -> SideStreamStager[T]:
        return self

    def __next__(self) -> T:
        staged = self._staged if self._staged is not None else self._stage()
        self._staged = None
        if staged.error is not None:
            raise staged.error
        self.skipped = staged.skipped
        self._staged = self._stage()  # the next item's copies overlap the step that consumes this one
        if staged.ready is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(staged.ready)
            for tensor in _tensors(staged.item):
                if tensor.is_cuda:
                    tensor.record_stream(consumer)
        return staged.item  # type: ignore[return-value]

    def drop(self) -> None:
        """Forget the item staged ahead (its memory returns to the allocator once the side stream is done)."""
        self._staged = None


class DevicePrefetcher(TrainLoader):
    """A ``TrainLoader`` whose batches were staged on a side stream one step ahead (see the module docstring)."""

    def __init__(self, loader: TrainLoader) -> None:
        super().__init__(loader.sampler, loader.start_step, loader.num_classes, loader.device)
        self.loader = loader
        self.kind = loader.kind
        self._stager = SideStreamStager(lambda: next(loader), loader.device, lambda: loader.skipped)

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._stager)
        self.step += 1
        self.skipped = self._stager.skipped
        return batch

    def restore_skip_count(self, count: int) -> None:
        self.loader.restore_skip_count(count)
        self.skipped = self._stager.skipped = count

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The side stream batches are staged on (None on a CPU device)."""
        return self._stager.stream

    def close(self) -> None:
        self._stager.drop()
        self.loader.close()


def describe_device_prefetch(loader: TrainLoader) -> str:
    if isinstance(loader, DevicePrefetcher):
        where = "a side CUDA stream" if loader.stream is not None else "the host (no CUDA stream)"
        return f"device prefetch: next batch staged on {where}"
    return "device prefetch: off"
