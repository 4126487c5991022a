"""Deterministic, resumable, rank-sharded batch sampler.

Step ``s`` is a pure function of ``(seed, s, rank)``: epoch ``e = s // steps_per_epoch`` uses the permutation
``randperm(num_samples)`` from a generator seeded with ``seed * 1_000_003 + e``, step ``s`` takes chunk
``s % steps_per_epoch`` of ``global_batch_size`` indices of it, and rank ``r`` takes the ``r``-th contiguous slice
of ``global_batch_size // world_size`` of that chunk. Resuming at step ``k`` therefore costs one permutation, not
``k`` skipped batches, and needs nothing from the checkpoint beyond the step (``position`` is for the record).
"""

from __future__ import annotations

from collections.abc import Iterator


class ResumableBatchSampler:
    """Infinite sampler of per-rank index lists, one list per global step.

    ``drop_last=True``: ``steps_per_epoch = num_samples // global_batch_size`` and the tail of each permutation is
    dropped (every index at most once per epoch). ``drop_last=False``: ``ceil(num_samples / global_batch_size)``
    steps, the last chunk padded with the first indices of the same permutation so every batch keeps its size
    (every index at least once per epoch).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be ≥ 1, got {num_samples}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be ≥ 1, got {global_batch_size}")
        if global_batch_size > num_samples:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be ≤ num_samples ({num_samples})")
        if world_size < 1:
            raise ValueError(f"world_size must be ≥ 1, got {world_size}")
        if global_batch_size % world_size:
            raise ValueError(f"global_batch_size ({global_batch_size}) must be divisible by world_size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.local_batch_size = global_batch_size // world_size
        self.steps_per_epoch = num_samples // global_batch_size if drop_last else -(-num_samples // global_batch_size)
        self._start_step = 0
        self._cache: tuple[int, list[int]] | None = None  # (epoch, padded permutation) of the last epoch used

    def epoch_seed(self, epoch: int) -> int:
        # Kept below 2**63 so torch.Generator.manual_seed accepts it for any seed/epoch.
        return (self.seed * 1_000_003 + epoch) % (1 << 63)

    def _permutation(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            import torch  # local: the sampler is otherwise plain Python

            g = torch.Generator().manual_seed(self.epoch_seed(epoch))
            perm = torch.randperm(self.num_samples, generator=g).tolist()
            pad = self.steps_per_epoch * self.global_batch_size - len(perm)
            if pad > 0:  # drop_last=False: wrap around within the same epoch's order
                perm = perm + perm[:pad]
            self._cache = (epoch, perm)
        return self._cache[1]

    def indices(self, step: int) -> list[int]:
        """This rank's indices for global step ``step`` (random access)."""
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        epoch, chunk = divmod(step, self.steps_per_epoch)
        start = chunk * self.global_batch_size + self.rank * self.local_batch_size
        return self._permutation(epoch)[start : start + self.local_batch_size]

    def batches(self, start_step: int = 0) -> Iterator[list[int]]:
        """Yield this rank's index list for every global step from ``start_step`` on, forever."""
        if start_step < 0:
            raise ValueError(f"start_step must be ≥ 0, got {start_step}")
        step = start_step
        while True:
            yield self.indices(step)
            step += 1

    def position(self, step: int) -> dict[str, int]:
        """Where global step ``step`` lies, as plain data for checkpoints and logs."""
        epoch, chunk = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "offset_in_epoch": chunk * self.global_batch_size, "step": step}

    def set_start_step(self, step: int) -> None:
        """Make ``iter(sampler)`` (e.g. ``DataLoader(batch_sampler=sampler)``) start at ``step``."""
        if step < 0:
            raise ValueError(f"start step must be ≥ 0, got {step}")
        self._start_step = step

    def __iter__(self) -> Iterator[list[int]]:
        return self.batches(self._start_step)
