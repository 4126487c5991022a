"""The iterator contract the trainer consumes, and the on-device finishing step shared by the shard loaders.

A ``TrainLoader`` yields, for every global step from ``start_step`` on, this rank's batch as a dict of tensors on
the training device::

    images    uint8 (B, 3, H, W)      the teacher encoder's input (absent when images were not requested)
    latents   float32 (B, C, h, w)    already sampled from the stored moments and scaled
    labels    int64 (B,)
    features  float32 (B, N, D)       only when precomputed teacher features were requested
    indices   int64 (B,) on the CPU   the global sample indices actually loaded (debugging / logging)

``position(step)`` is plain data for checkpoints. Resuming needs only the step: ``build_loader(..., start_step=s)``
yields exactly what an uninterrupted run yields from step ``s`` on, for any number of workers.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from erw_fast.data.latents import sample_latents
from erw_fast.data.sampler import ResumableBatchSampler

log = logging.getLogger(__name__)

_MAX_LOGGED_SKIPS = 20  # individual warnings before the loader only counts


class TrainLoader(ABC, Iterator[dict[str, torch.Tensor]]):
    """Base of every loader kind: step bookkeeping, positions, skip accounting."""

    kind: str = "?"

    def __init__(self, sampler: ResumableBatchSampler, start_step: int, num_classes: int, device: torch.device):
        if start_step < 0:
            raise ValueError(f"start_step must be ≥ 0, got {start_step}")
        self.sampler = sampler
        self.num_samples = sampler.num_samples
        self.num_classes = num_classes
        self.steps_per_epoch = sampler.steps_per_epoch
        self.global_batch_size = sampler.global_batch_size
        self.local_batch_size = sampler.local_batch_size
        self.seed = sampler.seed
        self.device = device
        self.start_step = start_step
        self.step = start_step  # the step of the next batch
        self.skipped = 0  # unreadable samples replaced so far (on_error="skip"), on this rank

    def __iter__(self) -> TrainLoader:
        return self

    @abstractmethod
    def __next__(self) -> dict[str, torch.Tensor]:
        """This rank's batch for ``self.step``; advances ``self.step``."""

    def position(self, step: int | None = None) -> dict[str, Any]:
        """Where ``step`` (default: the next one) lies in the data order, as plain data."""
        step = self.step if step is None else step
        return {**self.sampler.position(step), "kind": self.kind, "seed": self.seed, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size, "skipped": self.skipped}

    def restore_skip_count(self, count: int) -> None:
        """Continue the count of replaced samples from a checkpoint (before the first batch)."""
        self.skipped = count

    def close(self) -> None:
        """Release workers and files (idempotent)."""

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _count_skips(self, messages: list[str], count: int | None = None) -> None:
        """Count replaced samples; the first few are logged one by one, then totals at powers of two."""
        count = len(messages) if count is None else count
        if not count:
            return
        for msg in messages[: max(0, _MAX_LOGGED_SKIPS - self.skipped)]:
            log.warning("step %d: skipped unreadable sample: %s", self.step, msg)
        before, self.skipped = self.skipped, self.skipped + count
        if self.skipped > _MAX_LOGGED_SKIPS and before.bit_length() != self.skipped.bit_length():
            log.warning("%d unreadable samples skipped so far on this rank (step %d)", self.skipped, self.step)


def finish_shard_batch(
    batch: dict[str, Any], device: torch.device, scale: float, non_blocking: bool = True
) -> dict[str, torch.Tensor]:
    """CPU (or DALI-on-device) batch → the trainer's dict: latents drawn on ``device``, images to NCHW."""
    moments = batch["moments"].to(device, non_blocking=non_blocking)
    keys = batch["keys"].to(device, non_blocking=non_blocking)
    out = {
        "latents": sample_latents(moments, keys, scale),
        "labels": batch["labels"].to(device, non_blocking=non_blocking),
        "indices": batch["indices"].cpu(),
    }
    if "images" in batch:  # stored HWC (what decoders produce); NCHW contiguous on the device
        out["images"] = batch["images"].to(device, non_blocking=non_blocking).permute(0, 3, 1, 2).contiguous()
    if "features" in batch:
        out["features"] = batch["features"].to(device, non_blocking=non_blocking).float()
    return out
