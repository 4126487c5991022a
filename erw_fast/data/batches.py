"""What goes into a batch: the global order, per-sample flips, reading, and the error policy.

Shared by the webdataset and the DALI loader so both produce the same samples for the same seed and step:

* step ``s`` holds ``ResumableBatchSampler(num_samples, global_batch, seed, rank, world_size).indices(s)``, epoch
  ``s // steps_per_epoch``;
* the slot of (original) index ``i`` gets ``key = sample_key(seed, epoch, i)``; it decides the flip (when enabled)
  and, on the device, the latent noise;
* a sample that cannot be read, or whose latent moments or features hold NaN/inf, raises (``on_error="raise"``:
  ``SampleError`` naming shard and key) or is replaced by the next readable index (``"skip"``; unusable shards are
  jumped over), keeping the slot's key, and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from erw_fast.data.images import check_image_bytes, decode_image
from erw_fast.data.latents import flip_decision, sample_key, sample_keys
from erw_fast.data.sampler import ResumableBatchSampler
from erw_fast.data.shards import (
    MEMBER_FEATURES,
    MEMBER_LABEL,
    MEMBER_MOMENTS,
    MEMBER_MOMENTS_FLIP,
    DataError,
    OnError,
    SampleError,
    ShardSet,
)

log = logging.getLogger(__name__)

# Consecutive unreadable candidates tried for one slot before giving up (beyond unusable shards, which are jumped).
MAX_REPLACEMENT_TRIES = 1000


@dataclass(frozen=True)
class LoadOptions:
    seed: int
    images: bool = True  # read and decode the image (the teacher's input); False for plain SiT
    features: bool = False  # read precomputed teacher features
    flip: bool = False  # horizontal flip per sample (needs moments of flipped images in the dataset)
    on_error: OnError = "raise"
    num_classes: int | None = None  # labels must be below this (the model's class count); default: the manifest's


def _batch_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, pin: bool = False
) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised batch tensor and its numpy view, allocated where it will be consumed.

    In a DataLoader worker the batch goes to the main process through shared memory: allocating it there directly
    (as torch's default_collate does) saves a full copy. ``pin`` (loader threads feeding a GPU): page-locked
    memory from torch's caching host allocator, so the copy to the device needs no staging copy. Otherwise
    numpy's allocator is used because it asks for transparent huge pages on large buffers, which makes filling a
    fresh 50-100 MB batch several times cheaper.
    """
    if pin:
        t = torch.empty(shape, dtype=dtype, pin_memory=True)
        return t, t.numpy()
    if torch.utils.data.get_worker_info() is not None:
        nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        t = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)
        return t, t.numpy()
    a = np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    return torch.from_numpy(a), a


class BatchAssembler:
    """Reads this rank's samples for a step; picklable (workers re-open their own file descriptors)."""

    def __init__(self, shards: ShardSet, sampler: ResumableBatchSampler, opts: LoadOptions) -> None:
        man = shards.manifest
        if opts.on_error != shards.on_error:
            raise ValueError(f"on_error {opts.on_error!r} differs from the ShardSet's {shards.on_error!r}")
        if opts.flip and not man.flip_moments:
            raise DataError(
                f"flip=True needs the moments of flipped images, but {shards.root} was prepared without them "
                "(rerun erw-prepare with --flip-moments, or set flip=False)"
            )
        if opts.features and man.features is None:
            raise DataError(f"features requested, but {shards.root} has no precomputed encoder features")
        self.num_classes = opts.num_classes if opts.num_classes is not None else man.num_classes
        if man.num_classes > self.num_classes:
            raise DataError(
                f"{shards.root} has {man.num_classes} classes, more than the model's num_classes={self.num_classes}"
            )
        if sampler.num_samples != man.num_samples:
            raise ValueError(f"sampler over {sampler.num_samples} samples, dataset has {man.num_samples}")
        self.shards, self.sampler, self.opts = shards, sampler, opts
        self.image_member = man.image_member
        self.image_format = man.image_format
        # Indices whose images passed the structural check but failed in DALI's decoder (found by diagnose()).
        self.undecodable: set[int] = set()
        # Images erw-prepare could not read (manifest.skipped): never drawn, whatever on_error says, and not counted.
        self.left_out = {int(s["index"]) for s in man.skipped}
        self.raw_images = man.image_format == "raw"
        self.moments_shape = tuple(man.moments_shape)
        self.image_shape = (man.image_size, man.image_size, 3)
        self.feature_shape = tuple(man.features["shape"]) if man.features else None

    # -- order ------------------------------------------------------------------------------------------------

    def epoch(self, step: int) -> int:
        return step // self.sampler.steps_per_epoch

    def plan(self, step: int) -> tuple[int, list[int], np.ndarray, list[bool]]:
        """(epoch, original indices, int64 keys, flips) of this rank's slots at ``step``."""
        epoch = self.epoch(step)
        indices = self.sampler.indices(step)
        keys = sample_keys(self.opts.seed, epoch, indices)
        if self.opts.flip:
            flips = [flip_decision(sample_key(self.opts.seed, epoch, i)) for i in indices]
        else:
            flips = [False] * len(indices)
        return epoch, indices, keys, flips

    def _candidates(self, index: int) -> Iterator[int]:
        """``index``, then the following indices (wrapping). An unusable shard is jumped over to the same position
        in the next shard, so a lost shard's slots spread over its neighbour instead of all landing on one sample."""
        shards, n = self.shards, self.shards.num_samples
        yield index
        i, tried, jumps = (index + 1) % n, 1, 0
        while tried < n and jumps <= len(shards.manifest.shards):
            sid = shards.shard_of(i)
            if sid in shards.bad_shards:
                start, end = shards.manifest.shards[sid].first_index, shards.shard_end(sid)
                nxt = end % n
                i = min(nxt + (i - start), shards.shard_end(shards.shard_of(nxt)) - 1)
                jumps += 1
                continue
            yield i
            i, tried = (i + 1) % n, tried + 1

    def _members(self, flip: bool) -> list[str]:
        members = [MEMBER_LABEL, MEMBER_MOMENTS_FLIP if flip else MEMBER_MOMENTS]
        if self.opts.images:
            members.append(self.image_member)
        if self.opts.features:
            members.append(MEMBER_FEATURES)
        return members

    def _read(self, index: int, flip: bool, out: dict[str, np.ndarray], decode: bool) -> tuple[int, Any]:
        """Read one sample into ``out``; returns (label, image). ``decode``: the image comes back decoded (HWC,
        flipped if ``flip``); otherwise as stored (encoded bytes, or the raw array unflipped) for DALI to decode."""
        members = self._members(flip)
        got = self.shards.read(index, members, out)
        numeric = [MEMBER_MOMENTS_FLIP if flip else MEMBER_MOMENTS] + ([MEMBER_FEATURES] if self.opts.features else [])
        for member in numeric:
            # A NaN/inf here would make every step that draws this sample non-finite, and the step would be
            # skipped without saying why: name the sample and let on_error decide, as for any corrupt sample.
            if not np.isfinite(got[member]).all():
                raise self.shards.error(index, f"{member} holds NaN or inf values")
        label = self.shards.label(index, got[MEMBER_LABEL])
        if not 0 <= label < self.num_classes:
            raise self.shards.error(index, f"label {label} outside [0, {self.num_classes})")
        image = None
        if self.opts.images:
            image = got[self.image_member]
            if not self.raw_images:
                problem = check_image_bytes(image, self.image_format, self.image_shape[0])
                if problem is None and index in self.undecodable:
                    problem = "DALI's decoder failed on it"
                if problem is not None:
                    raise self.shards.error(index, f"{self.image_member}: {problem}")
            if decode and not self.raw_images:
                try:
                    image = decode_image(image)
                except Exception as exc:  # PIL raises many types for corrupt data
                    raise self.shards.error(index, f"{self.image_member} does not decode: {exc}") from exc
            if decode and image.shape != self.image_shape:
                raise self.shards.error(index, f"image shape {image.shape}, expected {self.image_shape}")
            if decode and flip:
                image = image[:, ::-1]
        return label, image

    def _read_with_policy(
        self, index: int, flip: bool, out: dict[str, np.ndarray], decode: bool, skipped: list[str]
    ) -> tuple[int, int, Any]:
        """(loaded index, label, image) for the slot of ``index``, applying ``on_error``."""
        tries = 0
        for cand in self._candidates(index):
            if cand in self.left_out:
                continue
            try:
                label, image = self._read(cand, flip, out, decode)
                return cand, label, image
            except SampleError as exc:
                if self.opts.on_error == "raise":
                    raise
                skipped.append(str(exc))
                tries += 1
                if tries >= MAX_REPLACEMENT_TRIES:
                    break
        raise DataError(f"no readable sample found to replace index {index} after {tries} unreadable candidates")

    # -- webdataset / torch path: whole batches ---------------------------------------------------------------

    def load_step(self, step: int, pin_memory: bool = False) -> dict[str, Any]:
        """This rank's batch for ``step`` on the host (images decoded, HWC; see ``as_tensors``); ``pin_memory``:
        the large buffers are page-locked (in-process loading for a GPU)."""
        epoch, indices, keys, flips = self.plan(step)
        b = len(indices)
        moments, m_np = _batch_buffer((b, *self.moments_shape), torch.float16, pin_memory)
        images, i_np = (
            _batch_buffer((b, *self.image_shape), torch.uint8, pin_memory) if self.opts.images else (None, None)
        )
        features, f_np = (
            _batch_buffer((b, *self.feature_shape), torch.float16, pin_memory) if self.opts.features else (None, None)
        )
        labels = np.empty(b, dtype=np.int64)
        loaded = np.empty(b, dtype=np.int64)
        skipped: list[str] = []
        for slot, (index, flip) in enumerate(zip(indices, flips, strict=True)):
            out = {MEMBER_MOMENTS_FLIP if flip else MEMBER_MOMENTS: m_np[slot]}
            slot_image = i_np[slot] if i_np is not None and self.raw_images else None
            if slot_image is not None:
                out[self.image_member] = slot_image  # raw images are read straight into the batch
            if f_np is not None:
                out[MEMBER_FEATURES] = f_np[slot]
            loaded[slot], labels[slot], image = self._read_with_policy(index, flip, out, True, skipped)
            if i_np is not None and image is not slot_image:
                i_np[slot] = image  # decoded PNG/JPEG, or a flipped view of the raw slot (numpy handles the overlap)
        # Small arrays stay numpy: a worker pickles them inline, whereas every tensor costs a shared-memory segment
        # and a file descriptor passed to the main process (``as_tensors`` converts them there).
        batch: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "moments": moments,
            "labels": labels,
            "indices": loaded,
            "keys": keys,
            "skipped": skipped,
        }
        if images is not None:
            batch["images"] = images
        if features is not None:
            batch["features"] = features
        return batch

    @staticmethod
    def as_tensors(batch: dict[str, Any]) -> dict[str, Any]:
        """``load_step``'s batch with its numpy arrays as tensors (in place; returns it)."""
        for k in ("labels", "indices", "keys"):
            batch[k] = torch.from_numpy(batch[k])
        return batch

    # -- DALI path: one sample per callback -------------------------------------------------------------------

    def diagnose(self, step: int) -> list[tuple[int, SampleError]]:
        """The samples of ``step`` (after replacements) whose images PIL cannot decode: ``(index, error)``."""
        _, indices, _, flips = self.plan(step)
        found = []
        for index, flip in zip(indices, flips, strict=True):
            out = {MEMBER_MOMENTS_FLIP if flip else MEMBER_MOMENTS: np.empty(self.moments_shape, np.float16)}
            try:
                loaded, _, _ = self._read_with_policy(index, flip, out, False, [])
                self._read(loaded, flip, out, True)
            except SampleError as exc:
                found.append((int(exc.key), exc))
        return found

    def dali_outputs(self) -> list[str]:
        names = ["moments", "labels", "indices", "keys", "flips", "skipped"]
        if self.opts.images:
            names.append("images")
        if self.opts.features:
            names.append("features")
        return names

    def load_sample(self, step: int, slot: int) -> tuple[np.ndarray, ...]:
        """Slot ``slot`` of ``step`` as numpy arrays in ``dali_outputs()`` order; the image undecoded, unflipped."""
        epoch = self.epoch(step)
        index = self.sampler.indices(step)[slot]
        key = sample_key(self.opts.seed, epoch, index)
        flip = self.opts.flip and flip_decision(key)
        out = {MEMBER_MOMENTS_FLIP if flip else MEMBER_MOMENTS: np.empty(self.moments_shape, np.float16)}
        if self.opts.features:
            out[MEMBER_FEATURES] = np.empty(self.feature_shape, np.float16)
        if self.opts.images and self.raw_images:
            out[self.image_member] = np.empty(self.image_shape, np.uint8)
        skipped: list[str] = []
        loaded, label, image = self._read_with_policy(index, flip, out, False, skipped)
        for msg in skipped:  # DALI workers cannot return strings; the count travels, the messages are logged here
            log.warning("skipped unreadable sample: %s", msg)
        moments = out[MEMBER_MOMENTS_FLIP if flip else MEMBER_MOMENTS]
        res = [
            moments,
            np.array(label, np.int64),
            np.array(loaded, np.int64),
            np.array(sample_keys(self.opts.seed, epoch, [index])[0], np.int64),
            np.array(int(flip), np.int32),
            np.array(len(skipped), np.int32),
        ]
        if self.opts.images:
            res.append(image if self.raw_images else np.frombuffer(image, dtype=np.uint8))
        if self.opts.features:
            res.append(out[MEMBER_FEATURES])
        return tuple(res)
