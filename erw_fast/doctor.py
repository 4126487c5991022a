"""Environment doctor behind ``erw-env``: what this machine has and what a training run on it will use.

It reports the GPUs (NVML through ``pynvml`` when importable, else ``torch.cuda``), the versions of the packages
the trainer depends on (from package metadata: nothing heavy is imported just to read a version), which optional
accelerators can be imported, the backend each component of the trainer will pick, and environment settings that
are known to cost speed or cause hangs. Every probe is guarded: a missing package or a failing driver call is
reported, never raised, so the doctor also runs on a CPU-only machine or a half-broken node.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NOT_INSTALLED = "not installed"

# Report name → distribution names to try, first found wins. Several names cover the NGC container's builds
# ("pytorch-triton") and DALI's per-CUDA-major wheels.
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton"),
    "deepspeed": ("deepspeed",),
    "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"),
    "webdataset": ("webdataset",),
    "timm": ("timm",),
    "diffusers": ("diffusers",),
    "numpy": ("numpy",),
    "nvidia-ml-py": ("nvidia-ml-py", "pynvml"),
    "erw-fast": ("erw-fast",),
}


@dataclass(frozen=True)
class Accelerator:
    """An optional kernel library: its report name, the module to find, and its distribution names."""

    name: str
    module: str
    dists: tuple[str, ...]
    role: str


ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("flash-attn 2", "flash_attn", ("flash-attn", "flash_attn"), "attn_backend: flash_attn (FA2)"),
    Accelerator("flash-attn 3", "flash_attn_interface", ("flash-attn-3", "flash_attn_3", "flashattn-hopper"),
                "attn_backend: flash_attn prefers FA3 (Hopper)"),
    Accelerator("xformers", "xformers", ("xformers",), "attn_backend: xformers"),
    Accelerator("apex", "apex", ("apex",), "not used by the trainer (reported for completeness)"),
    Accelerator("transformer_engine", "transformer_engine",
                ("transformer-engine", "transformer_engine", "transformer-engine-torch"),
                "not used by the trainer (reported for completeness)"),
)

# Launcher variables worth echoing: they explain which rank / device a process thinks it is.
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "SLURM_PROCID", "OMP_NUM_THREADS")

SHM_MIN_BYTES = 1 << 30  # below this, DataLoader workers passing 256-image batches through /dev/shm die


# ------------------------------------------------------------------------------------------------ lookups
# Small module-level functions so that tests can replace them (monkeypatch) to simulate missing packages.


def _dist_version(dist: str) -> str:
    """The installed version of a distribution; raises importlib.metadata.PackageNotFoundError."""
    return importlib.metadata.version(dist)


def _module_available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (find_spec only imports parent packages)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module whose __spec__ is None
        return False


def _import_pynvml() -> Any | None:
    try:
        return importlib.import_module("pynvml")
    except Exception:  # any import failure means "no NVML here"
        return None


def _shm_total_bytes() -> int | None:
    """Size of /dev/shm (None where there is none, e.g. macOS)."""
    try:
        return shutil.disk_usage("/dev/shm").total
    except OSError:
        return None


def package_version(*dists: str) -> str:
    """Version of the first installed distribution among ``dists``, else ``NOT_INSTALLED``."""
    for dist in dists:
        try:
            return _dist_version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # a corrupt metadata directory must not crash the doctor
            continue
    return NOT_INSTALLED


def _guard(fn: Callable[[], Any], default: Any = None) -> Any:
    try:
        return fn()
    except Exception:  # one unsupported query (e.g. power on a GPU without sensors) is not fatal
        return default


# ------------------------------------------------------------------------------------------------ probes


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # pynvml < 11.5 returns bytes


def _cuda_version_text(encoded: int) -> str:
    """NVML encodes the driver's CUDA version as 1000·major + 10·minor (12040 → '12.4')."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def gpus_from_nvml(nvml: Any) -> dict[str, Any]:
    """GPU inventory through NVML (all GPUs of the node: CUDA_VISIBLE_DEVICES does not apply to NVML)."""
    nvml.nvmlInit()
    try:
        clock_sm = getattr(nvml, "NVML_CLOCK_SM", 1)
        clock_mem = getattr(nvml, "NVML_CLOCK_MEM", 2)
        max_links = getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)
        enabled = getattr(nvml, "NVML_FEATURE_ENABLED", 1)
        devices = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = _guard(lambda h=h: nvml.nvmlDeviceGetMemoryInfo(h))
            # NVML reports power in milliwatts.
            limit = _guard(lambda h=h: nvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0)
            default_limit = _guard(lambda h=h: nvml.nvmlDeviceGetPowerManagementDefaultLimit(h) / 1000.0)
            draw = _guard(lambda h=h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0)

            def _links(h: Any = h) -> int:
                active = 0
                for link in range(max_links):
                    try:
                        active += int(nvml.nvmlDeviceGetNvLinkState(h, link) == enabled)
                    except Exception:  # links past the device's count raise
                        break
                return active

            devices.append({
                "index": i,
                "name": _guard(lambda h=h: _text(nvml.nvmlDeviceGetName(h)), "unknown"),
                "memory_total_gib": round(mem.total / 2**30, 2) if mem is not None else None,
                "sm_clock_mhz": _guard(lambda h=h: nvml.nvmlDeviceGetClockInfo(h, clock_sm)),
                "sm_clock_max_mhz": _guard(lambda h=h: nvml.nvmlDeviceGetMaxClockInfo(h, clock_sm)),
                "mem_clock_max_mhz": _guard(lambda h=h: nvml.nvmlDeviceGetMaxClockInfo(h, clock_mem)),
                "power_limit_w": limit,
                "power_default_limit_w": default_limit,
                "power_draw_w": draw,
                "nvlink_active_links": _guard(_links),
            })
        return {
            "source": "pynvml",
            "driver": _guard(lambda: _text(nvml.nvmlSystemGetDriverVersion())),
            "cuda_driver": _guard(lambda: _cuda_version_text(int(nvml.nvmlSystemGetCudaDriverVersion()))),
            "devices": devices,
        }
    finally:
        _guard(nvml.nvmlShutdown)


def gpus_from_torch() -> dict[str, Any]:
    """GPU inventory through torch.cuda (visible GPUs only; no driver, clock or power information)."""
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({
                "index": i,
                "name": props.name,
                "memory_total_gib": round(props.total_memory / 2**30, 2),
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
            })
    return {"source": "torch.cuda" if devices else "none", "driver": None, "cuda_driver": None, "devices": devices}


def gpu_report() -> dict[str, Any]:
    nvml = _import_pynvml()
    if nvml is not None:
        try:
            return gpus_from_nvml(nvml)
        except Exception as error:  # no driver / no GPU: NVML raises at init
            report = _guard(gpus_from_torch, {"source": "none", "driver": None, "cuda_driver": None, "devices": []})
            report["nvml_error"] = str(error)
            return report
    return _guard(gpus_from_torch, {"source": "none", "driver": None, "cuda_driver": None, "devices": []})


def _nccl_text(version: Any) -> str:
    """torch.cuda.nccl.version() is a (major, minor, patch) tuple in torch 2.x, an int (2.21.5 → 22105) before."""
    if isinstance(version, int):
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return ".".join(map(str, version))


def cuda_report() -> dict[str, Any]:
    import torch

    available = _guard(torch.cuda.is_available, False)
    return {
        "available": available,
        "device_count": _guard(torch.cuda.device_count, 0) if available else 0,
        "torch_cuda_build": torch.version.cuda,  # None for a CPU build of torch
        "cudnn": _guard(torch.backends.cudnn.version),
        "nccl": _guard(lambda: _nccl_text(torch.cuda.nccl.version())) if torch.version.cuda else None,
        "bf16_supported": _guard(torch.cuda.is_bf16_supported, False) if available else None,
    }


def package_report() -> dict[str, str]:
    return {name: package_version(*dists) for name, dists in PACKAGES.items()}


def accelerator_report() -> dict[str, dict[str, Any]]:
    out = {}
    for acc in ACCELERATORS:
        importable = _module_available(acc.module)
        version = package_version(*acc.dists)
        out[acc.name] = {
            "module": acc.module,
            "importable": importable,
            # An importable module whose distribution metadata is missing (source builds) has no known version.
            "version": version if version != NOT_INSTALLED or not importable else "unknown",
            "role": acc.role,
        }
    return out


def backend_report(cuda_available: bool) -> dict[str, dict[str, str]]:
    """The backend each trainer component will use here, with the reason (mirrors the trainer's own choices)."""
    out: dict[str, dict[str, str]] = {}
    try:
        from erw_fast.models import describe_attention_backend

        out["attention"] = {"choice": describe_attention_backend("auto"),
                            "why": "attn_backend: auto → sdpa (flash_attn / xformers only when asked for)"}
    except Exception as error:
        out["attention"] = {"choice": f"error: {error}", "why": "erw_fast.models could not be imported"}
    try:
        from erw_fast.objectives import resolve_alignment_backend

        choice = resolve_alignment_backend("auto")
        why = "fused Triton kernels on CUDA" if choice == "triton" else "no CUDA (or no Triton): torch reference path"
        if choice == "triton":
            import torch

            from erw_fast.kernels.tiles import describe_tiles

            why += f"; NT-Xent {describe_tiles(torch.device('cuda'))}"
        out["alignment"] = {"choice": choice, "why": why}
    except Exception as error:
        out["alignment"] = {"choice": f"error: {error}", "why": "erw_fast.objectives could not be imported"}

    dali = _module_available("nvidia.dali")
    wds = _module_available("webdataset")
    if dali and cuda_available:
        loader = ("dali", "DALI importable and CUDA available: GPU (nvJPEG) image decoding")
    elif wds:
        loader = ("webdataset", f"{'no CUDA for DALI' if dali else 'DALI not importable'}; CPU webdataset loader")
    else:
        loader = ("demo only", "neither DALI (with CUDA) nor webdataset: only data.kind=demo can train")
    out["loader"] = {"choice": loader[0], "why": loader[1]}
    out["optimizer"] = (
        {"choice": "AdamW (fused)", "why": "CUDA: one fused kernel for the whole update"}
        if cuda_available else {"choice": "AdamW (foreach)", "why": "no CUDA: multi-tensor foreach implementation"}
    )
    out["distributed"] = (
        {"choice": "nccl", "why": "CUDA: NCCL collectives (also what DeepSpeed's launcher uses)"}
        if cuda_available else {"choice": "gloo", "why": "no CUDA: gloo collectives on CPU"}
    )
    out["engine"] = (
        {"choice": "DDP (torchrun) / DeepSpeed ZeRO-1 (deepspeed launcher)",
         "why": "DeepSpeed importable: `deepspeed train.py` runs ZeRO (engine.zero_stage, default 1), torchrun DDP"}
        if _module_available("deepspeed") else
        {"choice": "DDP", "why": "DeepSpeed not importable: torchrun/python run DDP or one process"}
    )
    return out


# ------------------------------------------------------------------------------------------------ warnings


@dataclass(frozen=True)
class EnvWarning:
    variable: str
    value: str
    severity: str  # "warning": costs speed or correctness in a real run; "info": fine for debugging, not production
    message: str


@dataclass(frozen=True)
class EnvRule:
    variable: str
    applies: Callable[[str, bool], bool]  # (value, cuda_available) → whether the rule fires
    severity: str
    message: str


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on", "y"}


def _is(*values: str) -> Callable[[str, bool], bool]:
    wanted = {v.lower() for v in values}
    return lambda value, _cuda: value.strip().lower() in wanted


def _loopback_only(value: str, _cuda: bool) -> bool:
    """NCCL_SOCKET_IFNAME that selects only loopback / docker bridge interfaces (an include list, no '^')."""
    value = value.strip()
    if not value or value.startswith("^"):
        return False
    prefixes = [p.strip().lstrip("=") for p in value.split(",") if p.strip()]
    return bool(prefixes) and all(p == "lo" or p.startswith("docker") for p in prefixes)


_P2P_ADVICE = (
    "Unset it and find the real cause: `nvidia-smi topo -m` (GPU pairs should read NV# on NVLink systems, not "
    "SYS/PHB), PCIe ACS (`sudo lspci -vvv | grep ACSCtl`: SrcValid+ on PCIe switches redirects P2P through the "
    "CPU root complex: disable ACS on bare metal), the IOMMU (`iommu=pt` or off), then confirm the bandwidth with "
    "nccl-tests' all_reduce_perf."
)

ENV_RULES: tuple[EnvRule, ...] = (
    EnvRule("NCCL_P2P_DISABLE", lambda v, _c: _truthy(v), "warning",
            "disables NCCL's peer-to-peer transport (direct GPU-to-GPU copies over NVLink or PCIe): intra-node "
            "traffic is staged through host shared memory, so the gradient all-reduce runs at a fraction of NVLink "
            "bandwidth (450 GB/s per direction on H100 SXM). It is a folk fix for hangs whose cause is elsewhere. "
            + _P2P_ADVICE),
    EnvRule("NCCL_P2P_LEVEL", _is("LOC", "0"), "warning",
            "LOC / 0 means 'never use P2P': the same cost as NCCL_P2P_DISABLE=1. " + _P2P_ADVICE),
    EnvRule("NCCL_SHM_DISABLE", lambda v, _c: _truthy(v), "warning",
            "disables the shared-memory transport: where P2P is not possible NCCL falls back to the network "
            "(InfiniBand or sockets) even between GPUs of the same node."),
    EnvRule("NCCL_IB_DISABLE", lambda v, _c: _truthy(v), "warning",
            "forces TCP sockets between nodes instead of InfiniBand/RoCE: multi-node gradient reduction drops to "
            "Ethernet socket speed. Harmless on a single node."),
    EnvRule("NCCL_NVLS_ENABLE", _is("0", "false"), "info",
            "disables NVLink SHARP (in-switch reductions on NVSwitch H100/H800 systems), which NCCL uses by default "
            "where supported. Keep it on unless it fails (it needs the fabric manager and some extra GPU memory)."),
    EnvRule("NCCL_SOCKET_IFNAME", _loopback_only, "warning",
            "selects only the loopback / docker bridge interface: other nodes cannot reach it, so a multi-node job "
            "hangs at initialisation. Name the cluster interface (e.g. =ib0 or eth) or exclude with ^lo,docker."),
    EnvRule("NCCL_DEBUG", _is("INFO", "TRACE"), "info",
            "verbose NCCL logging: the right tool for diagnosis (it prints the topology, transports and channels "
            "chosen: look for 'via P2P/IPC' or 'NVLS' intra-node and 'NET/IB' between nodes), noise in production; "
            "TRACE also costs time."),
    EnvRule("NCCL_ALGO", lambda v, _c: bool(v.strip()), "info",
            "overrides NCCL's algorithm tuner: a debugging knob; leave it unset unless a measurement says otherwise."),
    EnvRule("NCCL_PROTO", lambda v, _c: bool(v.strip()), "info",
            "overrides NCCL's protocol choice: a debugging knob; leave it unset unless a measurement says otherwise."),
    EnvRule("CUDA_LAUNCH_BLOCKING", lambda v, _c: _truthy(v), "warning",
            "makes every CUDA kernel launch synchronous: the CPU can no longer queue work ahead of the GPU and "
            "communication no longer overlaps computation; steps run several times slower. Use it only to locate "
            "a failing kernel."),
    EnvRule("TORCH_NCCL_BLOCKING_WAIT", lambda v, _c: _truthy(v), "warning",
            "the host thread blocks on every collective until it completes (to enforce the timeout itself), so the "
            "CPU cannot run ahead of the GPU. Timeouts are already enforced by the NCCL watchdog "
            "(TORCH_NCCL_ASYNC_ERROR_HANDLING) without blocking."),
    EnvRule("NCCL_BLOCKING_WAIT", lambda v, _c: _truthy(v), "warning",
            "the old name of TORCH_NCCL_BLOCKING_WAIT: the host blocks on every collective; rely on the NCCL "
            "watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING) instead."),
    EnvRule("TORCH_NCCL_ASYNC_ERROR_HANDLING", _is("0"), "warning",
            "a failed or hung collective is never torn down: when one rank dies, the others hang until the job is "
            "killed from outside."),
    EnvRule("NCCL_ASYNC_ERROR_HANDLING", _is("0"), "warning",
            "the old name of TORCH_NCCL_ASYNC_ERROR_HANDLING=0: a hung collective is never torn down."),
    EnvRule("TORCH_DISTRIBUTED_DEBUG", _is("DETAIL"), "info",
            "checks every collective for consistency across ranks (extra synchronisation and memory): debugging "
            "only."),
    EnvRule("PYTORCH_NO_CUDA_MEMORY_CACHING", lambda v, _c: _truthy(v), "warning",
            "bypasses PyTorch's caching allocator: every tensor becomes a cudaMalloc/cudaFree, which synchronises "
            "the device."),
    EnvRule("CUDA_DEVICE_MAX_CONNECTIONS", _is("1"), "info",
            "one hardware work queue per device: kernels of different streams are issued in one order, which "
            "adds false dependencies between DDP's communication stream and the compute stream. Megatron sets it "
            "to order tensor-parallel overlap; this trainer does not need it."),
    EnvRule("TRITON_INTERPRET", lambda v, cuda: cuda and _truthy(v), "warning",
            "Triton kernels run in the Python interpreter (the CPU test mode): on a GPU the fused alignment "
            "kernels become orders of magnitude slower. Unset it for training."),
    EnvRule("CUDA_VISIBLE_DEVICES", lambda v, _c: v.strip() in {"", "-1"}, "warning",
            "hides every GPU from this process: training falls back to the CPU."),
)


def environment_warnings(environ: Mapping[str, str], cuda_available: bool) -> list[EnvWarning]:
    """Known-bad settings among ``environ``."""
    found = []
    for rule in ENV_RULES:
        if rule.variable in environ:
            value = environ[rule.variable]
            if rule.applies(value, cuda_available):
                found.append(EnvWarning(rule.variable, value, rule.severity, rule.message))
    return found


def system_warnings(gpus: Mapping[str, Any]) -> list[EnvWarning]:
    """Settings outside the environment: /dev/shm size, memlock limit with InfiniBand, GPU power caps."""
    found = []
    shm = _shm_total_bytes()
    if shm is not None and shm < SHM_MIN_BYTES:
        found.append(EnvWarning(
            "/dev/shm", f"{shm / 2**20:.0f} MiB", "warning",
            "DataLoader worker processes hand batches to the trainer through shared memory; with this little "
            "(Docker's default is 64 MiB) workers die with 'bus error' or 'No space left on device'. Run the "
            "container with --ipc=host (or --shm-size=16g)."))
    ib = Path("/sys/class/infiniband")
    has_ib = _guard(lambda: ib.is_dir() and any(ib.iterdir()), False)
    if has_ib and sys.platform.startswith("linux"):
        import resource

        soft, _hard = _guard(lambda: resource.getrlimit(resource.RLIMIT_MEMLOCK), (resource.RLIM_INFINITY, 0))
        if soft != resource.RLIM_INFINITY:
            found.append(EnvWarning(
                "ulimit -l", f"{soft // 1024} KiB", "warning",
                "InfiniBand adapters are present but locked memory is limited: RDMA registration of NCCL buffers "
                "can fail or fall back to slower paths. In Docker pass --ulimit memlock=-1."))
    for dev in gpus.get("devices", []):
        limit, default = dev.get("power_limit_w"), dev.get("power_default_limit_w")
        if limit and default and limit < 0.95 * default:
            found.append(EnvWarning(
                f"GPU {dev['index']} power limit", f"{limit:.0f} W (default {default:.0f} W)", "warning",
                "the GPU is power-capped below its default limit: clocks, and so step time, are throttled. "
                "Check `nvidia-smi -q -d POWER`."))
    return found


# ------------------------------------------------------------------------------------------------ report


def collect_report(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything ``erw-env`` prints, as plain JSON-serialisable data."""
    environ = os.environ if environ is None else environ
    cuda = _guard(cuda_report, {"available": False, "device_count": 0, "torch_cuda_build": None, "cudnn": None,
                                "nccl": None, "bf16_supported": None, "error": "torch could not be imported"})
    gpus = gpu_report()
    warnings = environment_warnings(environ, bool(cuda["available"])) + system_warnings(gpus)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "gpus": gpus,
        "cuda": cuda,
        "packages": package_report(),
        "accelerators": accelerator_report(),
        "backends": backend_report(bool(cuda["available"])),
        "launch_env": {k: environ[k] for k in LAUNCH_VARS if k in environ},
        "nccl_env": {k: v for k, v in sorted(environ.items()) if k.startswith("NCCL_")},
        "warnings": [asdict(w) for w in warnings],
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.0f}{unit}"
    return f"{value}{unit}"


def format_report(report: Mapping[str, Any]) -> str:
    """Human-readable rendering of ``collect_report()``."""
    lines = [f"erw-env: Python {report['python']} on {report['platform']}", ""]
    g = report["gpus"]
    lines.append(f"GPUs ({g['source']}): driver {_fmt(g.get('driver'))}, driver CUDA {_fmt(g.get('cuda_driver'))}")
    if not g["devices"]:
        lines.append("  none" + (f" (NVML: {g['nvml_error']})" if g.get("nvml_error") else ""))
    for d in g["devices"]:
        mem = d.get("memory_total_gib")
        parts = [f"  [{d['index']}] {d['name']}", f"{mem:.1f} GiB" if mem is not None else "memory n/a"]
        if "sm_clock_max_mhz" in d:
            parts.append(f"SM {_fmt(d.get('sm_clock_mhz'))}/{_fmt(d.get('sm_clock_max_mhz'))} MHz")
            parts.append(f"mem clock max {_fmt(d.get('mem_clock_max_mhz'))} MHz")
            parts.append(f"power {_fmt(d.get('power_draw_w'), ' W')} / limit {_fmt(d.get('power_limit_w'), ' W')}")
            parts.append(f"NVLink links up {_fmt(d.get('nvlink_active_links'))}")
        else:
            parts.append(f"sm_{d.get('compute_capability', '?').replace('.', '')}")
        lines.append(", ".join(parts))
    c = report["cuda"]
    build = f"CUDA {c['torch_cuda_build']}" if c["torch_cuda_build"] else "CPU only"
    lines += ["", f"CUDA: available {c['available']} ({c['device_count']} visible), torch built for {build}, "
              f"cuDNN {_fmt(c['cudnn'])}, NCCL {_fmt(c['nccl'])}", "", "Packages:"]
    width = max(len(k) for k in report["packages"])
    lines += [f"  {k:<{width}}  {v}" for k, v in report["packages"].items()]
    lines += ["", "Optional accelerators:"]
    width = max(len(k) for k in report["accelerators"])
    for name, a in report["accelerators"].items():
        state = f"importable ({a['version']})" if a["importable"] else NOT_INSTALLED
        lines.append(f"  {name:<{width}}  {state:<28} {a['role']}")
    lines += ["", "Backends this run would use:"]
    width = max(len(k) for k in report["backends"])
    lines += [f"  {k:<{width}}  {b['choice']}  ({b['why']})" for k, b in report["backends"].items()]
    if report["launch_env"]:
        lines += ["", "Launcher: " + " ".join(f"{k}={v}" for k, v in report["launch_env"].items())]
    if report["nccl_env"]:
        lines += ["", "NCCL settings: " + " ".join(f"{k}={v}" for k, v in report["nccl_env"].items())]
    lines.append("")
    if report["warnings"]:
        lines.append(f"Warnings ({len(report['warnings'])}):")
        for w in report["warnings"]:
            lines.append(f"  [{w['severity']}] {w['variable']}={w['value']}: {w['message']}")
    else:
        lines.append("Warnings: none")
    return "\n".join(lines)


def has_warnings(report: Mapping[str, Any], severities: Sequence[str] = ("warning",)) -> bool:
    return any(w["severity"] in severities for w in report["warnings"])
