"""Tile choice and key-split planning for the NT-Xent kernels (pure Python: no kernel runs here)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

pytest.importorskip("triton")
from erw_fast.kernels import tiles  # noqa: E402
from erw_fast.kernels.tiles import LogitTiles, default_tiles, plan_key_splits, tuned_tiles  # noqa: E402


def test_tiles_parse_and_print_round_trip():
    t = LogitTiles.parse("128x64x32w8s3")
    assert t == LogitTiles(128, 64, 32, 8, 3) and str(t) == "128x64x32w8s3"
    assert t.constexprs() == {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32}
    assert t.options() == {"num_warps": 8, "num_stages": 3}
    # fp32 elements are twice as wide: the same bytes per D chunk, never below the 16-wide dot minimum
    assert t.for_fp32() == LogitTiles(128, 64, 16, 8, 3) and t.for_fp32().for_fp32() == t.for_fp32()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("128x64", "must look like"),
        ("128x64x32w8", "must look like"),
        ("8x64x32w4s3", "block_m must be"),
        ("128x48x32w4s3", "block_n must be a power of two"),
        ("64x64x64w3s3", "num_warps"),
    ],
)
def test_bad_tiles_are_refused_by_name(text, match):
    with pytest.raises(ValueError, match=match):
        LogitTiles.parse(text)


def test_defaults_shrink_for_small_groups():
    assert default_tiles("lse", 16384, 768, torch.bfloat16) == LogitTiles(128, 128, 64, 8, 3)
    small = default_tiles("lse", 20, 768, torch.bfloat16)  # position negatives, local batch 20
    assert (small.block_m, small.block_n) == (32, 32)
    assert default_tiles("grad", 3, 768, torch.float32).block_m == 16
    with pytest.raises(ValueError, match="'fwd'"):
        default_tiles("fwd", 64, 768, torch.float32)


def test_tuned_table_lookup(tmp_path):
    table = tmp_path / "tuned.json"
    entry = {"lse/bf16/D768/G4096": "64x128x64w4s4", "grad/bf16/D768/G256": "32x32x64w4s2"}
    table.write_text(json.dumps({"devices": {"NVIDIA H100 80GB HBM3": {"tiles": entry}}}))
    found = tuned_tiles("NVIDIA H100 80GB HBM3", "lse", torch.bfloat16, 768, 65536, table)
    assert found == LogitTiles(64, 128, 64, 4, 4)  # every group >= 4096 shares the capped bucket
    assert tuned_tiles("NVIDIA H100 80GB HBM3", "grad", torch.bfloat16, 768, 200, table) == LogitTiles(32, 32, 64, 4, 2)
    assert tuned_tiles("NVIDIA H100 80GB HBM3", "grad", torch.bfloat16, 1024, 200, table) is None
    assert tuned_tiles("NVIDIA A100-SXM4-80GB", "lse", torch.bfloat16, 768, 65536, table) is None


def test_a_broken_table_names_its_file(tmp_path):
    table = tmp_path / "broken.json"
    table.write_text('{"devices": {"x": 3}}')
    with pytest.raises(ValueError, match="broken.json"):
        tuned_tiles("x", "lse", torch.float32, 768, 64, table)


def test_the_shipped_table_parses():
    # Every entry of the committed table must be valid tiles (an empty table is valid too).
    for device, entries in tiles._load_table(str(tiles.TUNED_TABLE)).items():
        for key, text in entries.items():
            assert LogitTiles.parse(text), (device, key)


def test_key_split_plans_keep_their_promises():
    for programs, key_blocks, sms in itertools.product(
        (1, 3, 16, 64, 100, 131, 132, 500), (1, 2, 7, 8, 64, 513), (108, 132)
    ):
        splits = plan_key_splits(programs, key_blocks, sms)
        per_split = math.ceil(key_blocks / splits)
        assert 1 <= splits <= tiles.MAX_SPLITS
        assert (splits - 1) * per_split < key_blocks, "a split would be empty"
        if splits > 1:
            assert programs < sms and per_split >= tiles.MIN_BLOCKS_PER_SPLIT
            # the model's cost (waves per unit of work) improves by the required margin
            cost = math.ceil(splits * programs / sms) / splits
            assert cost <= tiles.MIN_SPLIT_GAIN * math.ceil(programs / sms)


def test_key_splits_fill_an_idle_gpu_and_respect_the_memory_budget():
    assert plan_key_splits(64, 64, 132) == 2  # 128 programs: one full wave instead of half of one
    assert plan_key_splits(32, 64, 132) == 4
    assert plan_key_splits(200, 64, 132) == 1  # already more than a wave
    assert plan_key_splits(1, 1024, 132, bytes_per_split=100 * 2**20, budget=256 * 2**20) == 3


def test_key_splits_off_cuda_is_one_unless_planning_for_a_gpu():
    cpu = torch.device("cpu")
    assert tiles.key_splits(64, 64, cpu) == 1
    with tiles.planning_for(132):
        assert tiles.key_splits(64, 64, cpu) == 2
    assert tiles.key_splits(64, 64, cpu) == 1
