#!/usr/bin/env python
"""The Python side of ``benchmarks/first_light.sh`` (issue #21): one short GPU run that checks every CUDA path and
measures the headline numbers. The shell script runs each stage under its own time limit; this module does what
a stage needs beyond the product's own commands, and the summary.

    python benchmarks/first_light.py smoke FILE --device cuda [--compile-backend inductor] [--precision bf16]
    python benchmarks/first_light.py alignment FILE --device cuda [--m 16384 --d 768 --tokens 256 --cosine-batch 256]
    python benchmarks/first_light.py record FILE --stage NAME --rc RC --started EPOCH --timeout S [--call NAME --doc
                                            JSON] [--log LOG]
    python benchmarks/first_light.py summary DIR [--dry-run]

``smoke`` and ``alignment`` rewrite their JSON after every check or measurement, so a stage stopped by its time
limit keeps what finished. ``record`` and ``summary`` read and write JSON only (no torch, no erw_fast): they work,
and the summary prints, whatever else broke.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STAGE_FILES = {"1_smoke": "stage1_smoke.json", "2_tests": "stage2_tests.json", "3_train": "stage3_train.json",
               "4_alignment": "stage4_alignment.json"}
DEVICE_IMAGE_LACKS = ("deepspeed", "webdataset", "nvidia.dali", "diffusers")
TIMED_OUT_CODES = (124, 137)  # timeout(1): the limit's TERM, then the KILL after --kill-after


# ----------------------------------------------------------------------------------------------- JSON files


def _strict(value: Any) -> Any:
    """NaN and infinities as strings ("nan", "inf"): json.dumps would write bare NaN, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Written whole or not at all: a stage killed mid-write leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_strict(doc), indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def status_of(rc: int) -> str:
    return "ok" if rc == 0 else "timed out" if rc in TIMED_OUT_CODES else "failed"


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-4000:]}


@functools.cache
def _bench_alignment() -> ModuleType:
    """benchmarks/bench_alignment.py (a script, not a package module), loaded by path once."""
    spec = importlib.util.spec_from_file_location("bench_alignment", HERE / "bench_alignment.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_alignment"] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- stage 1


# (label, kernel, dtype, negatives, symmetric, target needs a gradient): each kernel launch the trainer makes.
KERNEL_CASES: tuple[tuple[str, str, str, str | None, bool, bool], ...] = (
    ("nt_xent one pass, frozen target (the training case)", "nt_xent", "bfloat16", "batch", False, False),
    ("nt_xent one pass + key-side pass, trained target", "nt_xent", "float32", "position", False, True),
    ("nt_xent two passes (symmetric)", "nt_xent", "bfloat16", "batch", True, True),
    ("cosine", "cosine", "bfloat16", None, False, True),
)
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # bench_alignment's preamble and the kernel tests use the same


def _environment(device_name: str) -> dict[str, Any]:
    import torch

    from erw_fast import envinfo

    device = torch.device(device_name)
    env: dict[str, Any] = {"cuda_available": torch.cuda.is_available(),
                           "versions": envinfo.versions("triton", "numpy", import_missing=True),
                           "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}}
    if device.type != "cuda" or torch.cuda.is_available():
        env["device"] = envinfo.device_info(device)
    lacks = {}
    for name in DEVICE_IMAGE_LACKS:
        try:
            lacks[name] = importlib.util.find_spec(name) is not None
        except ImportError:  # a missing parent package, or the dry run's stand-in for the device image
            lacks[name] = False
    env["importable"] = lacks
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version",
                 "--format=csv"]
        try:
            env["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=15).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            env["nvidia_smi"] = f"{type(exc).__name__}: {exc}"
    try:
        git = ["git", "-C", str(REPO), "rev-parse", "HEAD"]
        env["git_commit"] = subprocess.run(git, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):  # the device gets a copy of the working tree, without .git
        env["git_commit"] = None
    return env


def _kernel_check(case: tuple[str, str, str, str | None, bool, bool], shape: tuple[int, int, int],
                  device_name: str) -> dict[str, Any]:
    """One kernel (forward and the gradients it computes) against bench_alignment's float64 PyTorch reference."""
    import torch
    import torch.nn.functional as F
    from erw_fast.kernels import cosine_alignment_triton, nt_xent_triton

    ba = _bench_alignment()
    label, kernel, dtype_name, negatives, symmetric, target_grad = case
    device = torch.device(device_name)
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(shape, generator=gen).to(device, getattr(torch, dtype_name)).requires_grad_()
    target = torch.randn(shape, generator=gen).to(device, getattr(torch, dtype_name)).requires_grad_(target_grad)
    proj64 = proj.detach().double().requires_grad_()
    target64 = target.detach().double().requires_grad_(target_grad)
    if kernel == "nt_xent":
        loss = nt_xent_triton(proj, target, ba.TEMPERATURE, negatives, symmetric, input_precision="ieee")
        ref = ba._reference_nt_xent(proj64, target64, ba.TEMPERATURE, negatives, symmetric)
    else:
        loss = cosine_alignment_triton(proj, target)
        ref = -F.cosine_similarity(proj64, target64, dim=-1, eps=1e-12).mean()
    inputs, refs = [proj, *([target] if target_grad else [])], [proj64, *([target64] if target_grad else [])]
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref, refs)
    errors = {"loss": abs(loss.item() - ref.item()) / max(abs(ref.item()), 1.0)}
    for name, got, want in zip(("d_proj", "d_target"), grads, ref_grads, strict=False):
        errors[name] = ba._max_rel_err(got, want)
    worst = max(errors.values())
    return {"case": label, "dtype": dtype_name, "shape": list(shape), "max_rel_err": errors,
            "tol": TOLERANCE[dtype_name], "ok": math.isfinite(worst) and worst <= TOLERANCE[dtype_name]}


# A tiny ERW configuration: two SiT blocks and the demo teacher, the Triton alignment kernels, the fused AdamW.
SMOKE_OVERRIDES = (
    "run.mode=erw", "model.name=SiT-S/2", "model.input_size=8", "model.depth=2", "model.hidden_size=64",
    "model.num_heads=2", "model.num_classes=10", "model.projector_dim=64", "encoder.names=[demo-vit-t]",
    "encoder.pretrained=false", "encoder.resolution=64", "data.image_size=64", "erw.warmup_depth=1",
    "alignment.encoder_depth=1", "alignment.backend=triton", "train.global_batch_size=4", "train.compile=true",
    "optim.implementation=fused", "logging.progress=false", "logging.plot=false",
)


def _compiled_step_check(device_name: str, compile_backend: str, precision: str) -> dict[str, Any]:
    """The trainer's step (``TrainStep`` on ``LocalEngine``, built as ``erw_fast.bench.train.trainer_step`` builds
    it), compiled: a first step, a step under torch's sync debug mode (any host sync is an error), a step on a NaN
    batch that the fused AdamW must skip on the device (weights, optimizer state and EMA unchanged), and one more
    clean step that must update the weights again."""
    import torch

    from erw_fast.bench.train import _host_batch
    from erw_fast.config import load_config
    from erw_fast.encoders.teacher import load_teacher
    from erw_fast.engines import LocalEngine
    from erw_fast.objectives import resolve_alignment_backend
    from erw_fast.phases import plan_phases
    from erw_fast.runtime import DistEnv
    from erw_fast.step import BatchPlan, TrainStep

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    config = load_config(None, [*SMOKE_OVERRIDES, f"run.device={device.type}", f"train.precision={precision}",
                                f"train.compile_backend={compile_backend}"])
    teacher = load_teacher(config, device, config.model.num_tokens(), lambda line: None)
    backend = resolve_alignment_backend(config.alignment.backend, torch.empty(0, device=device))
    phase = next(p for p in plan_phases(config, teacher, backend) if p.name == "full")
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims)).to(device)
    plan = BatchPlan.derive(config, 1)
    env = DistEnv(rank=0, local_rank=device.index or 0, world_size=1, device=device)
    engine = LocalEngine(model, config, env, plan.accumulation)
    model.train()
    train_step = TrainStep.for_run(config, plan, env)
    host = _host_batch(config, plan.global_batch, device)
    out: dict[str, Any] = {"engine": engine.describe(), "alignment": phase.describe(device),
                           "sync_free": engine.sync_free, "steps": []}

    def snapshot() -> list[torch.Tensor]:
        moments = [t.clone() for state in engine.optimizer.state.values() for t in state.values()
                   if isinstance(t, torch.Tensor)]
        return [*(v.clone() for v in engine.module.state_dict().values()),
                *(v.clone() for v in engine.full_ema_state().values()), *moments]

    host_syncs: list[str] = []  # what torch's sync debug mode stopped; later steps then run without it

    def run(i: int, poison: bool, no_sync: bool = True) -> dict[str, Any]:
        batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        if poison:
            batch["latents"] = torch.full_like(batch["latents"], float("nan"))
        checked = cuda and no_sync and not host_syncs
        if cuda:
            torch.cuda.synchronize(device)
            if checked:
                torch.cuda.set_sync_debug_mode("error")
        started = time.perf_counter()
        try:
            totals = train_step(engine, phase, phase.start + i, batch)
        except RuntimeError as exc:
            if not checked:
                raise
            # The step stopped at the sync (gradients possibly half made): start it again without the check, so
            # the skip checks below still run.
            host_syncs.append(f"step {i}: {exc}"[:2000])
            torch.cuda.set_sync_debug_mode("default")
            engine.optimizer.zero_grad(set_to_none=True)
            return run(i, poison, no_sync)
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode("default")
        if cuda:
            torch.cuda.synchronize(device)
        return {"step": i, "nan_batch": poison, "sync_debug_mode": "error" if checked else None,
                "wall_s": time.perf_counter() - started, "loss": float(totals["loss"]),
                "skipped": float(totals["skipped"]), "grad_norm": float(totals["grad_norm"])}

    first = run(0, poison=False, no_sync=False)  # compiles
    out["steps"].append(first)
    second = run(1, poison=False)
    out["steps"].append(second)
    before = snapshot()
    poisoned = run(2, poison=True)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
    out["steps"].append(poisoned)
    after_skip = snapshot()
    clean = run(3, poison=False)
    updated = not all(torch.equal(a, b) for a, b in zip(after_skip, snapshot(), strict=True))
    out["steps"].append(clean)
    out["checks"] = {
        "finite_loss": all(math.isfinite(s["loss"]) for s in (first, second, clean)),
        "nan_step_skipped": poisoned["skipped"] == 1.0 and not math.isfinite(poisoned["grad_norm"]),
        "nan_step_left_weights_optimizer_ema_unchanged": unchanged,
        "next_clean_step_applied": clean["skipped"] == 0.0 and updated,
        # torch.cuda.set_sync_debug_mode("error") around steps 1-3; CPU ops never wait for a device.
        "no_host_sync": not host_syncs if cuda else "not checked on CPU",
    }
    out["host_syncs"] = host_syncs
    out["ok"] = engine.sync_free and all(v for v in out["checks"].values() if isinstance(v, bool))
    engine.close()
    return out


def smoke(path: Path, device_name: str, compile_backend: str, precision: str) -> int:
    """Stage 1: import, environment, each kernel against the reference, the compiled step. Exit 1 if any failed."""
    started = time.perf_counter()
    doc: dict[str, Any] = {"stage": "1_smoke", "status": "running", "checks": {}}
    write_json(path, doc)
    try:
        import erw_fast.kernels  # noqa: F401  (mapped from kernels/: the import the device image lacked)
        import torch

        doc["checks"]["import"] = {"ok": True, "wall_s": time.perf_counter() - started}
        doc["environment"] = _environment(device_name)
    except Exception as exc:
        doc["checks"]["import"] = {"ok": False, **_error(exc)}
        doc["status"] = "failed"
        write_json(path, doc)
        return 1
    write_json(path, doc)
    if torch.device(device_name).type == "cuda" and not torch.cuda.is_available():
        doc["checks"]["cuda"] = {"ok": False, "error": "CUDA requested but torch.cuda.is_available() is False"}
        doc["status"] = "failed"
        write_json(path, doc)
        return 1

    shape = (4, 72, 200) if device_name.startswith("cuda") else (3, 10, 48)  # ragged against the GPU's tiles
    kernels: list[dict[str, Any]] = []
    doc["checks"]["kernels"] = kernels
    for case in KERNEL_CASES:
        t0 = time.perf_counter()
        try:
            result = _kernel_check(case, shape, device_name)
        except Exception as exc:
            result = {"case": case[0], "ok": False, **_error(exc)}
        result["wall_s"] = time.perf_counter() - t0
        kernels.append(result)
        print(f"  kernel {'ok  ' if result['ok'] else 'FAIL'} {case[0]} ({result['wall_s']:.1f} s)", flush=True)
        write_json(path, doc)

    t0 = time.perf_counter()
    try:
        step = _compiled_step_check(device_name, compile_backend, precision)
    except Exception as exc:
        step = {"ok": False, **_error(exc)}
    step["wall_s"] = time.perf_counter() - t0
    step.update(compile_backend=compile_backend, precision=precision)
    doc["checks"]["compiled_step"] = step
    print(f"  compiled step {'ok' if step['ok'] else 'FAILED'} ({step['wall_s']:.1f} s)", flush=True)
    ok = all(k["ok"] for k in kernels) and step["ok"]
    from erw_fast import envinfo

    # The libraries the checks loaded (timm through the teacher, NVML through the device report), as they ran.
    loaded = envinfo.versions("triton", "timm", "numpy", "pynvml", "torchvision")
    doc["environment"]["versions"].update({k: v for k, v in loaded.items() if v is not None})
    doc["status"] = "ok" if ok else "failed"
    write_json(path, doc)
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------- stage 4


def alignment(path: Path, device_name: str, m: int, d: int, tokens: int, cosine_batch: int, reps: int,
              warmup: int, compile_backend: str) -> int:
    """Stage 4: bench_alignment's measurements at one NT-Xent shape (Triton two-pass and one-pass, naive, compiled
    naive, chunked torch) and one cosine shape (Triton, REPA's loop, vectorised). Exit 1 if a case errored."""
    import torch
    import torch._functorch.config

    from erw_fast.envinfo import peak_bf16_tflops

    ba = _bench_alignment()
    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            write_json(path, {"stage": "4_alignment", "status": "failed", "error": "CUDA is not available"})
            return 1
        device = torch.device("cuda", torch.cuda.current_device())
    env = ba.environment(device)
    # bench_alignment times the backward with retain_graph=True on a graph whose first backward ran without it;
    # AOTAutograd's donated buffers refuse that (seen with the aot_eager backend), which would lose the
    # torch.compile(naive) row.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    nt_shapes, cos_shapes = [(m, d)], [(cosine_batch, tokens, d)]
    doc: dict[str, Any] = {
        "stage": "4_alignment", "status": "running", "environment": env,
        "peak_bf16_tflops": peak_bf16_tflops(env["device"]) if device.type == "cuda" else None,
        "settings": {"dtype": "bfloat16", "temperature": ba.TEMPERATURE, "negatives": "batch", "symmetric": False,
                     "tokens_per_image": tokens, "reps": reps, "warmup": warmup, "compile_backend": compile_backend,
                     "nt_xent_shapes_MD": nt_shapes, "cosine_shapes_BTD": cos_shapes,
                     "timing": "median of CUDA-event times per call (perf_counter on CPU)",
                     "torch._functorch.config.donated_buffer": False},
        "flop_formulas": ba.FLOP_FORMULAS, "byte_formulas": ba.BYTE_FORMULAS, "results": [],
    }
    write_json(path, doc)
    done: list[dict[str, Any]] = []

    def keep(records: list[dict[str, Any]]) -> None:
        doc["results"] = [*done, *records]
        write_json(path, doc)

    common = dict(dtype=torch.bfloat16, reps=reps, warmup=warmup, compile_backend=compile_backend, tokens=tokens,
                  on_record=keep)
    # NT-Xent first (two targets), then cosine: a stage cut short loses the last measured.
    done += ba.run_benchmarks(device, nt_xent_shapes=nt_shapes, cosine_shapes=[], **common)
    done += ba.run_benchmarks(device, nt_xent_shapes=[], cosine_shapes=cos_shapes, **common)
    doc["results"] = done
    doc["markdown"] = ba.markdown_table(done)
    ok = all(r["status"] in ("ok", "OOM") for r in done)
    doc["status"] = "ok" if ok else "failed"
    write_json(path, doc)
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------- record


def _tail(path: Path | None, lines: int = 60) -> str | None:
    if path is None or not path.exists():
        return None
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def record(path: Path, stage: str, rc: int, started: float, timeout: float, call: str | None = None,
           doc: Path | None = None, log: Path | None = None, stage_limit: float | None = None) -> None:
    """Merge a finished (or killed) command's exit code, wall time and log tail into the stage's JSON. With
    ``call``, the command is one of several in the stage: its entry (with the JSON document it wrote) goes under
    ``calls`` and the stage's status is the worst of its calls'."""
    data = read_json(path) or {}
    entry: dict[str, Any] = {"status": status_of(rc), "rc": rc, "wall_s": round(time.time() - started, 2),
                             "timeout_s": timeout, "log_tail": _tail(log)}
    data["stage"] = stage
    if call is None:
        data.update(entry)
    else:
        entry["doc"] = read_json(doc) if doc is not None else None
        calls = data.setdefault("calls", {})
        calls[call] = entry
        rank = ["ok", "failed", "timed out"]
        data["status"] = max((c["status"] for c in calls.values()), key=rank.index)
        data["rc"] = next((c["rc"] for c in calls.values() if c["rc"]), 0)
        data["wall_s"] = round(sum(c["wall_s"] for c in calls.values()), 2)
        data["timeout_s"] = stage_limit if stage_limit is not None else sum(c["timeout_s"] for c in calls.values())
    write_json(path, data)


# ----------------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class Target:
    key: str
    what: str
    goal: str
    threshold: float
    higher_is_better: bool
    source: str  # the stage it is measured in
    issue: str


TARGETS: tuple[Target, ...] = (
    Target("phase2_mfu", "Phase-2 MFU, SiT-XL/2 bf16 b=32", "≥ 55%", 0.55, True, "3_train", "#7"),
    Target("phase2_speedup", "Phase 2 vs the reference step", "≥ 2.5×", 2.5, True, "3_train", "#7"),
    Target("phase1_ratio", "Phase-1 step / its FLOP share", "≤ 1.15", 1.15, False, "3_train", "#7"),
    Target("ntxent_peak", "NT-Xent fwd+bwd, share of bf16 peak", "≥ 50%", 0.5, True, "4_alignment", "#4"),
    Target("ntxent_vs_naive", "NT-Xent fwd+bwd vs naive", "≥ 3×", 3.0, True, "4_alignment", "#4"),
    Target("cosine_vs_loop", "cosine kernel vs REPA's loop", "≥ 20×", 20.0, True, "4_alignment", "#4"),
)


@dataclass
class Measured:
    value: float | None = None
    text: str = ""
    why_missing: str | None = None  # set when value is None


def _missing(stage: dict[str, Any] | None, what: str, call: dict[str, Any] | None = None) -> str:
    """Why a number is absent: the stage (or the call that measures it) timed out, failed or never ran."""
    source = call if call is not None else stage
    if stage is None:
        return "not measured (stage did not run)"
    if source is None:
        return "not measured (its call did not run)"
    status = source.get("status", "running")
    if status == "timed out" or status == "running":
        return "not measured (timed out)"
    if status == "failed":
        return f"not measured (failed, rc {source.get('rc')})"
    return f"not measured (no {what} result)"


def _train_results(stage: dict[str, Any] | None) -> list[dict[str, Any]]:
    calls = (stage or {}).get("calls", {})
    return [r for c in calls.values() for r in ((c.get("doc") or {}).get("results") or [])]


def _fast(results: list[dict[str, Any]], phase: str) -> dict[str, Any] | None:
    """The compiled fast variant of ``phase`` when it was measured, else the eager one."""
    ok = {r["variant"]: r for r in results if r.get("status") == "ok" and r["phase"] == phase}
    return ok.get("fast+compile") or ok.get("fast")


def _phase2_mfu(stage: dict[str, Any] | None) -> Measured:
    calls = (stage or {}).get("calls", {})
    r = _fast(_train_results(stage), "full")
    if r is None:
        return Measured(why_missing=_missing(stage, "Phase-2", calls.get("compiled")))
    if r.get("mfu") is None:
        return Measured(text=f"n/a: no bf16 peak for this device ({r['img_per_s']:.1f} img/s, {r['variant']})",
                        why_missing="not measured (no bf16 peak for this device)")
    return Measured(r["mfu"], f"{r['mfu'] * 100:.1f}% ({r['variant']}, {r['img_per_s']:.0f} img/s)")


def _phase2_speedup(stage: dict[str, Any] | None) -> Measured:
    calls = (stage or {}).get("calls", {})
    results = _train_results(stage)
    fast = _fast(results, "full")
    ref = next((r for r in results if r.get("status") == "ok" and r["phase"] == "full"
                and r["variant"] == "reference"), None)
    if ref is None:
        return Measured(why_missing=_missing(stage, "reference-step", calls.get("eager_reference")))
    if fast is None:
        return Measured(why_missing=_missing(stage, "Phase-2", calls.get("compiled")))
    ratio = fast["img_per_s"] / ref["img_per_s"]
    return Measured(ratio, f"{ratio:.2f}× ({fast['variant']} {fast['img_per_s']:.0f} vs {ref['img_per_s']:.0f} img/s)")


def _phase1_ratio(stage: dict[str, Any] | None) -> Measured:
    """warmup step / (warmup FLOPs ÷ full FLOPs × full step), medians, as ``erw_fast.bench.train`` defines it;
    the compiled pair when both were measured, else the eager pair."""
    calls = (stage or {}).get("calls", {})
    ok = {(r["phase"], r["variant"]): r for r in _train_results(stage) if r.get("status") == "ok"}
    for variant in ("fast+compile", "fast"):
        warm, full = ok.get(("warmup", variant)), ok.get(("full", variant))
        if warm and full:
            share = warm["gflops_per_step"] / full["gflops_per_step"]
            ratio = warm["step_time_median_s"] / (share * full["step_time_median_s"])
            return Measured(ratio, f"{ratio:.2f} ({variant}; FLOP share {share:.3f}, "
                                   f"{warm['step_time_median_s'] * 1e3:.1f} vs {full['step_time_median_s'] * 1e3:.1f}"
                                   " ms)")
    return Measured(why_missing=_missing(stage, "Phase-1", calls.get("compiled")))


def _alignment_record(stage: dict[str, Any] | None, kernel: str, impl: str) -> dict[str, Any] | None:
    return next((r for r in (stage or {}).get("results", []) if r["kernel"] == kernel and r["impl"] == impl), None)


def _speedup(stage: dict[str, Any] | None, kernel: str, impl: str, baseline: str) -> Measured:
    fast, base = _alignment_record(stage, kernel, impl), _alignment_record(stage, kernel, baseline)
    for r, name in ((fast, impl), (base, baseline)):
        if r is None:
            return Measured(why_missing=_missing(stage, f"{kernel} {name}"))
        if r["status"] != "ok":
            return Measured(why_missing=f"not measured ({kernel} {name}: {r['status'][:60]})")
    assert fast is not None and base is not None
    ratio = base["median_ms"]["fwd_bwd"] / fast["median_ms"]["fwd_bwd"]
    return Measured(ratio, f"{ratio:.3g}× ({fast['median_ms']['fwd_bwd']:.3f} vs "
                           f"{base['median_ms']['fwd_bwd']:.3f} ms, M={fast['M']} D={fast['D']})")


def _ntxent_peak(stage: dict[str, Any] | None) -> Measured:
    r = _alignment_record(stage, "nt_xent", "triton")
    if r is None:
        return Measured(why_missing=_missing(stage, "NT-Xent Triton"))
    if r["status"] != "ok":
        return Measured(why_missing=f"not measured (nt_xent triton: {r['status'][:60]})")
    tflops = r["tflops"]["fwd_bwd"]
    peak = (stage or {}).get("peak_bf16_tflops")
    if not peak:
        return Measured(text=f"n/a: no bf16 peak for this device ({tflops:.3g} TFLOP/s)",
                        why_missing="not measured (no bf16 peak for this device)")
    return Measured(tflops / peak, f"{tflops / peak * 100:.1f}% ({tflops:.0f} of {peak:.0f} TFLOP/s, M={r['M']})")


TARGET_SETTINGS = ("Targets for an H100, bf16: SiT-XL/2 at 256 px, batch 32, DINOv2-B teacher on the fly (ERW preset); "
                   "NT-Xent one-sided with batch negatives at M = 16384, D = 768; cosine at B = 256, T = 256, D = 768.")

MEASURE: dict[str, Callable[[dict[str, Any] | None], Measured]] = {
    "phase2_mfu": _phase2_mfu,
    "phase2_speedup": _phase2_speedup,
    "phase1_ratio": _phase1_ratio,
    "ntxent_peak": _ntxent_peak,
    "ntxent_vs_naive": lambda s: _speedup(s, "nt_xent", "triton", "naive"),
    "cosine_vs_loop": lambda s: _speedup(s, "cosine", "triton", "repa_loop"),
}


def _stage_line(name: str, doc: dict[str, Any] | None) -> str:
    if doc is None:
        return f"{name}: did not run"
    text = f"{name}: {doc.get('status', 'running')}"
    if doc.get("wall_s") is not None:
        text += f" in {doc['wall_s']:.0f} s (limit {doc.get('timeout_s')} s)"
    return text


def _details(stages: dict[str, dict[str, Any] | None]) -> list[str]:
    """The numbers behind the targets and what each check found, a line each."""
    lines = []
    smoke_doc = stages["1_smoke"] or {}
    checks = smoke_doc.get("checks", {})
    for name in ("import", "cuda"):
        if checks.get(name, {}).get("ok") is False:
            lines.append(f"smoke {name}: FAILED {checks[name].get('error', '')[:150]}")
    kernels = checks.get("kernels", [])
    if kernels:
        bad = [k["case"] for k in kernels if not k.get("ok")]
        lines.append(f"smoke kernels: {len(kernels) - len(bad)}/{len(kernels)} match the float64 reference"
                     + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    step = checks.get("compiled_step")
    if step:
        if "checks" in step:
            failed = [k for k, v in step["checks"].items() if v is False]
            no_sync = step["checks"]["no_host_sync"]
            if no_sync is True:
                syncs = "none"
            elif no_sync is False:
                syncs = "FOUND, " + (step.get("host_syncs") or ["?"])[0][:120]
            else:
                syncs = str(no_sync)
            lines.append(f"smoke compiled step ({step.get('compile_backend')}): "
                         + ("ok" if step.get("ok") else f"FAILED {', '.join(failed) or 'sync_free'}")
                         + f"; host syncs in the step: {syncs}")
        else:
            lines.append(f"smoke compiled step: FAILED {step.get('error', '')[:150]}")
    tests = stages["2_tests"] or {}
    if tests.get("counts"):
        c = tests["counts"]
        failed = [n for n, t in tests.get("tests", {}).items() if t["outcome"] in ("failed", "error")]
        lines.append(f"tests: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
                     + (f"; FAILED: {', '.join(failed[:4])}" + (" …" if len(failed) > 4 else "") if failed else ""))
    for r in _train_results(stages["3_train"]):
        if r.get("status") != "ok":
            lines.append(f"train {r['phase']} {r['variant']} b={r['batch']}: {r.get('status')}")
            continue
        mfu = f", MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
        mem = f", peak {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else ""
        b = r["breakdown_median_s"]
        lines.append(f"train {r['phase']} {r['variant']} b={r['batch']}: {r['img_per_s']:.1f} img/s, "
                     f"{r['step_time_median_s'] * 1e3:.1f} ms/step{mfu}{mem} (enc {b['encoder'] * 1e3:.1f} / fwd "
                     f"{b['forward'] * 1e3:.1f} / bwd {b['backward'] * 1e3:.1f} / opt {b['optimizer'] * 1e3:.1f} / "
                     f"ema {b['ema'] * 1e3:.1f} ms)")
    align = stages["4_alignment"]
    one_pass = _speedup(align, "nt_xent", "triton/frozen", "naive/frozen")
    frozen = _alignment_record(align, "nt_xent", "triton/frozen")
    if frozen and frozen.get("status") == "ok":
        lines.append(f"NT-Xent one pass (frozen target): {frozen['tflops']['fwd_bwd']:.3g} TFLOP/s fwd+bwd, "
                     f"{one_pass.text or one_pass.why_missing} vs naive/frozen")
    chunked = _speedup(align, "nt_xent", "triton", "chunked_torch")
    if chunked.value is not None:
        lines.append(f"NT-Xent Triton vs chunked torch: {chunked.text}")
    mems = [(impl, _alignment_record(align, "nt_xent", impl)) for impl in ("triton", "naive", "chunked_torch")]
    mem_text = [f"{impl} {r['peak_extra_mib']:.0f}" for impl, r in mems
                if r and r.get("status") == "ok" and r.get("peak_extra_mib") is not None]
    if mem_text:
        lines.append(f"NT-Xent peak extra memory fwd+bwd (MiB): {', '.join(mem_text)}")
    return lines


def summarise(out: Path, dry_run: bool) -> dict[str, Any]:
    stages = {name: read_json(out / file) for name, file in STAGE_FILES.items()}
    env = (stages["1_smoke"] or {}).get("environment") or {}
    device = env.get("device") or {}
    versions = env.get("versions") or {}
    rows = []
    for t in TARGETS:
        m = MEASURE[t.key](stages[t.source])
        met = None if m.value is None else (m.value >= t.threshold if t.higher_is_better else m.value <= t.threshold)
        if m.value is None:
            verdict = m.why_missing or "not measured"
        elif dry_run:
            verdict = "dry run: not a result"
        else:
            verdict = "met" if met else "missed"
        rows.append({"target": t.key, "what": t.what, "goal": t.goal, "issue": t.issue, "measured": m.value,
                     "measured_text": m.text or "-", "met": None if dry_run else met, "verdict": verdict,
                     "stage": t.source})
    return {
        "dry_run": dry_run,
        "device": device.get("name"), "device_info": device, "versions": versions,
        "git_commit": env.get("git_commit"),
        "stages": {name: None if d is None else {k: d.get(k) for k in ("status", "rc", "wall_s", "timeout_s")}
                   for name, d in stages.items()},
        "stage_lines": [_stage_line(name, d) for name, d in stages.items()],
        "targets": rows,
        "details": _details(stages),
    }


def _title(s: dict[str, Any]) -> str:
    v = s["versions"]
    title = (f"GPU first light: {s['device'] or 'device unknown'}; torch {v.get('torch')}, CUDA {v.get('cuda')}, "
             f"Triton {v.get('triton')}")
    if s["dry_run"]:
        title += " (DRY RUN on CPU: tiny shapes, TRITON_INTERPRET=1; the numbers are not results)"
    return title


def render_markdown(s: dict[str, Any]) -> str:
    lines = [f"# {_title(s)}", "", TARGET_SETTINGS, "",
             "| target | goal | measured | verdict | issue |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['what']} | {r['goal']} | {r['measured_text']} | {r['verdict']} | {r['issue']} |"
              for r in s["targets"]]
    lines += ["", "## Stages", ""] + [f"- {line}" for line in s["stage_lines"]]
    lines += ["", "## Details", ""] + [f"- {line}" for line in s["details"]]
    return "\n".join(lines) + "\n"


def render_text(s: dict[str, Any]) -> str:
    """The one-screen table the script prints last."""
    width = [max(len(r[k]) for r in s["targets"]) for k in ("what", "goal", "measured_text")]
    lines = [_title(s), "stages: " + " | ".join(s["stage_lines"]), ""]
    for r in s["targets"]:
        lines.append(f"{r['what']:<{width[0]}}  {r['goal']:<{width[1]}}  {r['measured_text']:<{width[2]}}  "
                     f"{r['verdict']}")
    lines += [""] + s["details"]
    return "\n".join(lines)


def summary(out: Path, dry_run: bool) -> int:
    s = summarise(out, dry_run)
    write_json(out / "summary.json", s)
    tmp = out / ".summary.md.tmp"
    tmp.write_text(render_markdown(s))
    os.replace(tmp, out / "summary.md")
    print(render_text(s))
    return 0


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smoke", help="stage 1: environment, kernels vs reference, a compiled step")
    p.add_argument("file", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p = sub.add_parser("alignment", help="stage 4: NT-Xent and cosine kernels vs the PyTorch baselines")
    p.add_argument("file", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--m", type=int, default=16384, help="NT-Xent rows M = B·T")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--tokens", type=int, default=256, help="T, tokens per image")
    p.add_argument("--cosine-batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile-backend", default="inductor", help="for the torch.compile(naive) row")
    p = sub.add_parser("record", help="merge a stage command's exit code, wall time and log into its JSON")
    p.add_argument("file", type=Path)
    p.add_argument("--stage", required=True)
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--started", type=float, required=True, help="epoch seconds when the command started")
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--call", default=None)
    p.add_argument("--doc", type=Path, default=None)
    p.add_argument("--log", type=Path, default=None)
    p.add_argument("--stage-limit", type=float, default=None, help="the whole stage's limit, when it has calls")
    p = sub.add_parser("summary", help="the targets table: summary.json, summary.md and stdout")
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "smoke":
        return smoke(args.file, args.device, args.compile_backend, args.precision)
    if args.command == "alignment":
        return alignment(args.file, args.device, args.m, args.d, args.tokens, args.cosine_batch, args.reps,
                         args.warmup, args.compile_backend)
    if args.command == "record":
        record(args.file, args.stage, args.rc, args.started, args.timeout, args.call, args.doc, args.log,
               args.stage_limit)
        return 0
    return summary(args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
