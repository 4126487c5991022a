"""Compile the alignment kernels for an NVIDIA GPU that is not here, and report what each launch costs.

    python -m erw_fast.kernels.aot [--arch 80 90] [--dtype bf16 fp32] [--d 768 1024 1280 1536]
                                   [--batch 32] [--tokens 256] [--json PATH] [--tuning-candidates]

Why: the interpreter checks the kernels' maths on the CPU but not that they compile, how many registers they
take, whether they spill, how much shared memory they need or whether loads are pipelined into tensor-core
dots. Triton's NVIDIA backend ships ptxas, so it compiles for any sm without a GPU or a CUDA install.

The ops run on CPU tensors with launching swapped for recording (`launch.recording`) and key splits planned
for the target's SM count, so each compiled launch is exactly one a GPU call of that shape makes; arguments
are specialised by the JIT's own rule (16-byte alignment, ints divisible by 16, ints equal to 1). Run it
without TRITON_INTERPRET (the kernels must be compiled functions, not the interpreter's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import triton

from erw_fast.envinfo import versions

from .launch import Launch, recording
from .tiles import planning_for


@dataclass(frozen=True)
class Arch:
    """What an SM offers (CUDA occupancy limits) and how many a typical part of that generation has."""

    capability: int
    name: str
    sm_count: int
    shared_per_sm: int
    shared_per_block: int
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32


ARCHES = {
    80: Arch(80, "A100 SXM", 108, 164 * 1024, 163 * 1024),
    90: Arch(90, "H100 SXM", 132, 228 * 1024, 227 * 1024),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class LaunchReport:
    """One compiled launch: its shape, settings and the resources ptxas gave it."""

    name: str
    arch: int
    dtype: str
    d: int
    rows: int
    settings: str  # constexprs and options, compactly
    grid: tuple[int, ...]
    registers: int
    stack_bytes: int  # ptxas spills registers to the stack (local memory)
    shared_bytes: int
    pipelined: bool  # global -> shared loads issued asynchronously ahead of use
    tensor_cores: str  # "wgmma", "mma" or "none"
    resident_per_sm: int  # programs an SM can hold at once, from registers / shared memory / threads
    waves: float  # programs / (SMs x resident): below ~1 the GPU is partly idle


def _require_compiled(launch: Launch) -> None:
    if not isinstance(launch.kernel, triton.runtime.jit.JITFunction):
        raise RuntimeError(
            f"{launch.name}: the kernels were decorated under TRITON_INTERPRET=1; run ahead-of-time "
            "compilation in a process without it"
        )


_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
                    torch.int32: "i32", torch.uint8: "u8"}


def _documented_rule(value: Any) -> tuple[str, Any]:
    """Triton's specialisation rule, for Triton versions whose native helper differs: pointers and ints
    divisible by 16 get the divisibility hint ("D"), ints equal to 1 become constants."""
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "i1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"cannot specialise a {type(value).__name__} argument")


def _specializer():
    try:  # the JIT's own rule (Triton 3.3+)
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        native_specialize_impl(BaseBackend, 16, False, True, True)
        return lambda value: native_specialize_impl(BaseBackend, value, False, True, True)
    except (ImportError, TypeError):
        return _documented_rule


def specialize(launch: Launch) -> tuple[dict[str, str], dict[tuple[int], Any], dict[tuple[int], Any]]:
    """(signature, constexprs, attrs) for `triton.compile`, as the JIT derives them at a launch."""
    from triton.backends.compiler import BaseBackend

    rule = _specializer()
    kernel = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in launch.constexprs:
            signature[name], constexprs[(index,)] = "constexpr", launch.constexprs[name]
            continue
        if name not in launch.args:
            raise KeyError(f"{launch.name}: no value for kernel argument {name!r}")
        kind, spec = rule(launch.args[name])
        signature[name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = spec
        elif isinstance(spec, str):
            attrs[(index,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def _cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.is_file() else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump not found (neither in Triton's NVIDIA backend nor on PATH)")
    return found


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in a cubin, from `cuobjdump -res-usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    for line in text.stdout.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
            return {key: int(fields[key]) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    raise RuntimeError(f"no resource line in cuobjdump output:\n{text.stdout}")


def compile_launch(launch: Launch, arch: Arch, dtype: str, d: int, rows: int) -> LaunchReport:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _require_compiled(launch)
    signature, constexprs, attrs = specialize(launch)
    compiled = triton.compile(
        ASTSource(launch.kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch.capability, 32),
        options=dict(launch.options),
    )
    usage = resource_usage(compiled.asm["cubin"])
    ttgir = compiled.asm["ttgir"]
    threads = compiled.metadata.num_warps * 32
    shared = compiled.metadata.shared + usage["SHARED"]
    resident = min(
        arch.registers_per_sm // max(1, usage["REG"] * threads),
        arch.shared_per_sm // max(1, shared),
        arch.threads_per_sm // threads,
        arch.blocks_per_sm,
    )
    programs = 1
    for extent in launch.grid:
        programs *= extent
    tensor_cores = "wgmma" if "warp_group_dot" in ttgir else "mma" if "#ttg.nvidia_mma" in ttgir else "none"
    settings = " ".join(f"{k}={v}" for k, v in {**launch.constexprs, **launch.options}.items() if k != "EPS")
    return LaunchReport(
        name=launch.name,
        arch=arch.capability,
        dtype=dtype,
        d=d,
        rows=rows,
        settings=settings,
        grid=tuple(launch.grid),
        registers=usage["REG"],
        stack_bytes=usage["STACK"] + usage["LOCAL"],
        shared_bytes=shared,
        pipelined="async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir,
        tensor_cores=tensor_cores,
        resident_per_sm=resident,
        waves=round(programs / (arch.sm_count * max(1, resident)), 3),
    )


def alignment_launches(batch: int, tokens: int, d: int, dtype: torch.dtype, sm_count: int) -> list[Launch]:
    """Every launch of a training step's alignment losses at (batch, tokens, d), in order.

    NT-Xent with batch negatives, symmetric, gradients for both inputs (all kernels and both sides);
    NT-Xent with position negatives (the grouped layout); the one-pass form of the one-sided loss (training)
    with each negative set, and the key-side pass its backward adds for a target that needs a gradient; the
    cosine loss forward and backward.
    """
    from .cosine import cosine_align_bwd, cosine_align_fwd
    from .nt_xent import nt_xent_bwd, nt_xent_fwd, nt_xent_one_pass

    proj = torch.zeros(batch, tokens, d, dtype=dtype)
    target = torch.zeros(batch, tokens, d, dtype=dtype)
    one = torch.ones(())
    precision = "tf32" if dtype == torch.float32 else "ieee"  # fp32 as under "high" matmul precision
    with planning_for(sm_count), recording() as launches:
        for position, symmetric in ((False, True), (True, False)):
            _, lse_row, lse_col, norm_p, norm_t = nt_xent_fwd(proj, target, 0.1, position, symmetric, precision)
            nt_xent_bwd(
                one, proj, target, lse_row, lse_col, norm_p, norm_t, 0.1, position, symmetric, precision, True, True
            )
        for position in (False, True):
            _, _, lse_row, norm_p, norm_t = nt_xent_one_pass(proj, target, 0.1, position, precision)
            nt_xent_bwd(one, proj, target, lse_row, lse_row[:0], norm_p, norm_t, 0.1, position, False, precision,
                        False, True)
        _, norm_p, norm_t, cos = cosine_align_fwd(proj, target)
        cosine_align_bwd(one, proj, target, norm_p, norm_t, cos)
    return launches


def _targets(
    arches: Sequence[int], dtypes: Sequence[str], dims: Sequence[int]
) -> Iterator[tuple[Arch, str, int]]:
    for capability in arches:
        for dtype in dtypes:
            for d in dims:
                yield ARCHES[capability], dtype, d


def report(
    arches: Sequence[int], dtypes: Sequence[str], dims: Sequence[int], batch: int, tokens: int
) -> list[LaunchReport]:
    """Compile each distinct launch once per architecture and report it."""
    reports = []
    for arch, dtype, d in _targets(arches, dtypes, dims):
        seen = set()
        for launch in alignment_launches(batch, tokens, d, DTYPES[dtype], arch.sm_count):
            key = (launch.name, launch.grid, tuple(sorted(launch.constexprs.items())))
            if key not in seen:
                seen.add(key)
                reports.append(compile_launch(launch, arch, dtype, d, batch * tokens))
    return reports


def candidate_reports(
    candidates: dict[str, Sequence[str]], arches: Sequence[int], dtypes: Sequence[str], dims: Sequence[int],
    batch: int, tokens: int,
) -> list[LaunchReport]:
    """Compile each tuning candidate's batch-negative launch of its kernel (`lse` / `grad`) with it pinned."""
    from .tiles import LogitTiles, pinned

    reports = []
    for arch, dtype, d in _targets(arches, dtypes, dims):
        for kernel, texts in candidates.items():
            for text in texts:
                tiles = LogitTiles.parse(text)
                with pinned(kernel, tiles.for_fp32() if dtype == "fp32" else tiles):
                    launches = alignment_launches(batch, tokens, d, DTYPES[dtype], arch.sm_count)
                first = next(x for x in launches if x.name == f"nt_xent.{kernel}")  # batch negatives
                reports.append(compile_launch(first, arch, dtype, d, batch * tokens))
    return reports


def _table(reports: Sequence[LaunchReport]) -> str:
    head = "| arch | dtype | D | launch | settings | grid | regs | stack B | smem KiB | pipelined | TC "
    head += "| resident | waves |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in reports:
        lines.append(
            f"| sm_{r.arch} | {r.dtype} | {r.d} | {r.name} | {r.settings} | {r.grid} | {r.registers} | "
            f"{r.stack_bytes} | {r.shared_bytes / 1024:.0f} | {'yes' if r.pipelined else 'no'} | {r.tensor_cores} | "
            f"{r.resident_per_sm} | {r.waves} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erw_fast.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(ARCHES))
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--d", type=int, nargs="+", default=[768, 1024, 1280, 1536])
    parser.add_argument("--batch", type=int, default=32, help="local batch (images); rows M = batch * tokens")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the reports (and versions) here")
    parser.add_argument("--md", type=Path, help="also write the table (with versions and settings) here")
    parser.add_argument("--tuning-candidates", action="store_true",
                        help="compile the tuner's candidate tiles (tiles.TUNING_CANDIDATES) instead of the defaults")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: ahead-of-time compilation needs the compiled kernels")
    if args.tuning_candidates:
        from .tiles import TUNING_CANDIDATES

        reports = candidate_reports(TUNING_CANDIDATES, args.arch, args.dtype, args.d, args.batch, args.tokens)
    else:
        reports = report(args.arch, args.dtype, args.d, args.batch, args.tokens)
    print(_table(reports))
    if args.json:
        payload = {
            "versions": versions("triton"),
            "settings": {"batch": args.batch, "tokens": args.tokens},
            "arches": {a: asdict(ARCHES[a]) for a in args.arch},
            "launches": [asdict(r) for r in reports],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        what = ": the tuner's candidate tiles (batch negatives)" if args.tuning_candidates else ""
        header = (
            f"# Alignment kernels compiled ahead of time (no GPU){what}\n\nTriton {triton.__version__}, torch "
            f"{torch.__version__}; local batch {args.batch} x {args.tokens} tokens; resident = programs per SM "
            "by registers/shared memory/threads; waves = programs / (SMs x resident) on "
            + ", ".join(f"sm_{a} = {ARCHES[a].name} ({ARCHES[a].sm_count} SMs)" for a in args.arch)
            + ".\nGenerated by `python -m erw_fast.kernels.aot`.\n\n"
        )
        args.md.write_text(header + _table(reports) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
