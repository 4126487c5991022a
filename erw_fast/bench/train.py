"""``erw-bench train``: training throughput per phase (img/s, step-time regions, TFLOP/s, MFU, peak memory), the fast
step against the reference's way of running it, optionally profiled."""

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
from erw_fast.bench.common import Workload, _gflop, _md_table, _slug, device_info, resolve_device, versions
from erw_fast.bench.gpu_monitor import GpuMonitor, gpu_telemetry_unavailable

REGIONS = ("data", "encoder", "forward", "backward", "optimizer", "ema")


class RegionTimer:
    """Region boundaries inside each step: CUDA events on GPU (read after one sync at the end, so timing never
    serialises the step), perf_counter on CPU (where every op is synchronous anyway).

    The regions also appear as named ranges in profiler traces (``record_function``) and in Nsight Systems (NVTX)
    when ``ranges`` is on: a mark closes the current region's range and opens the next one's (REGIONS order)."""

    def __init__(self, device: torch.device, ranges: bool = False, label: str = "") -> None:
        self.cuda = device.type == "cuda"
        self.ranges = ranges
        self.label = label
        self.steps: list[list[tuple[str, Any]]] = []
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
        self.steps.append([("start", self._now())])
        self._push("step")
        self._push(REGIONS[0])

    def mark(self, region: str) -> None:
        self.steps[-1].append((region, self._now()))
        self._pop()
        following = REGIONS.index(region) + 1
        if following < len(REGIONS):
            self._push(REGIONS[following])
        else:
            self._pop()  # the step range

    def results(self) -> list[dict[str, float]]:
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for marks in self.steps:
            regions: dict[str, float] = {}
            for (_, a), (name, b) in zip(marks, marks[1:], strict=False):
                regions[name] = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out.append(regions)
        return out


@dataclass
class TrainSettings:
    work: Workload = field(default_factory=Workload)
    phases: list[str] = field(default_factory=lambda: ["warmup", "full"])
    batches: list[int] = field(default_factory=lambda: [32])
    steps: int = 20
    warmup: int = 5
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: str = "off"  # off | on | both
    compile_scope: str = "blocks"  # blocks (regional) | model
    compile_mode: str = "default"
    profile_dir: str | None = None  # write a Chrome trace of a few profiled steps per measurement here
    profile_steps: int = 3
    attn_backends: list[str] = field(default_factory=lambda: ["sdpa"])  # one or more: each is its own variant
    alignment_backend: str = "auto"
    reference_step: bool = False
    lr: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    alignment_weight: float = 0.5
    seed: int = 0


def _variants(s: TrainSettings) -> list[str]:
    """Variant labels: fast (eager / compiled), per attention backend when several are swept, and reference."""
    fast = {"off": ["fast"], "on": ["fast+compile"], "both": ["fast", "fast+compile"]}[s.compile]
    if len(s.attn_backends) > 1:
        fast = [f"{v}@{backend}" for backend in s.attn_backends for v in fast]
    return fast + (["reference"] if s.reference_step else [])


def _variant_backend(s: TrainSettings, variant: str) -> str:
    """The attention backend a variant runs: the reference uses plain SDPA, as the reference code does."""
    if variant == "reference":
        return "sdpa"
    return variant.split("@", 1)[1] if "@" in variant else s.attn_backends[0]


def _build_model(phase: str, work: Workload, attn_backend: str, z_dims: Sequence[int]) -> torch.nn.Module:
    from erw_fast.models import build_sit, build_sit_phase1

    kwargs = dict(work.overrides(), num_classes=work.num_classes, projector_dim=work.projector_dim,
                  attn_backend=attn_backend, z_dims=list(z_dims) if phase != "sit" else [])
    if phase == "warmup":
        return build_sit_phase1(work.model, work.warmup_blocks(), **kwargs)
    return build_sit(work.model, encoder_depth=work.alignment_depth(), **kwargs)


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


def _precision(s: TrainSettings, device: torch.device) -> str:
    if s.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return s.precision


def _autocast(precision: str, device: torch.device) -> Any:
    from erw_fast.runtime import autocast_context

    return autocast_context(precision, device)


def _bench_variant(
    s: TrainSettings, phase: str, batch: int, variant: str, device: torch.device, encoders: list[Any],
    host: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    from erw_fast.data.device_prefetch import SideStreamStager
    from erw_fast.ema import EMA
    from erw_fast.objectives import AlignmentObjective, Interpolant, diffusion_loss, phase1_loss

    work = s.work
    reference = variant == "reference"
    aligns = phase != "sit"
    z_dims = work.z_dims()
    torch.manual_seed(s.seed)
    attention = _variant_backend(s, variant)
    model = _build_model(phase, work, attention, z_dims).to(device).train()
    if variant.split("@")[0] == "fast+compile":
        from erw_fast.compile import compile_model

        train_model = compile_model(model, s.compile_scope, s.compile_mode)
    else:
        train_model = model
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    if reference:  # torch's default AdamW (foreach on CUDA), fp16 autocast + GradScaler, per-parameter EMA
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
        precision = "fp16"
        ema_model = copy.deepcopy(model).eval().requires_grad_(False)

        def ema_update() -> None:
            _reference_ema(ema_model, model, s.ema_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0, fused=cuda or None,
                                      foreach=None if cuda else True)
        precision = _precision(s, device)
        ema = EMA(model, s.ema_decay)
        ema_update = ema.update
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    interpolant = Interpolant("linear")
    alignment = AlignmentObjective(work.objective, negatives=work.negatives, backend=s.alignment_backend)

    def copy_batch() -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device, non_blocking=True) for t in host)

    # The trainer stages the next batch on a side stream (data.device_prefetch); the reference copies in the step.
    batches = iter(copy_batch, None) if reference else SideStreamStager(copy_batch, device)

    def step(timer: RegionTimer | None) -> torch.Tensor:
        mark = timer.mark if timer is not None else (lambda _name: None)
        if timer is not None:
            timer.start()
        images, latents, labels = next(batches)
        mark("data")
        feats = None
        if aligns:
            if reference:  # the teacher in fp32, outside autocast
                feats = [enc(images) for enc in encoders]
            else:
                with _autocast(precision, device):
                    feats = [enc(images) for enc in encoders]
        mark("encoder")
        with _autocast(precision, device):
            if reference:
                loss = _reference_loss(train_model, phase, latents, labels, feats, interpolant, s.alignment_weight)
            elif phase == "warmup":
                loss = phase1_loss(train_model, latents, labels, feats, alignment)
            else:
                loss = diffusion_loss(train_model, latents, labels, interpolant, encoder_features=feats,
                                      alignment=alignment if aligns else None,
                                      alignment_weight=s.alignment_weight).loss
        mark("forward")
        scaler.scale(loss).backward()
        mark("backward")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        ema_update()
        mark("ema")
        return loss.detach()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(s.warmup):
        step(None)
    if cuda:
        torch.cuda.synchronize(device)
    timer = RegionTimer(device)
    monitor = GpuMonitor(device.index or 0) if cuda else None
    started = time.perf_counter()
    loss = torch.zeros(())
    with monitor if monitor is not None else contextlib.nullcontext():
        for _ in range(s.steps):
            loss = step(timer)
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    per_step = timer.results()
    trace = _profile(step, s, device, f"{phase}_{variant}_b{batch}") if s.profile_dir else None
    step_times = [sum(r.values()) for r in per_step]
    flop = work.step_breakdown(phase, batch).training()
    median = statistics.median(step_times)
    peak = device_info(device)["peak_bf16_tflops"] if cuda else None
    achieved = flop / median / 1e12
    result = {
        "phase": phase, "variant": variant, "batch": batch, "status": "ok", "steps": s.steps,
        "precision": precision, "attention": attention,
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
    return result


def _profile(step: Any, s: TrainSettings, device: torch.device, name: str) -> str:
    """A few more steps under torch.profiler, with the step regions as named ranges; returns the Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    timer = RegionTimer(device, ranges=True, label=f"{name}/")
    with profile(activities=activities) as prof:
        for _ in range(s.profile_steps):
            step(timer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = Path(s.profile_dir) / f"trace_{_slug(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    return str(out)


def _reference_loss(
    model: torch.nn.Module, phase: str, latents: torch.Tensor, labels: torch.Tensor,
    feats: list[torch.Tensor] | None, interpolant: Any, weight: float,
) -> torch.Tensor:
    """The reference's loss computation: per-sample loop for the projection loss, MSE in the autocast dtype."""
    if phase == "warmup":
        zs = model(latents, torch.zeros(latents.shape[0], device=latents.device), labels)
        return _reference_cosine_loop(zs, feats)
    t = torch.rand(latents.shape[0], device=latents.device)
    noise = torch.randn_like(latents)
    x_t, target = interpolant.interpolate(latents, noise, t)
    out, zs = model(x_t, t, labels)
    loss = ((out - target) ** 2).mean(dim=(1, 2, 3)).mean()
    if feats is not None:
        loss = loss + weight * _reference_cosine_loop(zs, feats)
    return loss


def _host_batch(work: Workload, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A synthetic batch in host memory (pinned on CUDA); each step copies it: the "data" region."""
    g = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (batch, 3, work.resolution, work.resolution), generator=g, dtype=torch.uint8)
    latents = torch.randn(batch, work.in_channels, work.input_size, work.input_size, generator=g)
    labels = torch.randint(0, work.num_classes, (batch,), generator=g)
    if device.type == "cuda":
        images, latents, labels = images.pin_memory(), latents.pin_memory(), labels.pin_memory()
    return images, latents, labels


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
    from erw_fast.encoders import check_token_count, load_encoders

    device = resolve_device(s.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for phase in s.phases:
        F.check_phase(phase)
    work = s.work
    encoders: list[Any] = []
    if any(p != "sit" for p in s.phases):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed + 7919)
            encoders = load_encoders(work.encoders, resolution=work.resolution, pretrained=False, device=device)
        for enc in encoders:
            check_token_count(enc.num_patches(), work.shape().tokens, enc.name)
    header = _header(s, device)
    results: list[dict[str, Any]] = []
    for batch in s.batches:
        host = _host_batch(work, batch, device)
        for phase in s.phases:
            for variant in _variants(s):
                try:
                    results.append(_bench_variant(s, phase, batch, variant, device, encoders, host))
                except torch.cuda.OutOfMemoryError:
                    results.append({"phase": phase, "variant": variant, "batch": batch, "status": "oom"})
                finally:
                    _free(device)
                r = results[-1]
                if r["status"] == "ok":
                    print(f"[{phase} {variant} b={batch}] {r['img_per_s']:.1f} img/s, "
                          f"{r['step_time_median_s'] * 1e3:.1f} ms/step, {r['achieved_tflops']:.3f} TFLOP/s",
                          file=sys.stderr)
                else:
                    print(f"[{phase} {variant} b={batch}] {r['status']}", file=sys.stderr)
                if on_result is not None:
                    on_result(_document(header, list(results)))  # a snapshot: results grows on
    return _document(header, results)


def _header(s: TrainSettings, device: torch.device) -> dict[str, Any]:
    """The parts of the document that do not change during the run (the device probed once)."""
    return {
        "benchmark": "train",
        "device": device_info(device),
        "settings": {**asdict(s), "variants": _variants(s), "precision_resolved": _precision(s, device),
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
    w = s["work"]
    lines = [
        f"# Training throughput: {w['model']} on {dev['name']} ({dev['type']})",
        "",
        f"torch {doc['versions']['torch']}, CUDA {doc['versions']['cuda']}; precision {s['precision_resolved']} "
        f"(reference: fp16 + GradScaler); {s['steps']} timed steps after {s['warmup']} untimed. Step-time regions "
        f"are medians (ms); peak: {dev['peak_bf16_tflops'] or 'n/a'} TFLOP/s. FLOPs: {s['flop_convention']}. "
        "SM MHz / W: medians sampled by NVML every 0.1 s during the timed steps (% of the maximum SM clock). "
        f"Data: {s.get('data_staging', 'copied in the step')}.",
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
    dev, w = doc["device"], doc["settings"]["work"]
    ax.set_title(f"{w['model']} training step on {dev['name']}", fontsize=10)
    ax.legend(fontsize=8, ncol=len(REGIONS), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_train(doc: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    train_figure(doc).savefig(path, format="png")
    return path
