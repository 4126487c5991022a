#!/usr/bin/env python
"""Benchmark the fused Triton alignment kernels against PyTorch baselines.

    python benchmarks/bench_alignment.py [--out benchmarks/results] [--reps 50] [--warmup 10]

NT-Xent (token-level InfoNCE, batch negatives, tau = 0.1, one-sided), bf16, M = B*T in {4096, 16384, 65536}
x D in {768, 1024}:  Triton kernel vs naive PyTorch (materialised logits + F.cross_entropy) vs
torch.compile(naive) vs the PyTorch backend's chunked form (fp32 GEMMs on 256 MiB row chunks of the logits);
and the training case, a frozen target (only d proj): Triton's one-pass op vs naive.
Cosine alignment (REPA), bf16, B in {32, 256}, T = 256, D = 768: Triton kernel vs
REPA's per-sample Python loop vs a vectorised PyTorch version.

Each case is timed for fwd, bwd (autograd.grad on a retained graph) and fwd+bwd: the median of --reps
CUDA-event timings after --warmup untimed runs. Peak extra memory is torch.cuda.max_memory_allocated()
during one fwd+bwd minus the memory allocated before it (inputs already resident). A case that runs out of
memory is recorded as "OOM". Results go to <out>/alignment.json (device, versions, settings, every raw
timing), <out>/alignment.md (table) and <out>/alignment.png (if matplotlib is importable).

Without CUDA only the correctness preamble runs (small shapes, Triton interpreter vs a float64 reference);
no timing is done and nothing is written.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Must precede the first import of the kernel modules: Triton reads it when kernels are decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from erw_fast.bench.common import time_ms  # noqa: E402
from erw_fast.envinfo import device_name, versions  # noqa: E402

TEMPERATURE = 0.1
TOKENS = 256  # T for both benchmarks; NT-Xent's B is M / T
NT_XENT_SHAPES = [(m, d) for m in (4096, 16384, 65536) for d in (768, 1024)]  # (M, D)
COSINE_SHAPES = [(b, TOKENS, 768) for b in (32, 256)]  # (B, T, D)
PHASES = ("fwd", "bwd", "fwd_bwd")

# What the throughput columns count. Every implementation is credited with the same (useful) work, so the
# numbers compare wall time; the Triton backward also recomputes the logits (another 2 * 2*M*M*D, once
# for dq and once for dk), which is deliberately not counted, as in FlashAttention's reporting.
FLOP_FORMULAS = {
    "fwd": "2*M*M*D  (logits q @ k^T; normalisation, exp and reductions not counted)",
    "bwd": "4*M*M*D  (dq = G @ k and dk = G^T @ q, G = softmax - I)",
    "fwd_bwd": "6*M*M*D",
    "frozen target (*/frozen rows)": "fwd 2*M*M*D, bwd 2*M*M*D (dq only), fwd_bwd 4*M*M*D",
    "note": "with grad enabled the Triton op computes dq during the forward (one pass): its fwd time includes "
    "the dq work, and its bwd only scales dq (plus the dk pass when the target trains)",
}
# Cosine alignment is memory-bound: count the compulsory HBM traffic instead (elem = bytes per element).
BYTE_FORMULAS = {
    "fwd": "2*M*D*elem  (read proj and target once)",
    "bwd": "4*M*D*elem  (read proj and target, write both gradients)",
    "fwd_bwd": "6*M*D*elem",
}


# --------------------------------------------------------------------------------------------- baselines


def naive_nt_xent(proj: torch.Tensor, target: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Batch-negative NT-Xent the obvious way: the full M x M logit matrix and F.cross_entropy."""
    b, t, d = proj.shape
    q = F.normalize(proj.reshape(b * t, d), dim=-1)
    k = F.normalize(target.reshape(b * t, d), dim=-1)
    logits = (q @ k.T).float() / temperature
    return F.cross_entropy(logits, torch.arange(b * t, device=proj.device))


def repa_loop_cosine(proj: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """REPA's projection loss for one projector (len(zs) = 1): a Python loop over the samples."""
    proj_loss = 0.0
    bsz = proj.shape[0]
    for z_j, z_tilde_j in zip(proj, target, strict=True):
        z_tilde_j = F.normalize(z_tilde_j, dim=-1)
        z_j = F.normalize(z_j, dim=-1)
        proj_loss = proj_loss + (-(z_j * z_tilde_j).sum(dim=-1)).mean()  # REPA's mean_flat on a (T,) vector
    return proj_loss / bsz


def vectorised_cosine(proj: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(F.normalize(proj, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------- correctness


def _reference_nt_xent(proj, target, temperature, negatives, symmetric):
    b, t, d = proj.shape
    q = F.normalize(proj.double(), dim=-1, eps=1e-12)
    k = F.normalize(target.double(), dim=-1, eps=1e-12)
    if negatives == "position":
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    else:
        q, k = q.reshape(1, b * t, d), k.reshape(1, b * t, d)
    logits = q @ k.transpose(-1, -2) / temperature
    positive = torch.diagonal(logits, dim1=-2, dim2=-1)
    loss = (torch.logsumexp(logits, -1) - positive).mean()
    if symmetric:
        loss = 0.5 * (loss + (torch.logsumexp(logits, -2) - positive).mean())
    return loss


def _max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(expected.abs().max().item(), 1e-12)
    return (actual.double() - expected).abs().max().item() / scale


def run_correctness_preamble(device: torch.device | str | None = None, verbose: bool = True) -> list[dict]:
    """Kernel vs float64 reference on small shapes (loss and both gradients); one dict per case."""
    from erw_fast.kernels.cosine import cosine_alignment_triton
    from erw_fast.kernels.nt_xent import nt_xent_triton

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = (3, 10, 48)  # M = 30 and D = 48: both ragged against the tiles
    cases = [
        ("nt_xent", dtype, negatives, symmetric)
        for dtype in (torch.float32, torch.bfloat16)
        for negatives in ("batch", "position")
        for symmetric in (False, True)
    ]
    cases += [("cosine", dtype, None, None) for dtype in (torch.float32, torch.bfloat16)]
    results = []
    gen = torch.Generator().manual_seed(0)
    for kind, dtype, negatives, symmetric in cases:
        proj = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        target = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        proj64 = proj.detach().double().requires_grad_()
        target64 = target.detach().double().requires_grad_()
        if kind == "nt_xent":
            loss = nt_xent_triton(proj, target, TEMPERATURE, negatives, symmetric, input_precision="ieee")
            ref = _reference_nt_xent(proj64, target64, TEMPERATURE, negatives, symmetric)
        else:
            loss = cosine_alignment_triton(proj, target)
            ref = -F.cosine_similarity(proj64, target64, dim=-1, eps=1e-12).mean()
        loss.backward()
        ref.backward()
        errors = [
            abs(loss.item() - ref.item()) / max(abs(ref.item()), 1.0),
            _max_rel_err(proj.grad, proj64.grad),
            _max_rel_err(target.grad, target64.grad),
        ]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        name = (
            kind if kind == "cosine" else f"nt_xent[{negatives}, {'symmetric' if symmetric else 'one-sided'}]"
        )
        result = dict(
            case=name,
            dtype=str(dtype).removeprefix("torch."),
            shape=list(shape),
            max_rel_err=max(errors),
            tol=tol,
            ok=max(errors) <= tol,
        )
        results.append(result)
        if verbose:
            status = "ok" if result["ok"] else "FAIL"
            print(
                f"  {status:4s} {name:36s} {result['dtype']:8s} max rel err {result['max_rel_err']:.2e}"
                f" (tol {tol:.0e})"
            )
    return results


# --------------------------------------------------------------------------------------------- timing


def measure(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
    reps: int,
    warmup: int,
    budget_s: float = 30.0,
    frozen_target: bool = False,
) -> dict:
    """Raw fwd / bwd / fwd+bwd timings and peak extra memory of one implementation on one shape.

    frozen_target: the target needs no gradient (REPA/ERW training: frozen teacher features).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    proj = torch.randn(shape, generator=gen, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(shape, generator=gen, device=device, dtype=dtype, requires_grad=not frozen_target)
    inputs = (proj,) if frozen_target else (proj, target)

    def fwd_bwd():
        return torch.autograd.grad(loss_fn(proj, target), inputs)

    peak_mib = None
    fwd_bwd()  # compile / autotune outside the measured window
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    fwd_bwd()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # Slow cases (a fp32 baseline at M = 65536 takes ~0.5 s a call) get fewer repeats, so that the whole
    # benchmark fits one device call: at most ~budget_s per case over the three phases, never under 3 repeats.
    per_call = time.perf_counter() - started
    reps = max(min(reps, 3), min(reps, int(budget_s / (3 * max(per_call, 1e-9))) - warmup))
    warmup = min(warmup, reps)

    times = {
        "fwd": time_ms(lambda: loss_fn(proj, target), reps, warmup, device),
        "bwd": _time_backward(loss_fn(proj, target), inputs, reps, warmup, device),
        "fwd_bwd": time_ms(fwd_bwd, reps, warmup, device),
    }
    return {"times_ms": times, "peak_extra_mib": peak_mib, "reps": reps, "warmup": warmup}


def _time_backward(loss: torch.Tensor, inputs, reps: int, warmup: int, device: torch.device) -> list[float]:
    # autograd.grad (not .backward) so nothing accumulates into .grad between runs.
    return time_ms(lambda: torch.autograd.grad(loss, inputs, retain_graph=True), reps, warmup, device)


def _run_case(record: dict, loss_fn, shape, dtype, device, reps, warmup, frozen_target: bool = False) -> dict:
    try:
        record.update(status="ok", **measure(loss_fn, shape, dtype, device, reps, warmup,
                                             frozen_target=frozen_target))
    except torch.OutOfMemoryError:
        record.update(status="OOM", times_ms=None, peak_extra_mib=None)
    except Exception as exc:  # keep the other cases going; the error text lands in the report
        record.update(
            status=f"error: {type(exc).__name__}: {str(exc)[:300]}", times_ms=None, peak_extra_mib=None
        )
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if record["status"] == "ok":
        record["median_ms"] = {p: statistics.median(record["times_ms"][p]) for p in PHASES}
    return record


def run_benchmarks(
    device: torch.device,
    nt_xent_shapes: Sequence[tuple[int, int]] = NT_XENT_SHAPES,
    cosine_shapes: Sequence[tuple[int, int, int]] = COSINE_SHAPES,
    dtype: torch.dtype = torch.bfloat16,
    reps: int = 50,
    warmup: int = 10,
    compile_backend: str = "inductor",
    tokens: int = TOKENS,
    verbose: bool = True,
    on_record: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every (implementation, shape) record; see the module docstring for what is measured.

    ``on_record(records)`` runs after each case (main writes the report so far: a run cut short by a time
    limit still leaves every finished case on disk)."""
    from erw_fast.kernels.cosine import cosine_alignment_triton
    from erw_fast.kernels.nt_xent import nt_xent_triton

    from erw_fast.objectives.nt_xent_chunked import nt_xent_batch_chunked

    def triton_nt_xent(p, t):
        return nt_xent_triton(p, t, TEMPERATURE, "batch")

    def chunked_nt_xent(p, t):  # the PyTorch backend's large-M form: cuBLAS GEMMs on row chunks of the logits
        b, tt, d = p.shape
        q = F.normalize(p.reshape(b * tt, d).float(), dim=-1)
        k = F.normalize(t.reshape(b * tt, d).float(), dim=-1)
        return nt_xent_batch_chunked(q, k, TEMPERATURE, False)

    # The backward is timed with retain_graph=True after a first backward; AOTAutograd's donated buffers refuse
    # that (the first backward freed them), so the compiled row keeps its buffers.
    torch._functorch.config.donated_buffer = False
    compiled_naive = torch.compile(naive_nt_xent, backend=compile_backend, dynamic=False)
    nt_impls = {
        "triton": triton_nt_xent,
        "naive": naive_nt_xent,
        "compiled_naive": compiled_naive,
        "chunked_torch": chunked_nt_xent,
        # The training case: the teacher's features are frozen, so only d proj; Triton takes its one-pass path.
        "triton/frozen": triton_nt_xent,
        "naive/frozen": naive_nt_xent,
    }
    cos_impls = {
        "triton": cosine_alignment_triton,
        "repa_loop": repa_loop_cosine,
        "vectorised": vectorised_cosine,
    }
    elem = torch.finfo(dtype).bits // 8
    records = []
    for m, d in nt_xent_shapes:
        shape = (max(1, m // tokens), min(m, tokens), d)
        m = shape[0] * shape[1]
        for impl, fn in nt_impls.items():
            frozen = impl.endswith("/frozen")
            record = dict(kernel="nt_xent", impl=impl, M=m, D=d, shape=list(shape), dtype=str(dtype))
            records.append(_run_case(record, fn, shape, dtype, device, reps, warmup, frozen_target=frozen))
            bwd = 2 if frozen else 4  # dq only, or dq and dk
            flops = {"fwd": 2 * m * m * d, "bwd": bwd * m * m * d, "fwd_bwd": (2 + bwd) * m * m * d}
            if record["status"] == "ok":
                record["tflops"] = {p: flops[p] / (record["median_ms"][p] * 1e-3) / 1e12 for p in PHASES}
            if verbose:
                print(_summary_line(record))
            if on_record is not None:
                on_record(records)
    for shape in cosine_shapes:
        m, d = shape[0] * shape[1], shape[2]
        for impl, fn in cos_impls.items():
            record = dict(kernel="cosine", impl=impl, M=m, D=d, shape=list(shape), dtype=str(dtype))
            records.append(_run_case(record, fn, shape, dtype, device, reps, warmup))
            nbytes = {"fwd": 2 * m * d * elem, "bwd": 4 * m * d * elem, "fwd_bwd": 6 * m * d * elem}
            if record["status"] == "ok":
                record["gbps"] = {p: nbytes[p] / (record["median_ms"][p] * 1e-3) / 1e9 for p in PHASES}
            if verbose:
                print(_summary_line(record))
            if on_record is not None:
                on_record(records)
    return records


# --------------------------------------------------------------------------------------------- reporting


def _summary_line(record: dict) -> str:
    head = f"{record['kernel']:8s} {record['impl']:15s} M={record['M']:<6d} D={record['D']:<5d}"
    if record["status"] != "ok":
        return f"{head} {record['status']}"
    med = record["median_ms"]
    return f"{head} fwd {med['fwd']:9.3f} ms  bwd {med['bwd']:9.3f} ms  fwd+bwd {med['fwd_bwd']:9.3f} ms"


def environment(device: torch.device) -> dict:
    """The device's name and the versions, Triton's included (the kernels measured here)."""
    return {"device": device_name(device), **versions("triton", import_missing=True)}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(records: list[dict]) -> str:
    lines = [
        "| kernel | shape (B, T, D) | impl | fwd ms | bwd ms | fwd+bwd ms | throughput fwd+bwd | "
        "peak extra MiB | speedup vs baseline (fwd+bwd) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    baselines = {"nt_xent": "naive", "cosine": "repa_loop"}
    for rec in records:
        shape = "(" + ", ".join(map(str, rec["shape"])) + ")"
        if rec["status"] != "ok":
            status = "OOM" if rec["status"] == "OOM" else "error"
            lines.append(
                f"| {rec['kernel']} | {shape} | {rec['impl']} | {status} | {status} | {status} | - | - | - |"
            )
            continue
        med = rec["median_ms"]
        if "tflops" in rec:
            throughput = f"{rec['tflops']['fwd_bwd']:.3g} TFLOP/s"
        else:
            throughput = f"{rec['gbps']['fwd_bwd']:.3g} GB/s"
        base = next(
            (
                r
                for r in records
                if r["kernel"] == rec["kernel"]
                and r["impl"] == baselines[rec["kernel"]]
                and r["shape"] == rec["shape"]
                and r["status"] == "ok"
            ),
            None,
        )
        speedup = f"{base['median_ms']['fwd_bwd'] / med['fwd_bwd']:.2f}x" if base else "- (baseline OOM)"
        lines.append(
            f"| {rec['kernel']} | {shape} | {rec['impl']} | {_fmt(med['fwd'])} | {_fmt(med['bwd'])} | "
            f"{_fmt(med['fwd_bwd'])} | {throughput} | {_fmt(rec['peak_extra_mib'], 1)} | {speedup} |"
        )
    notes = [
        "",
        "NT-Xent throughput counts " + "; ".join(f"{k}: {v}" for k, v in FLOP_FORMULAS.items()) + ".",
        "Cosine throughput counts " + "; ".join(f"{k}: {v}" for k, v in BYTE_FORMULAS.items()) + ".",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(records: list[dict], path: Path) -> bool:
    """fwd+bwd median time per shape and implementation (log scale); False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    kernels = [k for k in ("nt_xent", "cosine") if any(r["kernel"] == k for r in records)]
    fig, axes = plt.subplots(1, len(kernels), figsize=(7 * len(kernels), 4.5), squeeze=False)
    for ax, kernel in zip(axes[0], kernels, strict=True):
        recs = [r for r in records if r["kernel"] == kernel]
        shapes = list(dict.fromkeys(tuple(r["shape"]) for r in recs))
        impls = list(dict.fromkeys(r["impl"] for r in recs))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                rec = next((r for r in recs if r["impl"] == impl and tuple(r["shape"]) == shape), None)
                if rec is not None and rec["status"] == "ok":
                    xs.append(j + i * width)
                    ys.append(rec["median_ms"]["fwd_bwd"])
                elif rec is not None:  # mark OOM / error where the bar would be (y in axes fraction)
                    label = "OOM" if rec["status"] == "OOM" else "error"
                    ax.text(
                        j + i * width,
                        0.02,
                        label,
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        transform=ax.get_xaxis_transform(),
                    )
            ax.bar(xs, ys, width=width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(["x".join(map(str, s)) for s in shapes], rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd median (ms)")
        ax.set_title(f"{kernel} ({recs[0]['dtype'].removeprefix('torch.')}; shape B x T x D)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(
    records: list[dict], env: dict, settings: dict, out_dir: Path, with_plot: bool = True
) -> list[Path]:
    """alignment.json, alignment.md and (with matplotlib and with_plot) alignment.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(
        environment=env,
        settings=settings,
        flop_formulas=FLOP_FORMULAS,
        byte_formulas=BYTE_FORMULAS,
        results=records,
    )
    written = [out_dir / "alignment.json", out_dir / "alignment.md"]
    written[0].write_text(json.dumps(payload, indent=2) + "\n")
    header = (
        f"# Alignment kernels benchmark\n\nDevice: {env['device']}; torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}.\n"
        f"Median of up to {settings['reps']} runs after up to {settings['warmup']} warm-up runs (slow cases get "
        "fewer, at least 3; each record holds its own counts).\n\n"
    )
    written[1].write_text(header + markdown_table(records))
    if with_plot and plot(records, out_dir / "alignment.png"):
        written.append(out_dir / "alignment.png")
    return written


# --------------------------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)

    from erw_fast.kernels import triton_available

    if not triton_available():
        print("Triton is not available: nothing to check or time.")
        return 0
    print("Correctness preamble (kernel vs float64 reference):")
    checks = run_correctness_preamble()
    if not all(c["ok"] for c in checks):
        print("Correctness preamble FAILED; not timing.")
        return 1
    if not torch.cuda.is_available():
        print("No CUDA device: no GPU timing was done (the preamble ran in the Triton interpreter).")
        return 0

    device = torch.device("cuda", torch.cuda.current_device())
    settings = dict(
        dtype="bfloat16",
        temperature=TEMPERATURE,
        negatives="batch",
        symmetric=False,
        tokens_per_image=TOKENS,
        reps=args.reps,
        warmup=args.warmup,
        timing="median of CUDA-event times per call",
        nt_xent_shapes_MD=NT_XENT_SHAPES,
        cosine_shapes_BTD=COSINE_SHAPES,
        correctness=checks,
    )
    env = environment(device)
    records = run_benchmarks(
        device, reps=args.reps, warmup=args.warmup,
        on_record=lambda done: write_report(done, env, settings, args.out, with_plot=False),
    )  # fmt: skip
    for path in write_report(records, env, settings, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
