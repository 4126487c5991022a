"""Device prefetch keeps the loader contract: same batches and positions, skips and errors at their own step.

On the CPU there is no side stream, but the one-step-ahead order, the deferred errors and the skip accounting are
the same code; the stream handling itself is checked on CUDA (bottom of the file, `gpu_suite.sh tests`).
"""

from __future__ import annotations

import pytest
import torch
from _shard_helpers import make_loader, patch_image, write_dataset

from erw_fast.data import ResumableBatchSampler
from erw_fast.data.device_prefetch import DevicePrefetcher, SideStreamStager, describe_device_prefetch
from erw_fast.data.shards import SampleError

BATCH = 8


def _loader(path, device="cpu", **kw):
    args = dict(global_batch_size=BATCH, seed=7, image_size=32, num_workers=0, features=True, device=device)
    args.update(kw)
    return make_loader("webdataset", path, **args)


def _corrupt_image_of(path, step, slot):
    """Zero the stored PNG of the sample in ``slot`` of ``step``; returns its index."""
    bad = ResumableBatchSampler(40, BATCH, seed=7).indices(step)[slot]
    patch_image(path, bad, lambda png: bytes(len(png)))
    return bad


@pytest.mark.parametrize("threads", [0, 2])
def test_prefetched_batches_and_positions_equal_the_plain_loader(tmp_path, threads):
    write_dataset(tmp_path, image_format="raw")
    with _loader(tmp_path, loader_threads=threads, start_step=3) as plain, \
            _loader(tmp_path, loader_threads=threads, start_step=3, device_prefetch=True) as staged:
        assert isinstance(staged, DevicePrefetcher) and staged.kind == plain.kind
        assert staged.position() == plain.position()
        for _ in range(6):  # crosses an epoch boundary (5 steps per epoch)
            a, b = next(plain), next(staged)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key
            assert staged.step == plain.step and staged.position() == plain.position()
        assert staged.loader.step == plain.step + 1  # one batch staged ahead


def test_an_error_staged_ahead_is_raised_at_its_own_step(tmp_path):
    write_dataset(tmp_path, image_format="png")
    bad = _corrupt_image_of(tmp_path, step=1, slot=3)
    with _loader(tmp_path, device_prefetch=True) as staged:
        first = next(staged)  # staging step 1 failed already; step 0 is still handed out
        assert bad not in first["indices"].tolist() and staged.step == 1
        with pytest.raises(SampleError, match=f"key {bad:08d}"):
            next(staged)


def test_skips_count_for_the_batches_handed_out(tmp_path):
    write_dataset(tmp_path, image_format="png")
    _corrupt_image_of(tmp_path, step=1, slot=3)
    plain, staged = _loader(tmp_path, on_error="skip"), _loader(tmp_path, on_error="skip", device_prefetch=True)
    with plain, staged:
        for step in range(3):
            a, b = next(plain), next(staged)
            assert torch.equal(a["indices"], b["indices"])
            assert staged.skipped == plain.skipped == (step >= 1), step
            assert staged.position() == plain.position()


def test_stager_produces_one_item_ahead_in_order():
    produced = []

    def produce():
        produced.append(len(produced))
        return {"x": torch.tensor(produced[-1])}

    stager = SideStreamStager(produce, "cpu")
    assert produced == []  # nothing before the first request
    assert next(stager)["x"].item() == 0 and produced == [0, 1]
    assert [next(stager)["x"].item() for _ in range(3)] == [1, 2, 3] and produced == [0, 1, 2, 3, 4]
    stager.drop()
    assert next(stager)["x"].item() == 5  # a dropped item is not handed out


def test_described_in_the_run_log(tmp_path):
    write_dataset(tmp_path, image_format="raw")
    with _loader(tmp_path) as plain, _loader(tmp_path, device_prefetch=True) as staged:
        assert describe_device_prefetch(plain) == "device prefetch: off"
        assert "the host (no CUDA stream)" in describe_device_prefetch(staged)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_batches_staged_on_a_side_stream_are_safe_to_use(tmp_path):
    """Same batches as the plain loader, staged on another stream; a batch the compute stream reads late (behind
    long work) and drops right away is not overwritten by the batches staged meanwhile (``record_stream``)."""
    write_dataset(tmp_path, image_format="raw")
    busy = torch.randn(4096, 4096, device="cuda")
    expected, late = [], []
    with _loader(tmp_path, "cuda", loader_threads=2) as plain, \
            _loader(tmp_path, "cuda", loader_threads=2, device_prefetch=True) as staged:
        assert staged._stager.stream is not None
        assert "side CUDA stream" in describe_device_prefetch(staged)
        for _ in range(6):
            a = next(plain)
            torch.cuda.synchronize()
            expected.append({k: a[k].clone() for k in ("latents", "images", "labels", "features")})
            b = next(staged)  # stages the next batch on the side stream
            for _ in range(20):  # milliseconds of compute-stream work before the batch is read
                busy = torch.tanh(busy @ busy)
            late.append({k: b[k] * 1 for k in expected[-1]})  # queued behind the work above
            del b  # freed while the compute stream has not read it yet
    torch.cuda.synchronize()
    for step, (want, got) in enumerate(zip(expected, late, strict=True)):
        for key in want:
            assert torch.equal(want[key], got[key]), (step, key)
