"""Tile sizes of the NT-Xent logit kernels (`lse` forward, `grad` backward).

Where a launch takes its tiles from, first match wins:
  0. tiles `pinned` for the kernel (the tuner sweeps candidates this way);
  1. the interpreter: few large tiles, since each interpreted op costs Python time, not FLOPs;
  2. `tuned_tiles.json` beside this file: per GPU name, written by `benchmarks/tune_alignment_kernels.py`
     from measured times (so a run on that GPU uses the fastest measured tiles, the same ones every step);
  3. the static defaults below, chosen from the compiled resource usage on sm_80/sm_90 (no register
     spills, shared memory within the limit; `python -m erw_fast.kernels.aot` prints it, CI checks it).
Tiles never change between steps of a run (no autotuning at launch), so a resumed run computes the same.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from . import _utils

KERNELS = ("lse", "grad", "lse_grad")  # forward, backward, one-pass forward + d proj
TUNED_TABLE = Path(__file__).with_name("tuned_tiles.json")
# Tables are keyed by group size rounded up to a power of two and capped here: beyond it every group
# is many tiles long and the best tile no longer depends on the size.
GROUP_BUCKET_CAP = 4096
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_PATTERN = re.compile(r"^(\d+)x(\d+)x(\d+)w(\d+)s(\d+)$")

# What `benchmarks/tune_alignment_kernels.py` measures on a GPU (16-bit; fp32 runs each with half the BLOCK_D,
# the same bytes per chunk). Every one compiles for sm_90 without spills and within shared memory (CI compiles
# them: `python -m erw_fast.kernels.aot --tuning-candidates`; on sm_80 the two 128x256 forward tiles and the
# one-pass kernel's 64x256x64 spill, see benchmarks/results/kernel_candidates.md). The backward and the one-pass
# kernel re-read and re-write their fp32 (BLOCK_M, D) accumulator once per BLOCK_N keys, so the BLOCK_N = 256
# entries halve that traffic.
TUNING_CANDIDATES = {
    "lse": [
        "128x128x64w8s3", "128x128x64w8s4", "128x128x32w8s4", "128x64x64w4s3", "128x64x64w8s4",
        "64x128x64w4s3", "64x64x64w4s4", "64x64x128w8s3", "128x256x64w8s2", "128x256x32w8s3",
    ],
    "grad": [
        "64x128x64w8s3", "64x128x64w8s2", "64x128x32w8s4", "64x64x64w4s3", "64x64x64w8s4",
        "128x64x64w8s3", "128x64x32w8s3", "128x128x32w8s3", "64x256x64w8s2", "64x256x32w8s3",
    ],
}  # fmt: skip
TUNING_CANDIDATES["lse_grad"] = list(TUNING_CANDIDATES["grad"])  # the same tile work plus a rescale


@dataclass(frozen=True)
class LogitTiles:
    """BLOCK_M query rows x BLOCK_N key rows per tile, BLOCK_D features per dot; Triton warps and stages."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad num_warps/num_stages {self.num_warps}/{self.num_stages} in {self}")

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_d}w{self.num_warps}s{self.num_stages}"

    @classmethod
    def parse(cls, text: str) -> LogitTiles:
        """'128x64x64w4s3' -> LogitTiles(128, 64, 64, 4, 3)."""
        match = _PATTERN.match(text.strip())
        if match is None:
            raise ValueError(f"tiles must look like '128x64x64w4s3' (M x N x D, warps, stages), got {text!r}")
        return cls(*(int(v) for v in match.groups()))

    def for_fp32(self) -> LogitTiles:
        """The fp32 counterpart of 16-bit tiles: half the BLOCK_D, the same bytes per chunk (the tuner's rule)."""
        return LogitTiles(self.block_m, self.block_n, max(16, self.block_d // 2), self.num_warps, self.num_stages)

    def constexprs(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d}

    def options(self) -> dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def group_bucket(group_size: int) -> int:
    return min(triton.next_power_of_2(group_size), GROUP_BUCKET_CAP)


def table_key(kernel: str, dtype: torch.dtype, d: int, group_size: int) -> str:
    return f"{kernel}/{_DTYPE_NAMES[dtype]}/D{d}/G{group_bucket(group_size)}"


def _fit_small_group(tiles: LogitTiles, group_size: int) -> LogitTiles:
    """Shrink M/N tiles for small groups (position negatives at a small batch): less masked work."""
    cap = max(16, triton.next_power_of_2(group_size))
    if tiles.block_m <= cap and tiles.block_n <= cap:
        return tiles
    return LogitTiles(min(tiles.block_m, cap), min(tiles.block_n, cap), tiles.block_d, 4, tiles.num_stages)


def default_tiles(kernel: str, group_size: int, d: int, dtype: torch.dtype) -> LogitTiles:
    """Static GPU defaults: the largest tiles that compile without spills on sm_80 and sm_90 (see module doc)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    wide = dtype != torch.float32  # fp32 operands take twice the registers and shared memory per element
    if kernel == "lse":
        tiles = LogitTiles(128, 128, 64, 8, 3) if wide else LogitTiles(128, 64, 32, 8, 3)
    else:
        # The backward and the one-pass kernel read and write their fp32 (BLOCK_M, D) accumulator once per key
        # block: BLOCK_N/2 FLOPs per byte of that traffic, so BLOCK_N is the wide side.
        tiles = LogitTiles(64, 128, 64, 8, 3) if wide else LogitTiles(64, 64, 32, 4, 3)
        if kernel == "lse_grad" and not wide:  # its rescale tips 4 warps into a spill on sm_80 with Triton 3.6
            tiles = LogitTiles(64, 64, 32, 8, 3)
    return _fit_small_group(tiles, group_size)


def interpreter_tiles(group_size: int, d: int) -> LogitTiles:
    block_mn = min(64, max(16, triton.next_power_of_2(group_size)))
    return LogitTiles(block_mn, block_mn, min(256, max(16, triton.next_power_of_2(d))), 4, 1)


def _load_table(path: str) -> dict[str, dict[str, str]]:
    file = Path(path)
    if not file.is_file():
        return {}
    stat = file.stat()
    return _parse_table(path, stat.st_mtime_ns, stat.st_size)  # re-read when the file changes


@functools.cache
def _parse_table(path: str, _mtime_ns: int, _size: int) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(Path(path).read_text())
        return {name: dict(entry["tiles"]) for name, entry in data["devices"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a tuned-tiles table ({exc})") from exc


def tuned_tiles(
    device_name: str, kernel: str, dtype: torch.dtype, d: int, group_size: int, table: Path | None = None
) -> LogitTiles | None:
    """The measured best tiles for this GPU and problem, if the table has them."""
    path = table if table is not None else Path(os.environ.get("ERW_TUNED_TILES", TUNED_TABLE))
    entry = _load_table(str(path)).get(device_name, {}).get(table_key(kernel, dtype, d, group_size))
    return None if entry is None else LogitTiles.parse(entry)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# A split must keep this many key blocks: the partial results and their merge cost must stay small next
# to the tile work, and the software pipeline needs a few iterations to pay off.
MIN_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 16
# Splitting costs a merge and partial buffers; it is only worth it for at least this saving in waves.
MIN_SPLIT_GAIN = 0.9
# Cap on the extra memory of the backward's per-split partial sums.
SPLIT_BYTES_BUDGET = 256 * 2**20


def plan_key_splits(
    programs: int, key_blocks: int, sm_count: int, bytes_per_split: int = 0, budget: int = SPLIT_BYTES_BUDGET
) -> int:
    """How many key-range splits best fill `sm_count` SMs when `programs` query-block programs are fewer.

    Time is modelled as waves of one program per SM (the default tiles' register use allows one or two):
    s splits make s x programs programs of 1/s the work, so the cost is ceil(s * programs / sms) / s. The
    fewest splits at the lowest cost win, if they save >= 10%. No split is left empty (the kernels rely on
    it), each keeps >= MIN_BLOCKS_PER_SPLIT key blocks, and with bytes_per_split (the size of one extra
    partial result) the extra splits stay within `budget` bytes.
    """
    if programs >= sm_count:  # already a full wave: splitting would only trim the last wave's tail
        return 1
    most = min(MAX_SPLITS, key_blocks // MIN_BLOCKS_PER_SPLIT)
    if bytes_per_split:
        most = min(most, 1 + budget // bytes_per_split)
    unsplit = math.ceil(programs / sm_count)
    best, best_cost = 1, unsplit * MIN_SPLIT_GAIN
    for splits in range(2, most + 1):
        cost = math.ceil(splits * programs / sm_count) / splits
        if cost < best_cost - 1e-9:
            best, best_cost = splits, cost
    return triton.cdiv(key_blocks, triton.cdiv(key_blocks, best))  # drop splits that would be empty


_assumed_sm_count: int | None = None


@contextmanager
def planning_for(sm_count: int) -> Iterator[None]:
    """Plan launches on non-CUDA tensors as for a GPU of `sm_count` SMs (ahead-of-time compilation)."""
    global _assumed_sm_count
    previous, _assumed_sm_count = _assumed_sm_count, sm_count
    try:
        yield
    finally:
        _assumed_sm_count = previous


def key_splits(programs: int, key_blocks: int, device: torch.device, bytes_per_split: int = 0) -> int:
    """Key splits for a launch on `device`: 1 off CUDA (the interpreter gains nothing from more programs)."""
    if device.type == "cuda":
        sm_count = _sm_count(device.index or 0)
    elif _assumed_sm_count is not None:
        sm_count = _assumed_sm_count
    else:
        return 1
    return plan_key_splits(programs, key_blocks, sm_count, bytes_per_split)


_pinned: dict[str, LogitTiles] = {}


@contextmanager
def pinned(kernel: str, tiles: LogitTiles) -> Iterator[None]:
    """Launches of `kernel` use `tiles` inside, whatever the device (the tuner sweeps candidates this way)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    previous = _pinned.get(kernel)
    _pinned[kernel] = tiles
    try:
        yield
    finally:
        if previous is None:
            del _pinned[kernel]
        else:
            _pinned[kernel] = previous


def logit_tiles(kernel: str, group_size: int, d: int, dtype: torch.dtype, device: torch.device) -> LogitTiles:
    """The tiles a launch uses (see the module docstring for the order; `pinned` overrides all)."""
    if kernel in _pinned:
        return _pinned[kernel]
    if _utils.interpreting():
        return interpreter_tiles(group_size, d)
    if device.type == "cuda":
        return _gpu_tiles(device.index or 0, kernel, group_bucket(group_size), d, dtype)
    return default_tiles(kernel, group_size, d, dtype)


@functools.cache
def _gpu_tiles(index: int, kernel: str, bucket: int, d: int, dtype: torch.dtype) -> LogitTiles:
    """Resolved once per process and problem: no table I/O on the launch path, and a table rewritten during a
    run (a tuner merging results) cannot change a running job's tiles. The bucket stands in for the group size
    (same table key; default tiles only shrink for groups below the bucket cap)."""
    found = tuned_tiles(_device_name(index), kernel, dtype, d, bucket)
    return found if found is not None else default_tiles(kernel, bucket, d, dtype)


def describe_tiles(device: torch.device) -> str:
    """Where the NT-Xent kernels on `device` take their tiles from, for run logs."""
    if _utils.interpreting():
        return "interpreter tiles"
    if device.type != "cuda":
        return "no CUDA device"
    name = _device_name(device.index or 0)
    path = Path(os.environ.get("ERW_TUNED_TILES", TUNED_TABLE))
    measured = _load_table(str(path)).get(name)
    if measured:
        return f"measured tiles for {name} ({len(measured)} entries in {path.name})"
    return f"static default tiles (no measurements for {name} in {path.name})"
