"""What a measurement or an output file was made on: the device and the library versions.

Every benchmark, tuning table and sample protocol records these through this module, so the same machine is
named the same way everywhere. (``erw-env``, ``erw_fast.doctor``, is the full inventory instead: every GPU's
clocks and power, installed package versions, environment warnings.)
"""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PEAK_BF16_TFLOPS",
    "cpu_name",
    "device_info",
    "device_name",
    "gpu_name",
    "module_version",
    "peak_bf16_tflops",
    "versions",
]

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


def gpu_name(device: torch.device) -> str:
    """The GPU's marketing name: NVML when importable (reports SXM vs PCIe reliably), else torch's."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        name = pynvml.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)  # pynvml < 11.5 returns bytes
    except Exception:  # no pynvml, no driver access, or a MIG slice: torch's name is good enough
        return torch.cuda.get_device_name(device)


def cpu_name() -> str:
    try:  # Linux names the model here; platform.processor() is often just the architecture
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, else the CPU's model."""
    device = torch.device(device)
    return gpu_name(device) if device.type == "cuda" else cpu_name()


def device_info(device: torch.device | str) -> dict[str, Any]:
    """Name, bf16 peak and size of a device: capability, memory and count of a GPU, threads of a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        name = gpu_name(device)
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": name, "peak_bf16_tflops": peak_bf16_tflops(name),
                "capability": f"{props.major}.{props.minor}", "memory_gib": props.total_memory / 2**30,
                "count": torch.cuda.device_count()}
    return {"type": device.type, "name": cpu_name(), "peak_bf16_tflops": None, "threads": torch.get_num_threads()}


def module_version(module: str, import_missing: bool = False) -> str | None:
    """``module.__version__`` if this process has imported it (or, with ``import_missing``, can import it now);
    None otherwise. Without ``import_missing`` a library reports only when the measured code used it."""
    mod = sys.modules.get(module)
    if mod is None and import_missing:
        try:
            mod = importlib.import_module(module)
        except Exception:  # not installed, or broken: either way not what ran
            return None
    return None if mod is None else getattr(mod, "__version__", None)


def versions(*modules: str, import_missing: bool = False) -> dict[str, str | None]:
    """Python, the platform, torch with the CUDA and cuDNN it was built with, then each of ``modules`` (import
    names) as ``module_version`` reports it."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda, "platform": platform.platform()}
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    out.update({m: module_version(m, import_missing) for m in modules})
    return out
