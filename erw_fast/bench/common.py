"""Shared pieces of ``erw-bench``: the device (name, bf16 peak), library versions, JSON / markdown helpers, and the
``Workload`` one benchmark step computes."""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erw_fast import flops as F

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


def time_ms(fn: Callable[[], object], reps: int, warmup: int, device: torch.device) -> list[float]:
    """Per-call wall times of ``fn`` in ms after ``warmup`` untimed calls: CUDA events on a GPU (one sync at the
    end, so launches queue as in training), perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


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
