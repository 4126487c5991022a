"""Shared pieces of ``erw-bench``: timing, the device (from ``erw_fast.envinfo``), JSON / markdown helpers, and the
``Workload`` one benchmark step computes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from erw_fast import envinfo
from erw_fast import flops as F
from erw_fast.atomic import atomic_write_text
from erw_fast.envinfo import device_info, peak_bf16_tflops

# device_info and peak_bf16_tflops are re-exported: erw-bench's modules take the device report from here.
__all__ = ["Workload", "device_info", "peak_bf16_tflops", "resolve_device", "time_ms", "versions"]


def versions() -> dict[str, str | None]:
    """envinfo's versions plus the optional kernel libraries, each reported only once the run imported it."""
    return envinfo.versions("timm", "triton", "flash_attn")


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


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


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

    def config_overrides(self) -> list[str]:
        """The same workload as trainer config overrides (what ``erw-bench train`` and the trainer read)."""
        m = self.shape()
        return [f"model.name={self.model}", f"model.input_size={m.input_size}", f"model.in_channels={m.in_channels}",
                f"model.num_classes={self.num_classes}", f"model.depth={m.depth}", f"model.hidden_size={m.hidden_size}",
                f"model.num_heads={m.num_heads}", f"model.patch_size={m.patch_size}",
                f"model.projector_dim={self.projector_dim}", f"encoder.names=[{','.join(self.encoders)}]",
                f"encoder.resolution={self.resolution}", f"data.image_size={self.resolution}",
                f"erw.warmup_depth={self.warmup_blocks()}", f"alignment.encoder_depth={self.alignment_depth()}",
                f"alignment.objective={self.objective}", f"alignment.negatives={self.negatives}"]

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
