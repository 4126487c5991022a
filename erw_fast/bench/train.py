"""``erw-bench train``: training throughput per phase (img/s, step-time regions, TFLOP/s, MFU, peak memory).

The fast variants time ``erw_fast.step.TrainStep`` -- the function the trainer calls -- on the engine, phase
and model the trainer builds from the same config (``--config`` and ``key=value`` overrides, as ``train.py``
takes them). ``--reference-step`` adds a separately labelled imitation of the reference code's step (per-sample
alignment loop, fp16 + GradScaler, eager, per-parameter EMA, fp32 teacher) for the speed-up.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from erw_fast import flops as F
from erw_fast.bench.common import _gflop, _md_table, _slug, device_info, resolve_device, versions
from erw_fast.bench.gpu_monitor import GpuMonitor, gpu_telemetry_unavailable
from erw_fast.config import Config, load_config

REGIONS = ("data", "encoder", "forward", "backward", "optimizer", "ema")
MODES = {"warmup": "erw", "full": "erw", "repa": "repa", "sit": "sit", "reg": "reg",  # each phase's run.mode
         "denoise": "repa"}
# "denoise": the steps after the alignment stopped (REPA with a hard stop at step 1, timed after it): no teacher,
# projector or images, on the same model, to compare with "repa" (before the stop).
STOPPED = ("alignment.schedule=hard_stop", "alignment.stop_step=1")


class RegionTimer:
    """The step's regions, each opened by ``region(name)`` (which closes the previous one); a region entered
    several times in a step (micro-batches) adds up. CUDA events on GPU (read after one sync at the end, so
    timing never serialises the step), perf_counter on CPU (where every op is synchronous anyway).

    With ``ranges`` the regions also appear as named ranges in profiler traces (``record_function``) and in
    Nsight Systems (NVTX)."""

    def __init__(self, device: torch.device, ranges: bool = False, label: str = "") -> None:
        self.cuda = device.type == "cuda"
        self.ranges = ranges
        self.label = label
        self.steps: list[list[tuple[str | None, Any]]] = []
        self._open: list[Any] = []

    def _push(self, name: str) -> None:
        if not self.ranges:
            return
        rf = torch.autograd.profiler.record_function(f"{self.label}{name}")
        rf.__enter__()
        self._open.append(rf)
        if self.cuda:
            torch.cuda.nvtx.range_push(f"{self.label}{name}")

    def _pop(self) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)
            if self.cuda:
                torch.cuda.nvtx.range_pop()

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.steps.append([])
        self._push("step")

    def region(self, name: str) -> None:
        if self.steps[-1]:
            self._pop()
        self.steps[-1].append((name, self._now()))
        self._push(name)

    def stop(self) -> None:
        self.steps[-1].append((None, self._now()))
        self._pop()  # the last region
        self._pop()  # the step

    def results(self) -> list[dict[str, float]]:
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for marks in self.steps:
            regions: dict[str, float] = {}
            for (name, a), (_, b) in zip(marks, marks[1:], strict=False):
                regions[name] = regions.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
            out.append(regions)
        return out


@dataclass
class TrainSettings:
    config: str | None = None  # a YAML config, as train.py takes it
    overrides: list[str] = field(default_factory=list)  # key=value, applied after the config
    phases: list[str] = field(default_factory=lambda: ["warmup", "full"])
    batches: list[int] = field(default_factory=lambda: [32])
    steps: int = 20
    warmup: int = 5
    device: str = "auto"
    precision: str | None = None  # None: the config's train.precision
    compile: str | None = None  # off | on | both; None: the config's train.compile
    compile_scope: str | None = None  # blocks (regional) | model; None: the config's
    compile_mode: str | None = None
    profile_dir: str | None = None  # write a Chrome trace of a few profiled steps per measurement here
    profile_steps: int = 3
    attn_backends: list[str] | None = None  # each its own variant; None: the config's model.attn_backend
    alignment_backend: str | None = None  # None: the config's alignment.backend
    reference_step: bool = False
    seed: int = 0


# What a throughput measurement does not need: teacher weights (random ones cost the same), logging, checkpoints.
BENCH_DEFAULTS = ("encoder.pretrained=false", "logging.progress=false", "logging.plot=false")


def bench_config(s: TrainSettings, phase: str, batch: int, device: torch.device, compiled: bool | None = None,
                 attn_backend: str | None = None) -> Config:
    """The config one measurement trains with: the user's config and overrides, then this case's settings (a
    ``train.micro_batch_size`` the user sets is kept: the step then accumulates, as the trainer would)."""
    case = [f"run.mode={MODES[F.check_phase(phase)]}", f"run.device={device.type}", f"run.seed={s.seed}",
            f"train.global_batch_size={batch}", *(STOPPED if phase == "denoise" else ())]
    for key, value in (("train.precision", s.precision), ("train.compile", compiled),
                       ("train.compile_scope", s.compile_scope), ("train.compile_mode", s.compile_mode),
                       ("model.attn_backend", attn_backend), ("alignment.backend", s.alignment_backend)):
        if value is not None:
            case.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return load_config(s.config, [*BENCH_DEFAULTS, *s.overrides, *case])


def _variants(s: TrainSettings, base: Config) -> list[tuple[str, bool, str]]:
    """(label, compiled, attention backend) of each fast variant, then the reference."""
    from erw_fast.models import resolve_attention_backend

    compiles = {"off": [False], "on": [True], "both": [False, True], None: [base.train.compile]}[s.compile]
    backends = [b if b == "measure" else resolve_attention_backend(b)
                for b in (s.attn_backends or [base.model.attn_backend])]
    out = []
    for backend in backends:
        for compiled in compiles:
            label = "fast+compile" if compiled else "fast"
            out.append((f"{label}@{backend}" if len(backends) > 1 else label, compiled, backend))
    return out + ([("reference", False, "sdpa")] if s.reference_step else [])


def guard_cpu(s: TrainSettings, device: torch.device, limit: float) -> None:
    """Refuse real-size configurations on CPU: one SiT-XL/2 step there takes many minutes."""
    if device.type != "cpu":
        return
    worst = max(F.step_flops(bench_config(s, p, b, device), p)["total"] for p in s.phases for b in s.batches)
    if worst > limit:
        raise ValueError(
            f"on CPU one step of this configuration is {worst / 1e12:.1f} TFLOP, too slow here (limit "
            f"{limit / 1e12:.1f} TFLOP, --cpu-flop-limit); pick a tiny configuration (model.depth/hidden_size/"
            "num_heads/input_size, encoder.names=[demo-vit-t] encoder.resolution=64) or run on a GPU"
        )


def _reference_cosine_loop(zs: Sequence[torch.Tensor], zs_tilde: Sequence[torch.Tensor]) -> torch.Tensor:
    """REPA's projection loss as the reference writes it: a Python loop over encoders and samples."""
    loss: torch.Tensor | float = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde, strict=True):
        for z_j, z_tilde_j in zip(z, z_tilde, strict=True):
            z_tilde_j = torch.nn.functional.normalize(z_tilde_j, dim=-1)
            z_j = torch.nn.functional.normalize(z_j, dim=-1)
            loss = loss + (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    return loss / (len(zs) * bsz)


@torch.no_grad()
def _reference_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """REPA's update_ema: one mul_/add_ pair per parameter, in a Python loop."""
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def _reference_loss(
    model: torch.nn.Module, phase: str, latents: torch.Tensor, labels: torch.Tensor,
    feats: list[torch.Tensor] | None, interpolant: Any, weight: float, cls_weight: float = 0.0,
) -> torch.Tensor:
    """The reference's loss computation: per-sample loop for the projection loss, MSE in the autocast dtype; REG
    ("reg") noises the teacher's CLS (feats[0]'s token 0) right after the latent and adds its velocity MSE."""
    if phase == "warmup":
        zs = model(latents, torch.zeros(latents.shape[0], device=latents.device), labels)
        return _reference_cosine_loop(zs, feats)
    t = torch.rand(latents.shape[0], device=latents.device)
    noise = torch.randn_like(latents)
    x_t, target = interpolant.interpolate(latents, noise, t)
    if phase == "reg":
        cls = feats[0][:, 0]
        cls_t, cls_target = interpolant.interpolate(cls, torch.randn_like(cls), t)
        out, zs, cls_out = model(x_t, t, labels, cls_token=cls_t)
    else:
        out, zs = model(x_t, t, labels)
    loss = ((out - target) ** 2).mean(dim=(1, 2, 3)).mean()
    if feats is not None:
        loss = loss + weight * _reference_cosine_loop(zs, feats)
    if phase == "reg":
        loss = loss + cls_weight * ((cls_out - cls_target) ** 2).mean(dim=-1).mean()
    return loss


Step = Callable[[int, "RegionTimer | None"], torch.Tensor]  # (step index, timer) → the step's loss


@dataclass
class BenchStep:
    run: Step
    describe: str  # the engine, or what the reference imitation does
    close: Callable[[], None]
    engine: Any = None  # the trainer's engine (fast variants)


def trainer_step(config: Config, phase_name: str, teacher: Any, device: torch.device, batches: Any) -> BenchStep:
    """The trainer's step: its phase, model, engine and ``TrainStep``, built from ``config`` as the trainer does
    (one process: the model is initialised from the current RNG state, as ``Trainer.run`` seeds it)."""
    from erw_fast.engines import LocalEngine
    from erw_fast.objectives import resolve_alignment_backend
    from erw_fast.phases import plan_phases
    from erw_fast.runtime import DistEnv
    from erw_fast.step import BatchPlan, TrainStep

    env = DistEnv(rank=0, local_rank=device.index or 0, world_size=1, device=device)
    plan = BatchPlan.derive(config, 1)
    backend = resolve_alignment_backend(config.alignment.backend, torch.empty(0, device=device))
    phase = next(p for p in plan_phases(config, teacher, backend) if p.name == phase_name)
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims, alignment=config.alignment)).to(device)
    engine = LocalEngine(model, config, env, plan.accumulation)
    model.train()
    train_step = TrainStep.for_run(config, plan, env)

    def step(i: int, timer: RegionTimer | None) -> torch.Tensor:
        region = timer.region if timer is not None else (lambda _name: None)
        if timer is not None:
            timer.start()
        region("data")
        totals = train_step(engine, phase, phase.start + i, next(batches), region)
        if timer is not None:
            timer.stop()
        return totals["loss"]

    return BenchStep(step, engine.describe(), engine.close, engine)


def reference_step(config: Config, phase_name: str, teacher: Any, device: torch.device,
                   copy_batch: Callable[[], dict[str, torch.Tensor]]) -> BenchStep:
    """The reference code's way of running the step, on the same model: torch's default AdamW, fp16 autocast +
    GradScaler, the teacher in fp32 outside autocast, the per-sample alignment loop, a per-parameter EMA."""
    from erw_fast.objectives import Interpolant
    from erw_fast.phases import plan_phases
    from erw_fast.runtime import autocast_context

    phase = next(p for p in plan_phases(config, teacher, "torch") if p.name == phase_name)
    model = phase.build_model(config.model.sit_kwargs(teacher.z_dims, "sdpa", config.alignment)).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = config.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    interpolant = Interpolant(config.diffusion.path_type)
    weight = config.alignment.weight

    def step(i: int, timer: RegionTimer | None) -> torch.Tensor:
        mark = timer.region if timer is not None else (lambda _name: None)
        if timer is not None:
            timer.start()
        mark("data")
        batch = copy_batch()  # the reference copies in the step
        mark("encoder")
        feats = [enc(batch["images"].float(), with_cls=phase.class_token) for enc in teacher.encoders] \
            if phase.aligns else None
        mark("forward")
        with autocast_context("fp16", device):
            loss = _reference_loss(model, phase_name, batch["latents"], batch["labels"], feats, interpolant, weight,
                                   config.reg.cls_weight)
        mark("backward")
        scaler.scale(loss).backward()
        mark("optimizer")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        mark("ema")
        _reference_ema(ema_model, model, o.ema_decay)
        if timer is not None:
            timer.stop()
        return loss.detach()

    return BenchStep(step, "reference imitation: torch AdamW (default), fp16 + GradScaler, per-parameter EMA",
                     lambda: None)


def _bench_variant(s: TrainSettings, phase: str, batch: int, variant: tuple[str, bool, str], device: torch.device,
                   teacher: Any, host: dict[str, torch.Tensor]) -> dict[str, Any]:
    from erw_fast.data.device_prefetch import SideStreamStager

    label, compiled, attention = variant
    reference = label == "reference"
    config = bench_config(s, phase, batch, device, compiled, None if reference else attention)
    if not reference and attention == "measure":
        from erw_fast.models.attention_select import measured_backend_for_run

        attention = measured_backend_for_run(config.model.sit_kwargs(), batch, config.train.precision, device, 1,
                                             lambda line: print(line, file=sys.stderr))
        config = bench_config(s, phase, batch, device, compiled, attention)

    unread = ("images",) if phase in F.UNALIGNED else ()  # the trainer's loader reads no images there

    def copy_batch() -> dict[str, torch.Tensor]:
        return {k: t.to(device, non_blocking=True) for k, t in host.items() if k not in unread}

    torch.manual_seed(s.seed)
    if reference:
        built = reference_step(config, phase, teacher, device, copy_batch)
        precision = "fp16"
    else:
        # The trainer stages the next batch on a side stream (data.device_prefetch); the reference copies in the step.
        built = trainer_step(config, phase, teacher, device, SideStreamStager(copy_batch, device))
        precision = config.train.precision
    step = built.run
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(s.warmup):
        step(i, None)
    if cuda:
        torch.cuda.synchronize(device)
    timer = RegionTimer(device)
    monitor = GpuMonitor(device.index or 0) if cuda else None
    started = time.perf_counter()
    loss = torch.zeros(())
    with monitor if monitor is not None else contextlib.nullcontext():
        for i in range(s.warmup, s.warmup + s.steps):
            loss = step(i, timer)
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    per_step = timer.results()
    trace = _profile(step, s, device, f"{phase}_{label}_b{batch}") if s.profile_dir else None
    built.close()
    step_times = [sum(r.values()) for r in per_step]
    flop = F.step_flops(config, phase)["total"]
    median = statistics.median(step_times)
    peak = device_info(device)["peak_bf16_tflops"] if cuda else None
    achieved = flop / median / 1e12
    return {
        "phase": phase, "variant": label, "batch": batch, "status": "ok", "steps": s.steps,
        "precision": precision, "attention": attention, "engine": built.describe,
        "img_per_s": batch * s.steps / wall, "step_time_s": wall / s.steps, "step_time_median_s": median,
        "breakdown_median_s": {k: statistics.median(r.get(k, 0.0) for r in per_step) for k in REGIONS},
        "gflops_per_step": flop / 1e9, "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "final_loss": float(loss.float().cpu()),
        "gpu_telemetry": monitor.summary() if monitor is not None else gpu_telemetry_unavailable(device.type),
        "trace": trace,
        "raw": {"wall_s": wall, "step_times_s": step_times, "region_times_s": per_step},
    }


def _profile(step: Step, s: TrainSettings, device: torch.device, name: str) -> str:
    """A few more steps under torch.profiler, with the step regions as named ranges; returns the Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timer = RegionTimer(device, ranges=True, label=f"{name}/")
    with profile(activities=activities) as prof:
        for i in range(s.profile_steps):
            step(s.warmup + s.steps + i, timer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = Path(s.profile_dir) / f"trace_{_slug(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    return str(out)


def _host_batch(config: Config, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A synthetic batch in host memory (pinned on CUDA); each step copies it: the "data" region."""
    m = config.model
    g = torch.Generator().manual_seed(1234)
    size = config.data.image_size
    out = {"images": torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
           "latents": torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=g),
           "labels": torch.randint(0, m.num_classes, (batch,), generator=g)}
    return {k: v.pin_memory() for k, v in out.items()} if device.type == "cuda" else out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_train_benchmark(
    s: TrainSettings, on_result: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every (batch, phase, variant) once; returns the results document (device, versions, settings, results).

    Batches are the outer loop, so a run cut short still has both phases (the Phase-1 ratio) of the first
    batch; ``on_result(document so far)`` runs after every measurement (the CLI writes it to disk).
    """
    from erw_fast.encoders.teacher import Teacher, load_teacher

    device = resolve_device(s.device)
    for phase in s.phases:
        F.check_phase(phase)
    base = bench_config(s, s.phases[0], s.batches[0], device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = base.train.tf32
    teacher = Teacher()
    if any(p != "sit" for p in s.phases):  # loaded once (with a fixed seed, as the trainer does)
        aligned = bench_config(s, next(p for p in s.phases if p != "sit"), s.batches[0], device)
        teacher = load_teacher(aligned, device, aligned.model.num_tokens(), lambda line: print(line, file=sys.stderr))
    variants = _variants(s, base)
    header = _header(s, base, device, variants)
    results: list[dict[str, Any]] = []
    for batch in s.batches:
        host = _host_batch(base, batch, device)
        for phase in s.phases:
            for variant in variants:
                label = variant[0]
                try:
                    results.append(_bench_variant(s, phase, batch, variant, device, teacher, host))
                except torch.cuda.OutOfMemoryError:
                    results.append({"phase": phase, "variant": label, "batch": batch, "status": "oom"})
                except ValueError:  # bad input: the same for every variant, reported once
                    raise
                except Exception as error:  # e.g. a compile failure in one variant: recorded, the others still run
                    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
                    results.append({"phase": phase, "variant": label, "batch": batch,
                                    "status": f"error: {type(error).__name__}: {first}"})
                finally:
                    _free(device)
                r = results[-1]
                if r["status"] == "ok":
                    print(f"[{phase} {label} b={batch}] {r['img_per_s']:.1f} img/s, "
                          f"{r['step_time_median_s'] * 1e3:.1f} ms/step, {r['achieved_tflops']:.3f} TFLOP/s",
                          file=sys.stderr)
                else:
                    print(f"[{phase} {label} b={batch}] {r['status']}", file=sys.stderr)
                if on_result is not None:
                    on_result(_document(header, list(results)))  # a snapshot: results grows on
    return _document(header, results)


def _header(s: TrainSettings, base: Config, device: torch.device,
            variants: list[tuple[str, bool, str]]) -> dict[str, Any]:
    """The parts of the document that do not change during the run (the device probed once)."""
    return {
        "benchmark": "train",
        "device": device_info(device),
        "settings": {**asdict(s), "variants": [v[0] for v in variants], "model": base.model.name,
                     "precision_resolved": base.train.precision, "config_resolved": base.to_dict(),
                     "timed_function": "erw_fast.step.TrainStep.__call__ (what the trainer calls)",
                     "flop_convention": "analytic matmul FLOPs (erw_fast.flops, 2 per multiply-add), fwd+bwd of "
                                        "the trained parts + teacher forward; MFU against the dense bf16 peak",
                     "data_staging": "fast variants: the next batch copied on a side CUDA stream during the step "
                                     "(data.device_prefetch); reference: copied at the start of its step"},
    }


def _document(header: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    # versions() reads the loaded modules: libraries imported during the run (Triton, on first use) appear.
    return {**header, "versions": versions(), "results": results, "speedups": _speedups(results),
            "phase1_ratios": _phase1_ratios(results)}


def _speedups(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """img/s of each fast variant over the reference step, per (phase, batch), measured in the same run."""
    out = []
    ok = [r for r in results if r["status"] == "ok"]
    for ref in (r for r in ok if r["variant"] == "reference"):
        for fast in (r for r in ok if r["variant"] != "reference"):
            if (fast["phase"], fast["batch"]) == (ref["phase"], ref["batch"]):
                out.append({"phase": ref["phase"], "batch": ref["batch"], "variant": fast["variant"],
                            "reference_img_per_s": ref["img_per_s"], "img_per_s": fast["img_per_s"],
                            "speedup": fast["img_per_s"] / ref["img_per_s"]})
    return out


# Issue target: the warmup step may cost at most this much more than its share of the full step's FLOPs.
PHASE1_RATIO_TARGET = 1.15


def _phase1_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, batch): warmup step time / (warmup FLOPs / full FLOPs x full step time), from the medians.

    1.0 means Phase 1 costs exactly its FLOP share; overheads that do not shrink with the model (teacher, data,
    launch latency, optimizer over the embedders) push it above.
    """
    ok = {(r["phase"], r["variant"], r["batch"]): r for r in results if r["status"] == "ok"}
    out = []
    for (phase, variant, batch), warm in ok.items():
        full = ok.get(("full", variant, batch))
        if phase != "warmup" or full is None:
            continue
        share = warm["gflops_per_step"] / full["gflops_per_step"]
        ratio = warm["step_time_median_s"] / (share * full["step_time_median_s"])
        out.append({"variant": variant, "batch": batch, "flop_share": share,
                    "warmup_step_s": warm["step_time_median_s"], "full_step_s": full["step_time_median_s"],
                    "ratio": ratio, "target": PHASE1_RATIO_TARGET, "meets_target": ratio <= PHASE1_RATIO_TARGET})
    return out


def _telemetry_cells(t: dict[str, Any]) -> list[str]:
    """Median SM clock (with its share of the maximum) and median power of a timed case, or dashes."""
    clock, power = t.get("sm_clock_mhz"), t.get("power_w")
    ratio = f" ({t['clock_ratio'] * 100:.0f}%)" if t.get("clock_ratio") else ""
    return [f"{clock['median']:.0f}{ratio}" if clock else "-", f"{power['median']:.0f}" if power else "-"]


def render_train_markdown(doc: dict[str, Any]) -> str:
    dev = doc["device"]
    s = doc["settings"]
    lines = [
        f"# Training throughput: {s['model']} on {dev['name']} ({dev['type']})",
        "",
        f"torch {doc['versions']['torch']}, CUDA {doc['versions']['cuda']}; precision {s['precision_resolved']} "
        f"(reference: fp16 + GradScaler); {s['steps']} timed steps after {s['warmup']} untimed. Step-time regions "
        f"are medians (ms); peak: {dev['peak_bf16_tflops'] or 'n/a'} TFLOP/s. FLOPs: {s['flop_convention']}. "
        "SM MHz / W: medians sampled by NVML every 0.1 s during the timed steps (% of the maximum SM clock). "
        f"Data: {s.get('data_staging', 'copied in the step')}. Fast variants time "
        f"{s.get('timed_function', 'their own step')}.",
        "",
    ]
    header = ["phase", "variant", "batch", "img/s", "step ms", *REGIONS, "GFLOP/step", "TFLOP/s", "MFU", "peak GiB",
              "SM MHz", "W"]
    rows = []
    for r in doc["results"]:
        if r["status"] != "ok":
            rows.append([r["phase"], r["variant"], r["batch"], r["status"], *[""] * (len(header) - 4)])
            continue
        rows.append([
            r["phase"], r["variant"], r["batch"], f"{r['img_per_s']:.1f}", f"{r['step_time_median_s'] * 1e3:.1f}",
            *(f"{r['breakdown_median_s'][k] * 1e3:.2f}" for k in REGIONS), _gflop(r["gflops_per_step"]),
            f"{r['achieved_tflops']:.3f}", f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-",
            f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-",
            *_telemetry_cells(r.get("gpu_telemetry", {})),
        ])
    lines += [_md_table(header, rows), ""]
    if doc.get("phase1_ratios"):
        lines += ["## Phase 1 step time against its FLOP share of the full step", "",
                  "ratio = warmup step / (warmup FLOPs ÷ full FLOPs × full step); target ≤ "
                  f"{PHASE1_RATIO_TARGET}.", "",
                  _md_table(["variant", "batch", "FLOP share", "warmup ms", "full ms", "ratio", "target met"],
                            [[x["variant"], x["batch"], f"{x['flop_share']:.3f}", f"{x['warmup_step_s'] * 1e3:.1f}",
                              f"{x['full_step_s'] * 1e3:.1f}", f"{x['ratio']:.2f}",
                              "yes" if x["meets_target"] else "no"] for x in doc["phase1_ratios"]]), ""]
    if doc["speedups"]:
        lines += ["## Speed-up over the reference step (same run)", "",
                  _md_table(["phase", "batch", "variant", "reference img/s", "img/s", "speed-up"],
                            [[x["phase"], x["batch"], x["variant"], f"{x['reference_img_per_s']:.1f}",
                              f"{x['img_per_s']:.1f}", f"{x['speedup']:.2f}x"] for x in doc["speedups"]]), ""]
    return "\n".join(lines)


def train_figure(doc: dict[str, Any]) -> Any:
    """One horizontal bar per timed case: the median step split into its regions (ms), img/s and MFU beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in doc["results"] if r["status"] == "ok"]
    fig = Figure(figsize=(10, 1.2 + 0.45 * max(1, len(rows))), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(rows)))[::-1]  # first case on top
    left = [0.0] * len(rows)
    for i, region in enumerate(REGIONS):
        widths = [r["breakdown_median_s"][region] * 1e3 for r in rows]
        ax.barh(ys, widths, left=left, color=f"C{i}", label=region)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, r, end in zip(ys, rows, left, strict=True):
        mfu = f", MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
        ax.annotate(f" {r['img_per_s']:.0f} img/s{mfu}", (end, y), va="center", fontsize=8)
    ax.set_yticks(ys, [f"{r['phase']} {r['variant']} b={r['batch']}" for r in rows], fontsize=8)
    ax.set_xlabel("median step time (ms), by region")
    ax.set_xlim(0, max(left, default=1.0) * 1.35)  # room for the annotations
    dev = doc["device"]
    ax.set_title(f"{doc['settings']['model']} training step on {dev['name']}", fontsize=10)
    ax.legend(fontsize=8, ncol=len(REGIONS), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_train(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    train_figure(doc).savefig(path, format="png")
    return path
