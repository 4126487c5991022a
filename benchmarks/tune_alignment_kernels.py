#!/usr/bin/env python
"""Measure candidate tiles for the NT-Xent logit kernels on this GPU and write the fastest into a table.

    python benchmarks/tune_alignment_kernels.py [--out benchmarks/results] [--table kernels/tuned_tiles.json]
        [--rows 8192] [--d 768 1024] [--dtype bf16] [--position-batches 32 256] [--candidates ...]

For each kernel (`lse` forward, `grad` backward), dtype, feature dim D and group size (batch negatives over
--rows rows; position negatives with groups of each --position-batches), every candidate is run through the
real launcher (key splits included) with its tiles pinned, checked against the default tiles' output, and
timed (median of CUDA-event timings after warm-up; a candidate that needs more than the GPU has is recorded
as such). The winner per problem is merged into --table under this GPU's name, which
`erw_fast.kernels.tiles` reads at launch, so runs on that GPU use the measured tiles every step; all raw
timings go to <out>/tune_alignment.json and a table to <out>/tune_alignment.md.

Without CUDA it runs the same code under the Triton interpreter (perf_counter timings, meaningless as
speed): that is how CI checks the tuner end to end on tiny problems.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported

import triton  # noqa: E402
from erw_fast.kernels import nt_xent, tiles  # noqa: E402
from erw_fast.kernels.cosine import row_stats  # noqa: E402
from erw_fast.kernels.tiles import LogitTiles  # noqa: E402

from erw_fast.atomic import atomic_write_text  # noqa: E402
from erw_fast.bench.common import time_ms  # noqa: E402
from erw_fast.envinfo import versions  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CANDIDATES = tiles.TUNING_CANDIDATES
TEMPERATURE = 0.1


def _problem(kernel: str, groups: tuple[int, int, int, int], rows: int, d: int, dtype: torch.dtype, device):
    """A closure running one kernel through its launcher on fixed random inputs, plus its output getter."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, d, generator=gen).to(device=device, dtype=dtype)
    y = torch.randn(rows, d, generator=gen).to(device=device, dtype=dtype)
    norm_x, norm_y, _ = row_stats(x, y)
    precision = "tf32" if device.type == "cuda" else "ieee"  # fp32 only; 16-bit dots ignore it
    if kernel == "lse":
        return lambda: nt_xent._lse(x, y, norm_x, norm_y, groups, TEMPERATURE, precision)
    if kernel == "lse_grad":  # compared after the merge: the sum of the weighted partials, and the LSE

        def one_pass() -> torch.Tensor:
            lse, acc, weights = nt_xent._lse_grad(x, y, norm_x, norm_y, groups, TEMPERATURE, precision)
            return torch.cat([(acc * weights[..., None]).sum(dim=0).flatten(), lse])

        return one_pass
    lse_x = nt_xent._lse(x, y, norm_x, norm_y, groups, TEMPERATURE, precision)
    lse_y = nt_xent._lse(y, x, norm_y, norm_x, groups, TEMPERATURE, precision)
    return lambda: nt_xent._grad_partials(
        x, y, norm_x, norm_y, lse_x, 0.5, lse_y, 0.5, groups, TEMPERATURE, precision
    ).sum(dim=0)


def tune(
    kernels: Sequence[str],
    dtypes: Sequence[str],
    dims: Sequence[int],
    rows: int,
    position_batches: Sequence[int],
    candidates: dict[str, list[str]],
    reps: int,
    warmup: int,
    device: torch.device,
    tokens: int = 256,
    on_problem: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """One record per (kernel, dtype, D, groups, candidate): status, raw times, error vs the default.

    ``on_problem(records so far)`` runs after each problem's candidates (main saves results and winners then,
    so a time limit keeps every finished problem)."""
    records = []
    cases = [("batch", nt_xent._groups(rows // tokens, tokens, False), rows)]
    cases += [(f"position B={b}", nt_xent._groups(b, tokens, True), b * tokens) for b in position_batches]
    for kernel in kernels:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for d in dims:
                for case, groups, n in cases:
                    run = _problem(kernel, groups, n, d, dtype, device)
                    reference = run().float()
                    for text in candidates[kernel]:
                        cand = LogitTiles.parse(text) if dtype != torch.float32 else LogitTiles.parse(text).for_fp32()
                        record = dict(
                            kernel=kernel, dtype=dtype_name, D=d, case=case, rows=n, group_size=groups[0],
                            key=tiles.table_key(kernel, dtype, d, groups[0]), tiles=str(cand),
                        )  # fmt: skip
                        try:
                            with tiles.pinned(kernel, cand):
                                out = run().float()
                                scale = reference.abs().max().item() or 1.0
                                record["max_rel_err"] = (out - reference).abs().max().item() / scale
                                record["times_ms"] = time_ms(run, reps, warmup, device)
                            record["median_ms"] = statistics.median(record["times_ms"])
                            record["status"] = "ok" if record["max_rel_err"] < 2e-2 else "WRONG"
                        except triton.runtime.errors.OutOfResources as exc:
                            record["status"] = f"out of resources: {exc}"
                        except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the session's run
                            record["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
                        records.append(record)
                        print(f"{record['key']:28s} {case:16s} {record['tiles']:16s} {record['status']:6s} "
                              f"{record.get('median_ms', float('nan')):9.4f} ms", flush=True)  # fmt: skip
                    if on_problem is not None:
                        on_problem(list(records))
    return records


def winners(records: Sequence[dict]) -> dict[str, str]:
    """The fastest correct tiles per table key."""
    best: dict[str, dict] = {}
    for r in records:
        if r["status"] == "ok" and (r["key"] not in best or r["median_ms"] < best[r["key"]]["median_ms"]):
            best[r["key"]] = r
    return {key: r["tiles"] for key, r in sorted(best.items())}


def merge_table(path: Path, device_name: str, entries: dict[str, str], measured_with: dict) -> None:
    """Add this GPU's winners to the tuned-tiles table (other GPUs' entries are kept)."""
    data = json.loads(path.read_text()) if path.is_file() else {"devices": {}}
    device = data["devices"].setdefault(device_name, {"tiles": {}})
    device["tiles"].update(entries)
    device["measured_with"] = measured_with
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def markdown(records: Sequence[dict], best: dict[str, str]) -> str:
    lines = [
        "| key | case | tiles | status | median ms | max rel err vs default | best |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        med = f"{r['median_ms']:.4f}" if "median_ms" in r else "-"
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        mark = "**best**" if best.get(r["key"]) == r["tiles"] else ""
        lines.append(f"| {r['key']} | {r['case']} | {r['tiles']} | {r['status']} | {med} | {err} | {mark} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--table", type=Path, help="tuned-tiles table to merge the winners into")
    parser.add_argument("--kernels", nargs="+", default=list(tiles.KERNELS), choices=tiles.KERNELS)
    parser.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--d", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--rows", type=int, default=8192, help="rows of the batch-negative problem (B x 256)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--position-batches", type=int, nargs="*", default=[32, 256])
    parser.add_argument("--candidates", nargs="+", help="tiles to try for every kernel (default: built-in lists)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    if args.rows % args.tokens:
        parser.error(f"--rows {args.rows} must be a multiple of --tokens {args.tokens}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    candidates = {k: args.candidates for k in tiles.KERNELS} if args.candidates else CANDIDATES
    # torch's name, not NVML's: the table is looked up by it (kernels/tiles.py).
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    measured_with = versions("triton")
    settings = vars(args) | {"out": str(args.out), "table": str(args.table) if args.table else None}
    args.out.mkdir(parents=True, exist_ok=True)

    def save(records: list[dict]) -> dict[str, str]:
        best = winners(records)
        payload = dict(device=name, versions=measured_with, settings=settings, records=records)
        (args.out / "tune_alignment.json").write_text(json.dumps(payload, indent=1) + "\n")
        (args.out / "tune_alignment.md").write_text(f"# Tile tuning on {name}\n\n" + markdown(records, best))
        if args.table and best:
            merge_table(args.table, name, best, measured_with)
        return best

    records = tune(
        args.kernels, args.dtype, args.d, args.rows, args.position_batches, candidates, args.reps, args.warmup,
        device, args.tokens, on_problem=save,
    )  # fmt: skip
    best = save(records)
    print(f"best tiles on {name}: {json.dumps(best, indent=1)}")
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
