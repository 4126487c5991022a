"""The latent shard format: webdataset tars, DALI-compatible index files, a manifest, and random access.

A prepared dataset directory::

    manifest.json            counts, classes, VAE, image format, members, every shard with its sha256 (written last)
    shards/shard-000000.tar  a webdataset tar holding ``samples_per_shard`` consecutive global indices
    shards/shard-000000.idx  DALI ``wds2idx`` v1.2 index: ``ext offset size name`` of every member, one line a sample
    shards/shard-000000.json the shard's completion record (prepare's resume marker)

Sample ``i`` has key ``f"{i:08d}"`` (digits only: webdataset and DALI split the extension at the first dot) and its
members, always in this order:

    {key}.cls               label, ASCII decimal
    {key}.moments.npy       float16 (2C, h, w): VAE posterior mean (channels [:C]) and std ([C:]), REPA's layout
    {key}.moments_flip.npy  optional: the same for the horizontally flipped image
    {key}.png|jpg|img.npy   the image (see ``images.py``)
    {key}.features.npy      optional: float16 (N, D) tokens of the encoder named in the manifest

Tar headers are deterministic (mtime 0, uid/gid 0, no user names), so a shard's bytes depend only on its contents
and a rerun reproduces its checksum. The writer knows every member's offset, so it writes the index itself, in
exactly the format ``wds2idx`` derives from ``tar --block-num`` (offsets point at member data, after the header).

``ShardSet`` reads any sample by global index with one ``preadv`` per run of adjacent members, placing ``.npy``
payloads directly into caller-provided arrays (the batch being assembled) after checking their header bytes.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import logging
import os
import resource
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from erw_fast.atomic import atomic_write_bytes, fsync_file, replace_durably
from erw_fast.data.images import IMAGE_FORMATS, IMAGE_MEMBER
from erw_fast.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "erw_fast.latent_shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
INDEX_VERSION = "v1.2"  # DALI wds2idx's index file version

MEMBER_LABEL = "cls"
MEMBER_MOMENTS = "moments.npy"
MEMBER_MOMENTS_FLIP = "moments_flip.npy"
MEMBER_FEATURES = "features.npy"

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's default record size: archives are padded to a whole record
_MAX_GAP = 8192  # members closer than this are read in one preadv (the gap goes to a scratch buffer)

Verify = Literal["none", "size", "checksum"]
OnError = Literal["raise", "skip"]


class DataError(InputError):
    """A dataset problem: missing/corrupt shard or sample, or a manifest that does not fit the request."""


class SampleError(DataError):
    """A sample that cannot be read; names the shard and the key."""

    def __init__(self, shard: str, key: str = "", reason: str = "") -> None:
        # One argument: a DataLoader worker's error re-raised in the main process, built from its message alone.
        super().__init__(f"shard {shard}, key {key}: {reason}" if key else shard)
        self.shard, self.key, self.reason = shard, key, reason


def sample_key(index: int) -> str:
    return f"{index:08d}"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}"


# ----------------------------------------------------------------------------------------------------- npy


def npy_bytes(arr: np.ndarray) -> bytes:
    """``np.save`` bytes (format 1.0, deterministic) of a C-contiguous array."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The exact header bytes ``npy_bytes`` writes for ``dtype``/``shape`` (what a valid member starts with)."""
    arr = np.zeros(shape, dtype=np.dtype(dtype))
    data = npy_bytes(arr)
    return data[: len(data) - arr.nbytes]


def decode_npy(data: bytes | bytearray | memoryview, header: bytes | None = None) -> np.ndarray:
    """Decode ``.npy`` bytes; with the expected ``header``, a header compare + ``frombuffer`` instead of parsing."""
    if header is not None and bytes(data[: len(header)]) == header:
        fmt = np.lib.format.read_array_header_1_0(io.BytesIO(header[8:]))
        shape, dtype = fmt[0], fmt[2]
        return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)
    return np.load(io.BytesIO(bytes(data)), allow_pickle=False)


# ----------------------------------------------------------------------------------------------------- files


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class ShardInfo:
    num_samples: int
    bytes: int
    sha256: str


class ShardWriter:
    """Write one shard (tar + index) under temporary names; ``commit`` fsyncs and renames both into place.

    An exception inside ``with ShardWriter(...)`` removes the temporary files; a killed process leaves them, and the
    next run overwrites them (they are never read).
    """

    def __init__(self, tar_path: str | os.PathLike[str], index_path: str | os.PathLike[str]) -> None:
        self.tar_path, self.index_path = Path(tar_path), Path(index_path)
        self._tmp_tar = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self._tmp_index = self.index_path.with_name(self.index_path.name + ".tmp")
        self._file = open(self._tmp_tar, "wb")
        self._sha = hashlib.sha256()
        self._pos = 0
        self._lines: list[str] = []
        self._members: tuple[str, ...] | None = None

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._sha.update(data)
        self._pos += len(data)

    def add(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        """Append one sample: ``members`` are ``(extension, bytes)`` in the order they go into the tar."""
        if not key or any(c in key for c in "./ "):
            raise ValueError(f"sample key {key!r} must be non-empty without '.', '/' or spaces")
        exts = tuple(ext for ext, _ in members)
        if self._members is None:
            self._members = exts
        elif exts != self._members:  # readers index members by position: every sample must have the same ones
            raise ValueError(f"sample {key} has members {exts}, earlier samples {self._members}")
        parts = []
        for ext, data in members:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._write(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict"))
            parts.append(f"{ext} {self._pos} {len(data)} {name}")
            self._write(data)
            if len(data) % _BLOCK:
                self._write(bytes(_BLOCK - len(data) % _BLOCK))
        self._lines.append(" ".join(parts))

    @property
    def num_samples(self) -> int:
        return len(self._lines)

    def commit(self) -> ShardInfo:
        if not self._lines:
            raise ValueError(f"{self.tar_path}: a shard needs at least one sample")
        end = self._pos + 2 * _BLOCK  # end-of-archive marker: two zero blocks, then pad to a whole record
        self._write(bytes(2 * _BLOCK + (-end) % _RECORD))
        fsync_file(self._file)
        self._file.close()
        index_text = f"{INDEX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines)
        with open(self._tmp_index, "w") as f:
            f.write(index_text)
            fsync_file(f)
        replace_durably(self._tmp_tar, self.tar_path)
        replace_durably(self._tmp_index, self.index_path)
        return ShardInfo(len(self._lines), self._pos, self._sha.hexdigest())

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        for p in (self._tmp_tar, self._tmp_index):
            p.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


# ----------------------------------------------------------------------------------------------------- index


@dataclass(frozen=True)
class ShardIndex:
    """A parsed index: ``offsets``/``sizes`` are (num_samples, num_members) in ``members`` order."""

    members: tuple[str, ...]
    keys: tuple[str, ...]
    offsets: np.ndarray
    sizes: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.keys)


def read_index(path: str | os.PathLike[str]) -> ShardIndex:
    """Parse a ``wds2idx`` v1.2 index whose samples all have the same members (our shards do)."""
    with open(path) as f:
        text = f.read()
    header, _, body = text.partition("\n")
    head = header.split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise DataError(f"{path}: not a {INDEX_VERSION} webdataset index (header {header[:40]!r})")
    n = int(head[1])
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != n or n == 0:
        raise DataError(f"{path}: header announces {n} samples, found {len(lines)} lines")
    first = lines[0].split()
    if len(first) % 4 or not first:
        raise DataError(f"{path}: malformed line 1")
    m = len(first) // 4
    tokens = body.split()
    if len(tokens) != 4 * m * n:
        raise DataError(f"{path}: samples do not all have the {m} members of the first one")
    table = np.array(tokens, dtype=object).reshape(n, m, 4)
    members = tuple(first[0::4])
    if not all((table[:, j, 0] == members[j]).all() for j in range(m)):
        raise DataError(f"{path}: samples do not all have the members {members}")
    try:
        offsets = table[:, :, 1].astype(np.int64)
        sizes = table[:, :, 2].astype(np.int64)
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric offset or size ({exc})") from exc
    keys = tuple(name[: name.find(".")] for name in table[:, 0, 3])
    return ShardIndex(members, keys, offsets, sizes)


# ----------------------------------------------------------------------------------------------------- manifest


@dataclass
class ShardEntry:
    name: str
    tar: str  # relative to the manifest's directory
    index: str
    first_index: int
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """``manifest.json``: everything a reader needs to check a dataset before using it."""

    num_samples: int
    num_classes: int
    classes: list[str]
    image_size: int
    image_format: str
    members: list[str]
    samples_per_shard: int
    moments_shape: list[int]  # [2C, h, w]
    vae: dict[str, Any]  # name, scaling_factor, latent_channels, latent_size, dtype
    flip_moments: bool
    shards: list[ShardEntry]
    features: dict[str, Any] | None = None  # encoder, shape [N, D], dtype
    image_encoding: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    # Samples erw-prepare could not read (--on-error skip): {index, path, error}. Their slots hold a black image and
    # NaN moments; the loaders never draw them (the next sample takes the slot, as for an unreadable one).
    skipped: list[dict[str, Any]] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION

    @property
    def image_member(self) -> str:
        return IMAGE_MEMBER[self.image_format]

    @property
    def scaling_factor(self) -> float:
        return float(self.vae["scaling_factor"])

    def member_header(self, member: str) -> bytes | None:
        """Expected ``.npy`` header bytes of ``member`` (None for non-npy members)."""
        if member in (MEMBER_MOMENTS, MEMBER_MOMENTS_FLIP):
            return npy_header("<f2", tuple(self.moments_shape))
        if member == MEMBER_FEATURES and self.features is not None:
            return npy_header("<f2", tuple(self.features["shape"]))
        if member == "img.npy":
            return npy_header("|u1", (self.image_size, self.image_size, 3))
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        if data.get("format") != FORMAT:
            raise DataError(f"{where}: not an erw_fast latent-shard manifest (format {data.get('format')!r})")
        if data.get("version") != VERSION:
            raise DataError(f"{where}: manifest version {data.get('version')}, this reader knows {VERSION}")
        try:
            shards = [ShardEntry(**s) for s in data["shards"]]
            man = cls(**{**data, "shards": shards})
        except TypeError as exc:
            raise DataError(f"{where}: malformed manifest ({exc})") from exc
        man.validate(where)
        return man

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> Manifest:
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"no {MANIFEST_NAME} in {root} (not a prepared dataset, or erw-prepare has not finished)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is damaged: not valid JSON ({exc}); rerun erw-prepare on the dataset to rewrite "
                            "it (finished shards are kept), or restore the file") from exc
        if not isinstance(data, dict):
            raise DataError(f"{path}: not an erw_fast latent-shard manifest (a JSON {type(data).__name__})")
        return cls.from_dict(data, str(path))

    def save(self, root: str | os.PathLike[str]) -> None:
        atomic_write_bytes(Path(root) / MANIFEST_NAME, self.to_json().encode())

    def validate(self, where: str = "manifest") -> None:
        problems = []
        if self.image_format not in IMAGE_FORMATS:
            problems.append(f"unknown image_format {self.image_format!r}")
        expected_members = [MEMBER_LABEL, MEMBER_MOMENTS] + ([MEMBER_MOMENTS_FLIP] if self.flip_moments else [])
        expected_members += [IMAGE_MEMBER.get(self.image_format, "?")]
        expected_members += [MEMBER_FEATURES] if self.features is not None else []
        if self.members != expected_members:
            problems.append(f"members {self.members} do not match the settings ({expected_members})")
        if len(self.classes) != self.num_classes:
            problems.append(f"{len(self.classes)} class names for num_classes={self.num_classes}")
        if sum(s.num_samples for s in self.shards) != self.num_samples:
            problems.append(f"shard sample counts sum to {sum(s.num_samples for s in self.shards)}, "
                            f"num_samples is {self.num_samples}")
        nxt = 0
        for s in self.shards:
            if s.first_index != nxt:
                problems.append(f"{s.name} starts at index {s.first_index}, expected {nxt}")
                break
            nxt += s.num_samples
        if problems:
            raise DataError(f"{where}: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------- reader


def _raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-file limit towards ``wanted`` (one fd per shard avoids reopen churn); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class ShardSet:
    """Random access to a prepared dataset by global sample index.

    Opening checks the manifest against the shard files (``verify``: "size" compares file sizes, "checksum" also
    re-hashes every shard, "none" only checks existence) and every index against the manifest (sample counts,
    members, keys). With ``on_error="raise"`` any problem is a ``DataError`` naming the shard; with "skip" the shard
    is recorded in ``bad_shards`` and its samples raise ``SampleError`` when read (the caller skips them).

    Picklable: a copy in another process re-opens its own file descriptors.
    """

    def __init__(self, root: str | os.PathLike[str], *, verify: Verify = "size", on_error: OnError = "raise") -> None:
        if verify not in ("none", "size", "checksum"):
            raise ValueError(f"verify must be 'none', 'size' or 'checksum', got {verify!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.manifest = Manifest.load(self.root)
        self.verify, self.on_error = verify, on_error
        man = self.manifest
        self.members: tuple[str, ...] = tuple(man.members)
        self._member_pos = {m: j for j, m in enumerate(self.members)}
        self.offsets = np.zeros((man.num_samples, len(self.members)), dtype=np.int64)
        self.sizes = np.zeros_like(self.offsets)
        self.bad_shards: dict[int, str] = {}
        self._starts = [s.first_index for s in man.shards]
        self._paths = [str(self.root / s.tar) for s in man.shards]
        for sid, entry in enumerate(man.shards):
            try:
                self._check_shard(sid, entry)
            except DataError as exc:
                if on_error == "raise":
                    raise
                self.bad_shards[sid] = str(exc)
                log.warning("skipping every sample of %s: %s", entry.name, exc)
        self._headers = {m: man.member_header(m) for m in self.members}
        self._init_process_state()

    def _check_shard(self, sid: int, entry: ShardEntry) -> None:
        tar, idx = self.root / entry.tar, self.root / entry.index
        where = f"shard {entry.name} ({tar})"
        if not tar.is_file():
            raise DataError(f"{where}: tar file missing")
        if not idx.is_file():
            raise DataError(f"{where}: index file {idx} missing")
        if self.verify != "none" and tar.stat().st_size != entry.bytes:
            raise DataError(f"{where}: {tar.stat().st_size} bytes, the manifest says {entry.bytes} (truncated?)")
        if self.verify == "checksum" and sha256_file(tar) != entry.sha256:
            raise DataError(f"{where}: sha256 differs from the manifest (corrupt)")
        index = read_index(idx)
        if index.num_samples != entry.num_samples:
            raise DataError(f"{where}: index lists {index.num_samples} samples, the manifest {entry.num_samples}")
        if index.members != self.members:
            raise DataError(f"{where}: members {index.members}, the manifest {self.members}")
        expected = [sample_key(entry.first_index + i) for i in range(entry.num_samples)]
        if list(index.keys) != expected:
            bad = next(i for i, (a, b) in enumerate(zip(index.keys, expected, strict=True)) if a != b)
            raise DataError(f"{where}: key {index.keys[bad]!r} at position {bad}, expected {expected[bad]!r}")
        end = int((index.offsets + index.sizes).max())
        if self.verify != "none" and end > entry.bytes:
            raise DataError(f"{where}: index points past the end of the tar ({end} > {entry.bytes})")
        sl = slice(entry.first_index, entry.first_index + entry.num_samples)
        self.offsets[sl], self.sizes[sl] = index.offsets, index.sizes

    # -- per-process, per-thread state (file descriptors, scratch) ---------------------------------------------

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        # One descriptor cache per reading thread (loader threads read concurrently): a thread never sees a
        # descriptor another thread's LRU eviction closed under it.
        self._local = threading.local()
        self._fd_caches: list[OrderedDict[int, int]] = []
        self._fd_caches_lock = threading.Lock()
        self._open_fds = 0
        self._max_fds = max(16, _raise_fd_limit(len(self._paths) + 256) - 128)
        self._scratch = bytearray(_MAX_GAP)  # sink for the gaps preadv skips; shared, its contents never read

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_local", "_fd_caches", "_fd_caches_lock", "_open_fds", "_scratch", "_pid", "_max_fds"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def _thread_fds(self) -> OrderedDict[int, int]:
        fds = getattr(self._local, "fds", None)
        if fds is None:
            fds = self._local.fds = OrderedDict()
            with self._fd_caches_lock:
                self._fd_caches.append(fds)
        return fds

    def _fd(self, sid: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent; keep our own
            self._init_process_state()
        fds = self._thread_fds()
        fd = fds.get(sid)
        if fd is not None:
            fds.move_to_end(sid)
            return fd
        fd = os.open(self._paths[sid], os.O_RDONLY)
        fds[sid] = fd
        with self._fd_caches_lock:  # the descriptor budget is shared by all threads; each evicts its own
            self._open_fds += 1
            evict = self._open_fds > self._max_fds and len(fds) > 1
            self._open_fds -= evict
        if evict:
            os.close(fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        """Close every thread's descriptors (call when no thread is reading)."""
        if getattr(self, "_pid", None) == os.getpid():
            with self._fd_caches_lock:
                for fds in self._fd_caches:
                    for fd in fds.values():
                        os.close(fd)
                    fds.clear()
                self._open_fds = 0

    # -- lookup -----------------------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    def shard_of(self, index: int) -> int:
        if not 0 <= index < self.manifest.num_samples:
            raise IndexError(f"sample index {index} out of range for {self.manifest.num_samples} samples")
        return bisect.bisect_right(self._starts, index) - 1

    def shard_end(self, sid: int) -> int:
        entry = self.manifest.shards[sid]
        return entry.first_index + entry.num_samples

    def error(self, index: int, reason: str) -> SampleError:
        return SampleError(self.manifest.shards[self.shard_of(index)].name, sample_key(index), reason)

    # -- reading ----------------------------------------------------------------------------------------------

    def read(
        self, index: int, members: Sequence[str], out: dict[str, np.ndarray] | None = None
    ) -> dict[str, Any]:
        """Read ``members`` of sample ``index``.

        A ``.npy`` member with an array in ``out`` is read straight into it (its header checked, its size must
        match); other ``.npy`` members come back as arrays, the rest as ``bytes``. Any failure is a
        ``SampleError`` naming the shard and key.
        """
        sid = self.shard_of(index)
        if sid in self.bad_shards:
            raise self.error(index, f"shard unusable ({self.bad_shards[sid]})")
        out = out or {}
        spans = []
        for m in members:
            j = self._member_pos.get(m)
            if j is None:
                raise self.error(index, f"no member {m!r} in this dataset (members: {self.members})")
            spans.append((int(self.offsets[index, j]), int(self.sizes[index, j]), m))
        spans.sort()
        try:
            fd = self._fd(sid)
        except OSError as exc:
            raise self.error(index, f"cannot open {self._paths[sid]}: {exc}") from exc

        result: dict[str, Any] = {}
        headers: list[tuple[str, bytearray, bytes]] = []
        fixups: list[Callable[[], None]] = []
        i = 0
        while i < len(spans):  # one preadv per run of members separated by less than _MAX_GAP bytes
            start = cursor = spans[i][0]
            bufs: list[Any] = []
            while i < len(spans) and (not bufs or spans[i][0] - cursor <= _MAX_GAP):
                off, size, m = spans[i]
                if off < cursor:
                    raise self.error(index, f"{m}: overlaps the previous member in the index (corrupt index)")
                if off > cursor:
                    bufs.append(memoryview(self._scratch)[: off - cursor])
                header = self._headers.get(m)
                target = out.get(m)
                if header is not None and target is not None:
                    if size - len(header) != target.nbytes:
                        raise self.error(index, f"{m}: {size} bytes, expected {len(header) + target.nbytes}")
                    hbuf = bytearray(len(header))
                    bufs += [hbuf, memoryview(target).cast("B")]
                    headers.append((m, hbuf, header))
                    result[m] = target
                else:
                    buf = bytearray(size)
                    bufs.append(buf)
                    if header is not None:
                        fixups.append(functools.partial(self._decode_into_result, result, m, buf, header, index))
                    else:
                        result[m] = buf
                cursor = off + size
                i += 1
            try:
                got = os.preadv(fd, bufs, start)
            except OSError as exc:
                raise self.error(index, f"read failed: {exc}") from exc
            if got != cursor - start:
                raise self.error(index, f"short read ({got} of {cursor - start} bytes at {start}): truncated shard")
        for m, hbuf, header in headers:
            if hbuf != header:
                raise self.error(index, f"{m}: unexpected .npy header {bytes(hbuf[:60])!r}")
        for fix in fixups:
            fix()
        return result

    def _decode_into_result(self, result: dict[str, Any], m: str, buf: bytearray, header: bytes, index: int) -> None:
        if buf[: len(header)] != header:
            raise self.error(index, f"{m}: unexpected .npy header {bytes(buf[:60])!r}")
        result[m] = decode_npy(buf, header)

    def label(self, index: int, data: bytes | bytearray) -> int:
        """Parse a ``.cls`` member."""
        try:
            return int(data)
        except ValueError:
            raise self.error(index, f"label {bytes(data[:20])!r} is not an integer") from None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
