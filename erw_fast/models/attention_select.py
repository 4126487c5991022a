"""Choose the attention backend by measurement at the model's own shape.

Which kernel is fastest depends on the shape, dtype and device: SiT-XL/2 at 256 px has 256 tokens and head dim
72, which FlashAttention pads to 96, so the cuDNN or memory-efficient SDPA kernels can win there. Every available
backend runs forward + backward on random q, k, v of the training shape; a backend whose output disagrees with
the explicit ``math`` attention (computed in fp32) beyond the dtype's tolerance is excluded, and the fastest of
the rest is used. The table is logged so the choice is visible.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from erw_fast.models.attention import _KERNELS, available_attention_backends

_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class BackendTiming:
    backend: str
    seconds: float | None  # median forward + backward; None when it did not run or was wrong
    max_abs_error: float | None  # against math in fp32
    note: str = ""


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_attention_backends(batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
                               device: torch.device, repeats: int = 10, warmup: int = 3,
                               candidates: list[str] | None = None) -> list[BackendTiming]:
    available = available_attention_backends()
    names = candidates or [name for name, ok in available.items() if ok]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(device, dtype) for _ in range(3))
    reference = _KERNELS["math"](q.float(), k.float(), v.float())
    grad = torch.randn(reference.shape, generator=g).to(device, dtype)
    tolerance = _TOLERANCE[dtype]
    out: list[BackendTiming] = []
    for name in names:
        if not available.get(name, False):
            out.append(BackendTiming(name, None, None, "not available here"))
            continue
        kernel = _KERNELS[name]
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        try:
            with torch.no_grad():
                error = (kernel(*(t.detach() for t in leaves)).float() - reference).abs().max().item()
            if not error <= tolerance:
                out.append(BackendTiming(name, None, error, f"disagrees with math (tolerance {tolerance:g})"))
                continue

            def fwd_bwd(
                kernel: Callable[..., torch.Tensor] = kernel, leaves: tuple[torch.Tensor, ...] = leaves
            ) -> None:
                kernel(*leaves).backward(grad)

            out.append(BackendTiming(name, _time(fwd_bwd, device, repeats, warmup), error))
        except RuntimeError as exc:  # e.g. no kernel for this dtype/shape on this GPU
            out.append(BackendTiming(name, None, None, f"failed: {str(exc).splitlines()[0][:80]}"))
    return out


def choose_attention_backend(timings: list[BackendTiming]) -> str:
    ran = [t for t in timings if t.seconds is not None]
    if not ran:
        raise RuntimeError("no attention backend ran correctly: " + "; ".join(f"{t.backend}: {t.note}"
                                                                              for t in timings))
    return min(ran, key=lambda t: t.seconds).backend


def timing_table(timings: list[BackendTiming], chosen: str) -> str:
    rows = ["backend          fwd+bwd (ms)  max |err| vs math",
            "---------------  ------------  -----------------"]
    for t in timings:
        ms = f"{t.seconds * 1e3:12.3f}" if t.seconds is not None else f"{'-':>12}"
        err = f"{t.max_abs_error:.2e}" if t.max_abs_error is not None else "-"
        mark = "  ← chosen" if t.backend == chosen else (f"  ({t.note})" if t.note else "")
        rows.append(f"{t.backend:<15}  {ms}  {err:>17}{mark}")
    return "\n".join(rows)


def measured_backend_for_run(sit_kwargs: dict, micro_batch: int, precision: str, device: torch.device,
                             world_size: int, log: Callable[[str], None], extra_tokens: int = 0) -> str:
    """model.attn_backend=measure: time every available backend at the run's shape (micro-batch, heads, tokens —
    the patches plus ``extra_tokens``, e.g. REG's class token —, head dim, dtype) and return the fastest correct
    one; rank 0 decides for all ranks."""
    import torch.distributed as dist

    heads, hidden = sit_kwargs["num_heads"], sit_kwargs["hidden_size"]
    tokens = (sit_kwargs["input_size"] // sit_kwargs["patch_size"]) ** 2 + extra_tokens
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    timings = measure_attention_backends(micro_batch, heads, tokens, hidden // heads, dtype, device)
    choice = [choose_attention_backend(timings)]
    if world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    log(f"attention measured at batch {micro_batch} × {heads} heads × {tokens} tokens × head dim "
        f"{hidden // heads}, {dtype}:\n{timing_table(timings, choice[0])}")
    return choice[0]
