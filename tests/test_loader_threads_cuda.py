"""Loader threads feeding a GPU: batches assembled in page-locked memory, identical to the unpinned ones.

Needs CUDA (page-locked allocation does); runs in `benchmarks/gpu_suite.sh tests`. Needs neither webdataset
nor DALI, which the GPU image lacks.
"""

from __future__ import annotations

import pytest
import torch
from _shard_helpers import make_loader, write_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_threads_pin_their_batches_and_match_unpinned(tmp_path):
    write_dataset(tmp_path, image_format="raw")
    kwargs = dict(global_batch_size=8, seed=7, image_size=32, num_workers=0, loader_threads=2, features=True)
    pinned = make_loader("webdataset", tmp_path, device="cuda", **kwargs)
    plain = make_loader("webdataset", tmp_path, device="cuda", pin_memory=False, **kwargs)
    with pinned, plain:
        for _ in range(3):
            a, b = pinned.next_host(), plain.next_host()
            for key in ("moments", "images", "features"):
                assert a[key].is_pinned() and not b[key].is_pinned(), key
                assert torch.equal(a[key], b[key]), key
        on_device = next(pinned)
        assert on_device["images"].is_cuda and on_device["latents"].is_cuda
