"""``erw-bench``: the ERW cost analysis (analytic FLOPs per phase and per budget split) and a training-throughput
benchmark (img/s, step-time breakdown, TFLOP/s, MFU, peak memory), optionally against the reference's way of
running the same step.

    erw-bench cost                                   # ERW Fig. 4: SiT-XL/2, batch 256, DINOv2-B, 100K budget
    erw-bench cost --measure --model SiT-S/2 --input-size 8 --depth 2 --hidden 64 --heads 2 \\
        --encoder demo-vit-t --resolution 64 --batch 4     # + timed steps per phase on this device
    erw-bench train --model SiT-XL/2 --batch 32 64 --compile both --reference-step

FLOPs are analytic (``erw_fast.flops``: 2 FLOPs per multiply-add, matmul FLOPs only). Timings are measured on the
device the command runs on and written with its name; on CPU no MFU is reported.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from erw_fast import flops as F

DEFAULT_OUT = Path("benchmarks/results")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. First match wins, so the
# more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("H100 80GB HBM3")
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for a GPU name ('NVIDIA H100 80GB HBM3' → 989), None when unknown (or a CPU)."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if pattern.lower() in device_name.lower():
            return peak
    return None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    return device


def gpu_name(device: torch.device) -> str:
    """The GPU's marketing name: NVML when importable (reports SXM vs PCIe reliably), else torch's."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        name = pynvml.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # no pynvml, no driver access, or a MIG slice: torch's name is good enough
        return torch.cuda.get_device_name(device)


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = gpu_name(device)
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": name, "peak_bf16_tflops": peak_bf16_tflops(name),
                "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
                "count": torch.cuda.device_count()}
    return {"type": device.type, "name": _cpu_name(), "peak_bf16_tflops": None, "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:  # Linux names the model here; platform.processor() is often just the architecture
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda, "platform": platform.platform()}
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    for module in ("timm", "triton", "flash_attn"):
        mod = sys.modules.get(module)
        out[module] = getattr(mod, "__version__", None) if mod is not None else None
    return out


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _gflop(value: float) -> str:
    """GFLOP with three significant digits for tiny configurations, thousands separators for real ones."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}" if value else "0"


def _pct(value: float) -> str:
    return f"{value * 100:+.1f}%"


# ==========================================================================================================
# Shared model / workload description
# ==========================================================================================================


@dataclass
class Workload:
    """What one step computes: the SiT (name + overrides), the teacher(s), the alignment loss."""

    model: str = "SiT-XL/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    depth: int | None = None
    hidden: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    projector_dim: int = 2048
    encoders: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    resolution: int = 256
    warmup_depth: int | None = None  # None: min(4, depth), the ERW preset
    encoder_depth: int | None = None  # None: min(8, depth), REPA's
    objective: str = "cosine"
    negatives: str = "batch"

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"input_size": self.input_size, "in_channels": self.in_channels}
        for key, name in (("depth", "depth"), ("hidden", "hidden_size"), ("heads", "num_heads"),
                          ("patch_size", "patch_size")):
            if getattr(self, key) is not None:
                out[name] = getattr(self, key)
        return out

    def shape(self) -> F.SiTShape:
        return F.SiTShape.resolve(self.model, **self.overrides())

    def z_dims(self) -> list[int]:
        from erw_fast.encoders import get_encoder_spec

        return [get_encoder_spec(e).embed_dim for e in self.encoders]

    def alignment_depth(self) -> int:
        return self.encoder_depth or min(8, self.shape().depth)

    def warmup_blocks(self) -> int:
        return self.warmup_depth or min(4, self.shape().depth)

    def step_breakdown(self, phase: str, batch: int) -> F.FlopBreakdown:
        return F.step_breakdown(
            self.model, phase, batch, encoders=self.encoders, resolution=self.resolution,
            warmup_depth=self.warmup_blocks(), projector_dim=self.projector_dim, objective=self.objective,
            negatives=self.negatives, **self.overrides(),
        )

    def is_paper_setting(self, batch: int) -> bool:
        """The ERW paper's cost figure: SiT-XL/2 at 256 px, batch 256, DINOv2-B, L = 4, P = 2048."""
        s = self.shape()
        return (s == F.SiTShape.resolve("SiT-XL/2") and batch == F.PAPER_BATCH and self.encoders == ["dinov2-vit-b"]
                and self.resolution == 256 and self.projector_dim == 2048 and self.warmup_blocks() == 4
                and self.objective == "cosine")


def _add_workload_args(p: argparse.ArgumentParser, batch_default: int | None) -> None:
    g = p.add_argument_group("model and teacher")
    g.add_argument("--model", default="SiT-XL/2", help="SiT-{S,B,L,XL}/{2,4,8}")
    g.add_argument("--input-size", type=int, default=32, help="latent side (32 for 256 px)")
    g.add_argument("--in-channels", type=int, default=4)
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--depth", type=int, default=None, help="override the named depth")
    g.add_argument("--hidden", type=int, default=None, help="override the hidden size")
    g.add_argument("--heads", type=int, default=None, help="override the number of heads")
    g.add_argument("--patch-size", type=int, default=None)
    g.add_argument("--projector-dim", type=int, default=2048)
    g.add_argument("--encoder", default="dinov2-vit-b", help="teacher encoder(s), comma-separated")
    g.add_argument("--resolution", "--encoder-resolution", dest="resolution", type=int, default=256,
                   help="image side the teacher sees (before its own resize)")
    g.add_argument("--warmup-depth", type=int, default=None, help="ERW Phase-1 blocks L (default min(4, depth))")
    g.add_argument("--encoder-depth", type=int, default=None, help="alignment depth in the full phase")
    g.add_argument("--objective", choices=("cosine", "nt_xent"), default="cosine")
    g.add_argument("--negatives", choices=("batch", "position"), default="batch")
    if batch_default is not None:
        g.add_argument("--batch", type=int, default=batch_default, help="images per step")


def _workload(args: argparse.Namespace) -> Workload:
    from erw_fast.encoders import parse_encoder_names

    return Workload(
        model=args.model, input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes,
        depth=args.depth, hidden=args.hidden, heads=args.heads, patch_size=args.patch_size,
        projector_dim=args.projector_dim, encoders=parse_encoder_names(args.encoder), resolution=args.resolution,
        warmup_depth=args.warmup_depth, encoder_depth=args.encoder_depth, objective=args.objective,
        negatives=args.negatives,
    )


# ==========================================================================================================
# erw-bench cost
# ==========================================================================================================


def reconstruct_paper(batch: int = F.PAPER_BATCH) -> dict[str, Any]:
    """Which counting convention reproduces the paper's 42.2K / 224.8K GFLOPs per step? A small, fixed grid of
    conventions for SiT-XL/2 + DINOv2-B at 256 px, scored by the worse of the two relative errors.

    Axes: unit (FLOPs or multiply-adds), training multiplier (1: forward only, 3: forward + backward), whether the
    teacher forward is counted, the number of warmed blocks L (1-8), projector in the full phase or not, and
    whether the full-phase number adds the warmup number (two models counted side by side).
    """
    sit = F.sit_flops("SiT-XL/2", phase="sit").forward() / 1e9
    sit_proj = F.sit_flops("SiT-XL/2", phase="full").forward() / 1e9
    enc = F.encoder_flops("dinov2-vit-b").forward() / 1e9
    warm = {depth: F.sit_flops("SiT-XL/2", phase="warmup", warmup_depth=depth).forward() / 1e9
            for depth in range(1, 9)}
    paper_w, paper_f = F.PAPER_GFLOPS_PER_STEP["warmup"] / batch, F.PAPER_GFLOPS_PER_STEP["full"] / batch
    fits = []
    for unit_name, unit in (("FLOPs", 1.0), ("MACs", 0.5)):
        for mult in (1, 3):
            for enc_count in (0, 1):
                for depth, w_fwd in warm.items():
                    for full_proj in (True, False):
                        for full_adds_warmup in (False, True):
                            w = unit * (mult * w_fwd + enc_count * enc)
                            f = unit * (mult * (sit_proj if full_proj else sit) + enc_count * enc)
                            f = f + w if full_adds_warmup else f
                            err = max(F.relative_error(w, paper_w), F.relative_error(f, paper_f))
                            fits.append({
                                "unit": unit_name, "train_multiplier": mult, "encoder_forward": bool(enc_count),
                                "warmup_depth": depth, "full_includes_projector": full_proj,
                                "full_adds_warmup": full_adds_warmup, "warmup_gflops_per_step": w * batch,
                                "full_gflops_per_step": f * batch, "warmup_error": (w - paper_w) / paper_w,
                                "full_error": (f - paper_f) / paper_f, "max_abs_error": err,
                            })
    fits.sort(key=lambda r: r["max_abs_error"])
    # the closest any convention other than "FLOPs, forward + backward" gets
    others = [r for r in fits if (r["unit"], r["train_multiplier"]) != ("FLOPs", 3)]
    return {
        "per_image_gflops": {"sit_xl2_forward_no_projector": sit, "sit_xl2_forward_with_projector": sit_proj,
                             "dinov2_b_forward_224px": enc, "warmup_forward_by_depth": warm},
        "paper_per_image_gflops": {"warmup": paper_w, "full": paper_f, "full_minus_warmup": paper_f - paper_w},
        "candidates_tried": len(fits),
        "best": fits[:5],
        "best_other_unit_or_multiplier": others[0],
    }


def _cost_rows(work: Workload, batch: int) -> tuple[dict[str, F.FlopBreakdown], dict[str, float]]:
    phases = {"warmup": work.step_breakdown("warmup", batch), "full": work.step_breakdown("full", batch),
              "repa": work.step_breakdown("repa", batch), "sit": work.step_breakdown("sit", batch)}
    per_step = {k: v.training() for k, v in phases.items()}
    return phases, per_step


def _component_groups(b: F.FlopBreakdown) -> dict[str, float]:
    """Training FLOPs grouped for the table: SiT embedders / blocks / final layer, projector, encoder, loss."""
    groups = {"embedders": "sit.embed", "blocks": "sit.blocks", "final layer": "sit.final_layer",
              "projector": "projector", "encoder (fwd)": "encoder", "alignment": "alignment"}
    return {name: b.select(prefix).training() for name, prefix in groups.items()}


def cost_analysis(work: Workload, batch: int, splits: Sequence[F.BudgetSplit] = F.DEFAULT_SPLITS) -> dict[str, Any]:
    phases, per_step = _cost_rows(work, batch)
    paper = work.is_paper_setting(batch)
    rows = F.split_totals(per_step, splits)
    if paper:
        paper_rows = F.split_totals({k: v * 1e9 for k, v in F.PAPER_GFLOPS_PER_STEP.items()}, splits)
        for row, ref in zip(rows, paper_rows, strict=True):
            row["paper_total_flops"] = ref["total_flops"]
    result: dict[str, Any] = {
        "benchmark": "cost",
        "device": "analytic",
        "convention": "FLOPs = 2 per multiply-add; matmul/conv/attention FLOPs (what FlopCounterMode counts); "
                      "training = forward + backward (2x forward, 1x where the input needs no gradient) of "
                      "the trained parts + forward of the frozen teacher; elementwise estimates reported apart",
        "settings": {**asdict(work), "batch": batch, "alignment_depth": work.alignment_depth(),
                     "warmup_blocks": work.warmup_blocks(),
                     "shape": asdict(work.shape())},
        "per_step": {
            k: {"gflops": v / 1e9, "gflops_with_elementwise": phases[k].training(True) / 1e9,
                "forward_gflops": phases[k].forward() / 1e9,
                "groups_gflops": {g: x / 1e9 for g, x in _component_groups(phases[k]).items()},
                "breakdown": phases[k].to_dict()}
            for k, v in per_step.items()
        },
        "warmup_over_full": per_step["warmup"] / per_step["full"],
        "dit_gmacs_per_image": F.sit_flops(work.model, phase="sit", **work.overrides()).dit_gflops(),
        "splits": rows,
        "paper": None,
    }
    if paper:
        result["paper"] = {
            "gflops_per_step": F.PAPER_GFLOPS_PER_STEP,
            "delta": {k: per_step[k] / 1e9 / v - 1 for k, v in F.PAPER_GFLOPS_PER_STEP.items()},
            "reconstruction": reconstruct_paper(batch),
        }
    return result


def _explain_deltas(res: dict[str, Any]) -> list[str]:
    """The paragraph under the table: every delta to the paper, with the arithmetic."""
    p = res["paper"]
    rec = p["reconstruction"]
    img = rec["per_image_gflops"]
    ours = res["per_step"]
    best = rec["best"][0]
    full_minus = rec["paper_per_image_gflops"]["full_minus_warmup"]
    lines = [
        "### Reconstruction of the paper's numbers (a hypothesis: only the arithmetic is shown)",
        "",
        f"Per image, the paper's numbers are {rec['paper_per_image_gflops']['warmup']:.2f} (warmup) and "
        f"{rec['paper_per_image_gflops']['full']:.2f} (full) GFLOPs (÷ 256).",
        "",
        f"- Ours: warmup = 3 × {img['warmup_forward_by_depth'][4]:.2f} (embedders + 4 blocks + projector, "
        f"fwd+bwd) + {img['dinov2_b_forward_224px']:.2f} (DINOv2-B fwd at 224 px, 257 tokens) ≈ "
        f"{ours['warmup']['gflops'] / 256:.2f}/image = {ours['warmup']['gflops'] / 1e3:.1f}K per step "
        f"({_pct(p['delta']['warmup'])} vs the paper); full = 3 × {img['sit_xl2_forward_with_projector']:.2f} "
        f"(SiT-XL/2 + projector) + {img['dinov2_b_forward_224px']:.2f} ≈ {ours['full']['gflops'] / 256:.2f}/image "
        f"= {ours['full']['gflops'] / 1e3:.1f}K ({_pct(p['delta']['full'])}).",
        f"- The paper's full − warmup = {full_minus:.2f} GFLOPs/image ≈ 3 × {img['sit_xl2_forward_no_projector']:.2f}"
        f" = {3 * img['sit_xl2_forward_no_projector']:.2f} (fwd+bwd of the whole SiT-XL/2 without projector, "
        f"{_pct(full_minus / (3 * img['sit_xl2_forward_no_projector']) - 1)}). In a single-model count the "
        f"difference would be only the 24 late blocks + final layer "
        f"(3 × {img['sit_xl2_forward_with_projector'] - img['warmup_forward_by_depth'][4]:.2f} = "
        f"{3 * (img['sit_xl2_forward_with_projector'] - img['warmup_forward_by_depth'][4]):.2f}), so the paper's "
        "full-phase number is consistent with *the warmup step's count plus a whole SiT-XL/2 training step* "
        "(two models counted side by side).",
        f"- Best fit of {rec['candidates_tried']} conventions tried: unit {best['unit']}, ×{best['train_multiplier']}"
        f" (fwd+bwd), teacher forward {'counted' if best['encoder_forward'] else 'not counted'}, warmup region "
        f"L = {best['warmup_depth']} blocks + embedders + projector, full = "
        f"{'warmup + ' if best['full_adds_warmup'] else ''}SiT-XL/2 "
        f"{'with' if best['full_includes_projector'] else 'without'} projector: "
        f"{best['warmup_gflops_per_step'] / 1e3:.2f}K / {best['full_gflops_per_step'] / 1e3:.2f}K "
        f"({_pct(best['warmup_error'])} / {_pct(best['full_error'])}).",
        f"- That fit needs L = {best['warmup_depth']} (this repository's SiT-XL/2 preset, configs/erw_sit_xl2.yaml, "
        "warms L = 4) and leaves the teacher out; with L = 4 and the teacher forward counted the warmup is "
        f"{_pct(p['delta']['warmup'])} off. This is inferred from the two numbers alone: which convention the "
        "authors used is not established here. What the arithmetic does support: 2 FLOPs per multiply-add and "
        "backward = 2 × forward; every multiply-add or forward-only convention in the grid misses at least one "
        f"of the two numbers by {rec['best_other_unit_or_multiplier']['max_abs_error'] * 100:.0f}% or more.",
        "- Elementwise work (norms, softmax, GELU, modulation) adds "
        f"{(ours['full']['gflops_with_elementwise'] / ours['full']['gflops'] - 1) * 100:.2f}% and cannot explain "
        "the gap.",
    ]
    return lines


def render_cost_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    per = res["per_step"]
    paper = res["paper"]
    shape = s["shape"]
    out = [
        f"# ERW cost analysis: {s['model']} (depth {shape['depth']}, width {shape['hidden_size']}, "
        f"{F.SiTShape(**shape).tokens} tokens), batch {s['batch']}, teacher {', '.join(s['encoders'])} @ "
        f"{s['resolution']} px",
        "",
        f"Device: analytic (nothing timed). {res['convention']}.",
        f"Warmup: embedders + first L = {s['warmup_blocks']} blocks + projector (P = {s['projector_dim']}); full / "
        f"REPA: the whole SiT + projector; both add the teacher forward. SiT forward without projector: "
        f"{res['dit_gmacs_per_image']:.2f} G multiply-adds per image (DiT's \"Gflops\" unit).",
        "",
        "## GFLOPs per step",
        "",
    ]
    header = ["phase", "ours (GFLOPs)", "with elementwise", "forward only"]
    if paper:
        header += ["paper", "delta"]
    rows = []
    for k in ("warmup", "full", "repa", "sit"):
        row = [k, _gflop(per[k]["gflops"]), _gflop(per[k]["gflops_with_elementwise"]),
               _gflop(per[k]["forward_gflops"])]
        if paper:
            ref = paper["gflops_per_step"].get(k)
            row += [f"{ref:,.0f}" if ref else "-", _pct(paper["delta"][k]) if ref else "-"]
        rows.append(row)
    out += [_md_table(header, rows), "", f"warmup / full = {res['warmup_over_full']:.3f}", ""]
    groups = list(per["full"]["groups_gflops"])
    out += ["## Where the FLOPs go (training GFLOPs per step)", "",
            _md_table(["phase", *groups],
                      [[k, *(_gflop(per[k]["groups_gflops"][g]) for g in groups)] for k in ("warmup", "full")]),
            ""]
    header = ["split (warmup+full)", "warmup steps", "full steps", "ours (GFLOPs)"]
    if paper:
        header += ["paper per-step × steps", "delta"]
    rows = []
    for r in res["splits"]:
        row = [r["label"], f"{r['warmup_steps']:,}", f"{r['full_steps']:,}", f"{r['total_flops'] / 1e9:.3e}"]
        if paper:
            row += [f"{r['paper_total_flops'] / 1e9:.3e}", _pct(r["total_flops"] / r["paper_total_flops"] - 1)]
        rows.append(row)
    out += ["## Budget splits", "", _md_table(header, rows), ""]
    if paper:
        out += ["The paper column multiplies the paper's per-step numbers by the step counts (it is not read off the "
                "figure).", "", *_explain_deltas(res), ""]
    measured = res.get("measured")
    if measured:
        out += [f"## Measured on {measured['device']['name']} ({measured['device']['type']})", "",
                f"Batch {measured['batch']}, {measured['steps']} timed steps per phase after {measured['warmup']} "
                "untimed; seconds are medians per step.", ""]
        out += [_md_table(["phase", "GFLOP/step", "s/step", "img/s", "TFLOP/s"],
                          [[r["phase"], _gflop(r["gflops_per_step"]), f"{r['step_time_s']:.4f}",
                            f"{r['img_per_s']:.1f}", f"{r['achieved_tflops']:.3f}"] for r in measured["phases"]]), ""]
        out += [f"Projected time per split at batch {s['batch']} on this one device, assuming time linear in the "
                "batch:", ""]
        out += [_md_table(["split", "projected time (s)"],
                          [[r["label"], f"{r['seconds']:,.0f}"] for r in measured["splits"]]), ""]
    return "\n".join(out)


def plot_cost(res: dict[str, Any], path: Path) -> Path:
    """Stacked warmup / full bars per split (like the paper's figure); the paper's per-step-derived totals as
    outlined bars beside ours when the settings match."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = res["splits"]
    fig = Figure(figsize=(9, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(rows)))
    paper = res["paper"] is not None
    width = 0.38 if paper else 0.6
    scale = 1e18  # bars in EFLOP (10^9 GFLOPs)
    warm = [r["warmup_flops"] / scale for r in rows]
    full = [r["full_flops"] / scale for r in rows]
    left = [x - width / 2 for x in xs] if paper else xs
    ax.bar(left, warm, width, color="C0", label="warmup (Phase 1), ours")
    ax.bar(left, full, width, bottom=warm, color="C1", label="full (Phase 2), ours")
    if paper:
        pw, pf = F.PAPER_GFLOPS_PER_STEP["warmup"], F.PAPER_GFLOPS_PER_STEP["full"]
        pwarm = [r["warmup_steps"] * pw / 1e9 for r in rows]  # paper numbers are GFLOPs per step
        pfull = [r["full_steps"] * pf / 1e9 for r in rows]
        right = [x + width / 2 for x in xs]
        ax.bar(right, pwarm, width, color="none", edgecolor="C0", hatch="//", label="warmup, paper per-step")
        ax.bar(right, pfull, width, bottom=pwarm, color="none", edgecolor="C1", hatch="\\\\",
               label="full, paper per-step")
    for x, w, f in zip(left, warm, full, strict=True):
        ax.annotate(f"{w + f:.1f}", (x, w + f), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs, [r["label"] for r in rows], fontsize=8)
    ax.set_ylabel("training compute (EFLOP = 10⁹ GFLOP)")
    tops = [w + f for w, f in zip(warm, full, strict=True)]
    if paper:
        tops += [w + f for w, f in zip(pwarm, pfull, strict=True)]
    ax.set_ylim(0, max(tops) * 1.3)  # headroom for the legend
    s = res["settings"]
    ax.set_title(f"ERW cost: {s['model']}, batch {s['batch']}, {', '.join(s['encoders'])} (analytic)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _parse_splits(text: str | None) -> tuple[F.BudgetSplit, ...]:
    if not text:
        return F.DEFAULT_SPLITS
    splits = []
    for item in text.split(","):
        warm, sep, full = item.strip().partition("+")
        if not sep:
            raise argparse.ArgumentTypeError(f"split {item!r} is not of the form WARMUP+FULL (steps)")
        w, f = int(float(warm)), int(float(full))
        splits.append(F.BudgetSplit(f"{w // 1000}K+{f // 1000}K" if w % 1000 == f % 1000 == 0 else f"{w}+{f}", w, f))
    return tuple(splits)


def cmd_cost(args: argparse.Namespace) -> int:
    work = _workload(args)
    res = cost_analysis(work, args.batch, _parse_splits(args.splits))
    if args.measure:
        res["measured"] = measure_phases(work, args)
    out = Path(args.out)
    md = render_cost_markdown(res)
    (out / f"{args.name}.md").parent.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(md + "\n")
    for k in res["per_step"]:  # the component dump is long; keep the JSON readable
        res["per_step"][k]["breakdown"] = res["per_step"][k]["breakdown"]["components"]
    _write_json(out / f"{args.name}.json", res)
    plot_cost(res, out / f"{args.name}.png")
    print(md)
    print(f"\nwrote {out / args.name}.{{md,json,png}}")
    return 0


def guard_cpu(work: Workload, phases: Sequence[str], batches: Sequence[int], device: torch.device,
              limit: float) -> None:
    """Refuse real-size configurations on CPU: one SiT-XL/2 step there takes many minutes."""
    if device.type != "cpu":
        return
    worst = max(work.step_breakdown(p, b).training() for p in phases for b in batches)
    if worst > limit:
        raise ValueError(
            f"on CPU one step of this configuration is {worst / 1e12:.1f} TFLOP, too slow here (limit "
            f"{limit / 1e12:.1f} TFLOP, --cpu-flop-limit); pick a tiny configuration (--depth/--hidden/--heads/"
            "--input-size, --encoder demo-vit-t --resolution 64) or run on a GPU"
        )


def measure_phases(work: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Timed steps of the warmup and full phases on this device, projected onto the budget splits.

    The projection assumes one device and time linear in the batch: seconds per image at the measured batch ×
    the analysed batch × steps (measure at a smaller batch where the analysed one does not fit).
    """
    device = resolve_device(args.device)
    batch = args.measure_batch or args.batch
    guard_cpu(work, ("warmup", "full"), (batch,), device, args.cpu_flop_limit)
    settings = TrainSettings(work=work, phases=["warmup", "full"], batches=[batch], steps=args.measure_steps,
                             warmup=args.measure_warmup, device=args.device, precision=args.precision)
    bench = run_train_benchmark(settings)
    phases = []
    for r in bench["results"]:
        if r["status"] != "ok":
            raise ValueError(f"--measure: phase {r['phase']} failed at batch {batch}: {r['status']} "
                             "(try a smaller --measure-batch)")
        phases.append({k: r[k] for k in ("phase", "gflops_per_step", "img_per_s", "achieved_tflops")}
                      | {"step_time_s": r["step_time_median_s"]})
    per_image = {p["phase"]: p["step_time_s"] / batch for p in phases}
    splits = [{"label": s["label"],
               "seconds": args.batch * (s["warmup_steps"] * per_image["warmup"] + s["full_steps"] * per_image["full"])}
              for s in F.split_totals({"warmup": 0.0, "full": 0.0}, _parse_splits(args.splits))]
    return {"device": bench["device"], "versions": bench["versions"], "batch": batch, "analysed_batch": args.batch,
            "steps": args.measure_steps, "warmup": args.measure_warmup, "phases": phases, "splits": splits,
            "raw": bench["results"]}


# ==========================================================================================================
# erw-bench train
# ==========================================================================================================

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
    attn_backend: str = "auto"
    alignment_backend: str = "auto"
    reference_step: bool = False
    lr: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    alignment_weight: float = 0.5
    seed: int = 0


def _variants(s: TrainSettings) -> list[str]:
    fast = {"off": ["fast"], "on": ["fast+compile"], "both": ["fast", "fast+compile"]}[s.compile]
    return fast + (["reference"] if s.reference_step else [])


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
    from erw_fast.ema import EMA
    from erw_fast.objectives import AlignmentObjective, Interpolant, diffusion_loss, phase1_loss

    work = s.work
    reference = variant == "reference"
    aligns = phase != "sit"
    z_dims = work.z_dims()
    torch.manual_seed(s.seed)
    model = _build_model(phase, work, "sdpa" if reference else s.attn_backend, z_dims).to(device).train()
    if variant == "fast+compile":
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
    images_h, latents_h, labels_h = host

    def step(timer: RegionTimer | None) -> torch.Tensor:
        mark = timer.mark if timer is not None else (lambda _name: None)
        if timer is not None:
            timer.start()
        images = images_h.to(device, non_blocking=True)
        latents = latents_h.to(device, non_blocking=True)
        labels = labels_h.to(device, non_blocking=True)
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
    started = time.perf_counter()
    loss = torch.zeros(())
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
        "precision": precision, "attention": "sdpa" if reference else s.attn_backend,
        "img_per_s": batch * s.steps / wall, "step_time_s": wall / s.steps, "step_time_median_s": median,
        "breakdown_median_s": {k: statistics.median(r.get(k, 0.0) for r in per_step) for k in REGIONS},
        "gflops_per_step": flop / 1e9, "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "final_loss": float(loss.float().cpu()),
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


def run_train_benchmark(s: TrainSettings) -> dict[str, Any]:
    """Every (phase, batch, variant) once; returns the results document (device, versions, settings, results)."""
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
    results = []
    for phase in s.phases:
        for batch in s.batches:
            host = _host_batch(work, batch, device)
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
    return {
        "benchmark": "train",
        "device": device_info(device),
        "versions": versions(),
        "settings": {**asdict(s), "variants": _variants(s), "precision_resolved": _precision(s, device),
                     "flop_convention": "analytic matmul FLOPs (erw_fast.flops, 2 per multiply-add), fwd+bwd of "
                                        "the trained parts + teacher forward; MFU against the dense bf16 peak"},
        "results": results,
        "speedups": _speedups(results),
    }


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


def render_train_markdown(doc: dict[str, Any]) -> str:
    dev = doc["device"]
    s = doc["settings"]
    w = s["work"]
    lines = [
        f"# Training throughput: {w['model']} on {dev['name']} ({dev['type']})",
        "",
        f"torch {doc['versions']['torch']}, CUDA {doc['versions']['cuda']}; precision {s['precision_resolved']} "
        f"(reference: fp16 + GradScaler); {s['steps']} timed steps after {s['warmup']} untimed. Step-time regions "
        f"are medians (ms); peak: {dev['peak_bf16_tflops'] or 'n/a'} TFLOP/s. FLOPs: {s['flop_convention']}.",
        "",
    ]
    header = ["phase", "variant", "batch", "img/s", "step ms", *REGIONS, "GFLOP/step", "TFLOP/s", "MFU", "peak GiB"]
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
        ])
    lines += [_md_table(header, rows), ""]
    if doc["speedups"]:
        lines += ["## Speed-up over the reference step (same run)", "",
                  _md_table(["phase", "batch", "variant", "reference img/s", "img/s", "speed-up"],
                            [[x["phase"], x["batch"], x["variant"], f"{x['reference_img_per_s']:.1f}",
                              f"{x['img_per_s']:.1f}", f"{x['speedup']:.2f}x"] for x in doc["speedups"]]), ""]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def cmd_train(args: argparse.Namespace) -> int:
    from erw_fast.models import resolve_attention_backend

    try:
        attn_backend = resolve_attention_backend(args.attn_backend)
    except RuntimeError as error:  # a backend that cannot run here is a usage error, not a crash
        raise ValueError(str(error)) from error
    settings = TrainSettings(
        work=_workload(args), phases=[p.strip() for p in args.phases.split(",") if p.strip()], batches=args.batch,
        steps=args.steps, warmup=args.warmup, device=args.device, precision=args.precision, compile=args.compile,
        compile_scope=args.compile_scope, compile_mode=args.compile_mode, profile_dir=args.profile,
        profile_steps=args.profile_steps,
        attn_backend=attn_backend, alignment_backend=args.alignment_backend,
        reference_step=args.reference_step, seed=args.seed,
    )
    if settings.steps < 1:
        raise ValueError("--steps must be ≥ 1")
    guard_cpu(settings.work, settings.phases, settings.batches, resolve_device(settings.device), args.cpu_flop_limit)
    doc = run_train_benchmark(settings)
    name = args.name or f"train_{_slug(doc['device']['name'])}_{_slug(settings.work.model)}"
    out = Path(args.out)
    _write_json(out / f"{name}.json", doc)
    md = render_train_markdown(doc)
    (out / f"{name}.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {out / name}.{{json,md}}")
    return 0 if all(r["status"] == "ok" for r in doc["results"]) else 1


# ==========================================================================================================
# argument parsing
# ==========================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erw-bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cost = sub.add_parser("cost", help="analytic FLOPs per phase and per budget split (ERW Fig. 4)")
    _add_workload_args(cost, batch_default=F.PAPER_BATCH)
    cost.add_argument("--splits", default=None,
                      help="comma-separated WARMUP+FULL step counts (default: 0+100000,10000+90000,… and REPA)")
    cost.add_argument("--out", default=str(DEFAULT_OUT))
    cost.add_argument("--name", default="cost_analysis", help="output file stem")
    cost.add_argument("--measure", action="store_true", help="also time steps of each phase on this device")
    cost.add_argument("--measure-batch", type=int, default=None, help="batch for --measure (default: --batch)")
    cost.add_argument("--measure-steps", type=int, default=3)
    cost.add_argument("--measure-warmup", type=int, default=1)
    cost.add_argument("--device", default="auto")
    cost.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    cost.add_argument("--cpu-flop-limit", type=float, default=1e12, help="refuse --measure on CPU above this")
    cost.set_defaults(func=cmd_cost)

    train = sub.add_parser("train", help="training throughput per phase: img/s, breakdown, TFLOP/s, MFU")
    _add_workload_args(train, batch_default=None)
    train.add_argument("--batch", type=int, nargs="+", default=[32], help="local batch sizes to sweep")
    train.add_argument("--phases", default="warmup,full", help="comma-separated: warmup, full, repa, sit")
    train.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    train.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    train.add_argument("--device", default="auto")
    train.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                       help="auto: bf16 on CUDA, fp32 on CPU")
    train.add_argument("--compile", choices=("off", "on", "both"), default="off", help="eager, compiled, or both")
    train.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks",
                       help="regional (each SiT block) or whole-model compilation")
    train.add_argument("--compile-mode", default="default",
                       choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    train.add_argument("--profile", default=None, metavar="DIR",
                       help="also profile a few steps per measurement: Chrome traces with a range per step "
                            "region (NVTX ranges on CUDA for Nsight Systems)")
    train.add_argument("--profile-steps", type=int, default=3)
    train.add_argument("--attn-backend", default="auto", help="auto | sdpa | math | flash_attn | xformers")
    train.add_argument("--alignment-backend", choices=("auto", "torch", "triton"), default="auto")
    train.add_argument("--reference-step", action="store_true",
                       help="also time the reference's way of running the step (per-sample alignment loop, fp16 "
                            "+ GradScaler, eager, per-parameter EMA, fp32 teacher) and report the speed-up")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--cpu-flop-limit", type=float, default=1e12, help="refuse CPU runs above this per step")
    train.add_argument("--out", default=str(DEFAULT_OUT))
    train.add_argument("--name", default=None, help="output file stem (default: train_<device>_<model>)")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as error:
        print(f"erw-bench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
