"""The shard format: writer vs DALI's wds2idx and webdataset's reader, bit-exact round trip, manifest checks."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading

import numpy as np
import pytest
import webdataset as wds
from _shard_helpers import write_dataset
from PIL import Image

from erw_fast.data.shards import (
    MEMBER_FEATURES,
    MEMBER_LABEL,
    MEMBER_MOMENTS,
    MEMBER_MOMENTS_FLIP,
    DataError,
    Manifest,
    SampleError,
    ShardSet,
    ShardWriter,
    decode_npy,
    npy_bytes,
    read_index,
)


def _write_shard(tmp_path, name="s"):
    rng = np.random.default_rng(1)
    samples = []
    for i in range(7):  # member sizes around and across 512-byte block boundaries
        samples.append((f"{i:04d}", [("cls", str(i).encode()), ("bin", rng.bytes(int(rng.integers(0, 1500)))),
                                     ("x.npy", npy_bytes(rng.normal(size=(3, i + 1)).astype(np.float16)))]))
    tar, idx = tmp_path / f"{name}.tar", tmp_path / f"{name}.idx"
    with ShardWriter(tar, idx) as w:
        for key, members in samples:
            w.add(key, members)
        info = w.commit()
    return tar, idx, info, samples


def test_writer_index_is_wds2idx_and_tar_is_standard(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # DALI's own index tool: the independent reference
    tar, idx, info, samples = _write_shard(tmp_path)
    ref = tmp_path / "ref.idx"
    with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as creator:
        creator.create_index()
    assert idx.read_text() == ref.read_text()
    assert info.sha256 == hashlib.sha256(tar.read_bytes()).hexdigest() and info.bytes == tar.stat().st_size
    with tarfile.open(tar) as tf:  # the standard library sees exactly the members, in order
        got = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    assert got == [(f"{k}.{ext}", data) for k, members in samples for ext, data in members]
    parsed = read_index(idx)
    assert parsed.members == ("cls", "bin", "x.npy") and parsed.keys == tuple(k for k, _ in samples)
    raw = tar.read_bytes()
    for i, (_, members) in enumerate(samples):
        for j, (_, data) in enumerate(members):
            off, size = parsed.offsets[i, j], parsed.sizes[i, j]
            assert raw[off : off + size] == data


def test_writer_is_deterministic_and_atomic(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, _, info_a, _ = _write_shard(tmp_path / "a")
    _, _, info_b, _ = _write_shard(tmp_path / "b")
    assert info_a.sha256 == info_b.sha256  # mtime-free headers: reruns reproduce checksums
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "c.tar", tmp_path / "c.idx") as w:
            w.add("0", [("cls", b"1")])
            raise RuntimeError("killed")
    assert not list(tmp_path.glob("c.*"))  # nothing half-written is left under a final (or temporary) name
    w = ShardWriter(tmp_path / "d.tar", tmp_path / "d.idx")
    w.add("0", [("cls", b"1")])
    with pytest.raises(ValueError, match="members"):
        w.add("1", [("cls", b"1"), ("png", b"")])
    with pytest.raises(ValueError, match="key"):
        w.add("a.b", [("cls", b"1")])
    w.abort()


@pytest.mark.parametrize("fmt", ["png", "jpg", "raw"])
def test_round_trip_bit_exact(tmp_path, fmt):
    truth = write_dataset(tmp_path, image_format=fmt)
    shards = ShardSet(tmp_path, verify="checksum")
    image_member = shards.manifest.image_member
    members = [MEMBER_LABEL, MEMBER_MOMENTS, MEMBER_MOMENTS_FLIP, image_member, MEMBER_FEATURES]
    for i in range(shards.num_samples):
        into = np.empty_like(truth["moments"][i])
        got = shards.read(i, members, out={MEMBER_MOMENTS: into})
        assert got[MEMBER_MOMENTS] is into and into.tobytes() == truth["moments"][i].tobytes()
        assert got[MEMBER_MOMENTS_FLIP].tobytes() == truth["moments_flip"][i].tobytes()
        assert got[MEMBER_FEATURES].tobytes() == truth["features"][i].tobytes()
        assert shards.label(i, got[MEMBER_LABEL]) == truth["labels"][i]
        if fmt == "raw":
            np.testing.assert_array_equal(got[image_member], truth["images"][i])
        else:
            assert bytes(got[image_member]) == truth["encoded"][i]
            decoded = np.asarray(Image.open(io.BytesIO(got[image_member])).convert("RGB"))
            if fmt == "png":
                np.testing.assert_array_equal(decoded, truth["images"][i])

    # webdataset's own sequential reader and decoders see the same samples
    urls = [str(tmp_path / s.tar) for s in shards.manifest.shards]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"):
        i = int(sample["__key__"])
        assert sample["cls"] == truth["labels"][i]
        assert sample["moments.npy"].tobytes() == truth["moments"][i].tobytes()
        assert sample["moments_flip.npy"].tobytes() == truth["moments_flip"][i].tobytes()
        if fmt != "jpg":
            np.testing.assert_array_equal(sample[image_member], truth["images"][i])
        else:
            np.testing.assert_array_equal(sample["jpg"], np.asarray(Image.open(io.BytesIO(truth["encoded"][i]))))
        seen += 1
    assert seen == len(truth["labels"])


def test_concurrent_readers_share_a_descriptor_budget(tmp_path):
    # Four threads read every sample of 10 shards in different orders while the descriptor budget is 3:
    # each thread evicts only from its own cache, so no read ever uses a descriptor another thread closed.
    truth = write_dataset(tmp_path, num_samples=40, per_shard=4, image_format="raw")
    shards = ShardSet(tmp_path)
    shards._max_fds = 3
    members = [MEMBER_LABEL, MEMBER_MOMENTS, shards.manifest.image_member]
    errors = []

    def read_all(order):
        try:
            for _ in range(3):
                for i in order:
                    got = shards.read(i, members)
                    assert got[MEMBER_MOMENTS].tobytes() == truth["moments"][i].tobytes(), i
                    assert shards.label(i, got[MEMBER_LABEL]) == truth["labels"][i], i
        except Exception as exc:  # noqa: BLE001 - reported below with the thread's order
            errors.append((order[:3], exc))

    orders = [list(range(40)), list(range(39, -1, -1)), list(range(0, 40, 3)) + list(range(1, 40, 3)), [7] * 40]
    threads = [threading.Thread(target=read_all, args=(o,)) for o in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert shards._open_fds <= shards._max_fds + len(threads)  # at most one over per thread
    assert sum(len(c) for c in shards._fd_caches) == shards._open_fds
    shards.close()
    assert shards._open_fds == 0 and all(not c for c in shards._fd_caches)


def test_decode_npy_fast_path_equals_numpy():
    arr = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    data = npy_bytes(arr)
    header = data[: len(data) - arr.nbytes]
    np.testing.assert_array_equal(decode_npy(data, header), np.load(io.BytesIO(data)))
    np.testing.assert_array_equal(decode_npy(data), arr)  # no expected header: plain np.load


def test_manifest_and_shard_checks(tmp_path):
    write_dataset(tmp_path, num_samples=30, per_shard=10)
    man = json.loads((tmp_path / "manifest.json").read_text())

    bad = {**man, "num_samples": 31}
    with pytest.raises(DataError, match="sum to 30"):
        Manifest.from_dict(bad)
    with pytest.raises(DataError, match="version"):
        Manifest.from_dict({**man, "version": 99})

    tar1 = tmp_path / "shards" / "shard-000001.tar"
    data = bytearray(tar1.read_bytes())
    data[3000] ^= 0xFF  # same size, one flipped byte: only the checksum sees it
    tar1.write_bytes(bytes(data))
    ShardSet(tmp_path, verify="size")
    with pytest.raises(DataError, match="shard-000001.*sha256"):
        ShardSet(tmp_path, verify="checksum")

    tar1.write_bytes(bytes(data[:5000]))  # truncated
    with pytest.raises(DataError, match="shard-000001.*truncated"):
        ShardSet(tmp_path)
    skipping = ShardSet(tmp_path, on_error="skip")
    assert list(skipping.bad_shards) == [1]
    with pytest.raises(SampleError, match="shard-000001, key 00000012"):
        skipping.read(12, [MEMBER_MOMENTS])

    tar1.unlink()
    with pytest.raises(DataError, match="shard-000001.*missing"):
        ShardSet(tmp_path)


def test_index_must_match_manifest(tmp_path):
    write_dataset(tmp_path, num_samples=30, per_shard=10)
    idx2 = tmp_path / "shards" / "shard-000002.idx"
    lines = idx2.read_text().splitlines()
    idx2.write_text("\n".join([f"v1.2 {len(lines) - 2}"] + lines[1:-1]) + "\n")
    with pytest.raises(DataError, match="shard-000002.*index lists 9 samples, the manifest 10"):
        ShardSet(tmp_path)
    idx2.write_text("\n".join([lines[0]] + [lines[2], lines[1]] + lines[3:]) + "\n")  # keys out of order
    with pytest.raises(DataError, match="shard-000002.*key '00000021' at position 0"):
        ShardSet(tmp_path)


def test_corrupt_member_names_shard_and_key(tmp_path):
    write_dataset(tmp_path, num_samples=20, per_shard=10, image_format="raw")
    shards = ShardSet(tmp_path)
    j = shards.members.index(MEMBER_MOMENTS)
    off = int(shards.offsets[13, j])
    tar = tmp_path / "shards" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[off : off + 6] = b"NOTNPY"  # the .npy magic
    tar.write_bytes(bytes(data))
    shards = ShardSet(tmp_path)
    with pytest.raises(SampleError, match=r"shard shard-000001, key 00000013: moments.npy: unexpected .npy header"):
        shards.read(13, [MEMBER_MOMENTS], out={MEMBER_MOMENTS: np.empty((8, 4, 4), np.float16)})
    with pytest.raises(SampleError, match="key 00000013"):
        shards.read(13, [MEMBER_MOMENTS])
    shards.read(12, [MEMBER_MOMENTS])  # neighbours are fine


def test_read_index_rejects_malformed(tmp_path):
    p = tmp_path / "x.idx"
    p.write_text("v1.1 1\ncls 512 1 0.cls\n")
    with pytest.raises(DataError, match="v1.2"):
        read_index(p)
    p.write_text("v1.2 2\ncls 512 1 0.cls\ncls 1536 1 1.cls png 2048 4 1.png\n")
    with pytest.raises(DataError, match="members"):
        read_index(p)


def test_dali_webdataset_reader_uses_our_index(tmp_path):
    """The index files are DALI's format: fn.readers.webdataset reads the shards through them."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    truth = write_dataset(tmp_path, num_samples=20, per_shard=8, image_format="raw", flip=False, features=False)
    man = Manifest.load(tmp_path)

    @pipeline_def(batch_size=20, num_threads=1, device_id=None)
    def pipe():
        cls, moments = fn.readers.webdataset(paths=[str(tmp_path / s.tar) for s in man.shards],
                                     index_paths=[str(tmp_path / s.index) for s in man.shards],
                                     ext=["cls", "moments.npy"], missing_component_behavior="error")
        return cls, moments

    p = pipe()
    p.build()
    cls, moments = p.run()
    got = sorted((int(bytes(np.array(cls[i]))), np.array(moments[i]).tobytes()) for i in range(20))
    assert got == sorted((int(truth["labels"][i]), npy_bytes(truth["moments"][i])) for i in range(20))
