"""erw-env (erw_fast.doctor): the report on this CPU machine, versions against importlib.metadata, environment
warnings, missing packages, the NVML path with a fake pynvml; and the docker/ files (Dockerfile structure, the
DeepSpeed hostfile, the SLURM script run against stub commands)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import stat
import subprocess
import types
from pathlib import Path

import pytest
import torch

from erw_fast import doctor
from erw_fast.cli import env as env_cli

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
REPORT_KEYS = {"python", "platform", "gpus", "cuda", "packages", "accelerators", "backends", "launch_env", "nccl_env",
               "warnings"}
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU choices")


def _metadata_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ the report


@CPU_ONLY
def test_report_on_cpu():
    report = doctor.collect_report({})
    assert set(report) == REPORT_KEYS
    assert report["cuda"]["available"] is False and report["cuda"]["device_count"] == 0
    assert report["gpus"]["devices"] == []
    b = report["backends"]
    assert set(b) == {"attention", "alignment", "loader", "optimizer", "distributed", "engine"}
    assert b["engine"]["choice"].startswith("DDP (torchrun) / DeepSpeed ZeRO-1")  # DeepSpeed is installed here
    assert b["alignment"]["choice"] == "torch"
    assert b["optimizer"]["choice"] == "AdamW (foreach)"
    assert b["distributed"]["choice"] == "gloo"
    assert b["attention"]["choice"] == "sdpa (cpu)"
    expected_loader = "webdataset" if _metadata_version("webdataset") else "demo only"  # DALI needs CUDA
    assert b["loader"]["choice"] == expected_loader
    assert report["warnings"] == [] or all(w["variable"] in ("/dev/shm", "ulimit -l") for w in report["warnings"])
    json.dumps(report)  # plain data


def test_cli_json_and_output_file(tmp_path, capsys):
    out = tmp_path / "env.json"
    assert env_cli.main(["--json", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == REPORT_KEYS
    assert json.loads(out.read_text())["packages"] == printed["packages"]


def test_cli_text(capsys):
    assert env_cli.main([]) == 0
    text = capsys.readouterr().out
    for section in ("GPUs (", "CUDA:", "Packages:", "Optional accelerators:", "Backends this run would use:"):
        assert section in text
    assert re.search(r"^\s+torch\s+\S+", text, re.M)


def test_versions_match_importlib_metadata():
    packages = doctor.collect_report({})["packages"]
    for name, dist in [("torch", "torch"), ("deepspeed", "deepspeed"), ("webdataset", "webdataset"),
                       ("timm", "timm"), ("diffusers", "diffusers"), ("numpy", "numpy"), ("erw-fast", "erw-fast")]:
        assert packages[name] == (_metadata_version(dist) or doctor.NOT_INSTALLED), name
    triton = _metadata_version("triton") or _metadata_version("pytorch-triton") or doctor.NOT_INSTALLED
    assert packages["triton"] == triton
    dali = sorted(d.version for d in importlib.metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith("nvidia-dali-cuda"))
    assert packages["nvidia-dali"] == (dali[-1] if dali else doctor.NOT_INSTALLED)


# ------------------------------------------------------------------------------------------------ warnings


def test_nccl_p2p_disable_warning(monkeypatch, capsys):
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    report = doctor.collect_report()
    found = [w for w in report["warnings"] if w["variable"] == "NCCL_P2P_DISABLE"]
    assert len(found) == 1 and found[0]["severity"] == "warning" and found[0]["value"] == "1"
    assert "NVLink" in found[0]["message"] and "nvidia-smi topo -m" in found[0]["message"]
    assert report["nccl_env"]["NCCL_P2P_DISABLE"] == "1"
    assert env_cli.main([]) == 0
    assert "[warning] NCCL_P2P_DISABLE=1" in capsys.readouterr().out
    assert env_cli.main(["--strict"]) == 1  # a pre-flight check fails on it

    monkeypatch.delenv("NCCL_P2P_DISABLE")
    assert not any(w["variable"] == "NCCL_P2P_DISABLE" for w in doctor.collect_report()["warnings"])


@pytest.mark.parametrize(("variable", "value", "cuda", "severity"), [
    ("CUDA_LAUNCH_BLOCKING", "1", False, "warning"),
    ("CUDA_LAUNCH_BLOCKING", "0", False, None),
    ("TORCH_NCCL_BLOCKING_WAIT", "1", False, "warning"),
    ("NCCL_BLOCKING_WAIT", "true", False, "warning"),
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0", False, "warning"),
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1", False, None),
    ("NCCL_P2P_DISABLE", "0", False, None),
    ("NCCL_P2P_LEVEL", "LOC", False, "warning"),
    ("NCCL_P2P_LEVEL", "NVL", False, None),
    ("NCCL_SOCKET_IFNAME", "lo", False, "warning"),
    ("NCCL_SOCKET_IFNAME", "=docker0", False, "warning"),
    ("NCCL_SOCKET_IFNAME", "^docker,lo", False, None),
    ("NCCL_SOCKET_IFNAME", "=eth0", False, None),
    ("NCCL_IB_DISABLE", "1", False, "warning"),
    ("NCCL_NVLS_ENABLE", "0", False, "info"),
    ("NCCL_DEBUG", "INFO", False, "info"),
    ("NCCL_DEBUG", "WARN", False, None),
    ("TRITON_INTERPRET", "1", False, None),  # the CPU test mode: fine without CUDA
    ("TRITON_INTERPRET", "1", True, "warning"),
    ("CUDA_VISIBLE_DEVICES", "", False, "warning"),
    ("CUDA_VISIBLE_DEVICES", "0,1", False, None),
    ("PYTORCH_NO_CUDA_MEMORY_CACHING", "1", False, "warning"),
])
def test_environment_rules(variable, value, cuda, severity):
    found = doctor.environment_warnings({variable: value}, cuda)
    if severity is None:
        assert found == []
    else:
        assert [(w.variable, w.value, w.severity) for w in found] == [(variable, value, severity)]
        assert len(found[0].message) > 40  # says why, not just what


def test_unrelated_environment_gives_no_warning():
    assert doctor.environment_warnings({"PATH": "/usr/bin", "HOME": "/root", "NCCL_IB_HCA": "mlx5_0"}, True) == []


def test_small_shm_warning(monkeypatch):
    monkeypatch.setattr(doctor, "_shm_total_bytes", lambda: 64 * 2**20)
    found = [w for w in doctor.system_warnings({"devices": []}) if w.variable == "/dev/shm"]
    assert len(found) == 1 and found[0].value == "64 MiB" and "--ipc=host" in found[0].message
    monkeypatch.setattr(doctor, "_shm_total_bytes", lambda: 16 * 2**30)
    assert not [w for w in doctor.system_warnings({"devices": []}) if w.variable == "/dev/shm"]


# ------------------------------------------------------------------------------------------------ missing packages


def test_missing_packages_reported(monkeypatch, capsys):
    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(doctor, "_dist_version", missing)
    monkeypatch.setattr(doctor, "_module_available", lambda module: False)
    report = doctor.collect_report({})
    assert set(report["packages"].values()) == {doctor.NOT_INSTALLED}
    assert all(not a["importable"] and a["version"] == doctor.NOT_INSTALLED for a in report["accelerators"].values())
    assert report["backends"]["loader"]["choice"] == "demo only"
    text = doctor.format_report(report)
    assert re.search(r"deepspeed\s+not installed", text) and re.search(r"xformers\s+not installed", text)


def test_one_missing_package(monkeypatch):
    real = doctor._dist_version

    def lookup(dist):
        if dist == "deepspeed":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(doctor, "_dist_version", lookup)
    packages = doctor.package_report()
    assert packages["deepspeed"] == doctor.NOT_INSTALLED
    assert packages["torch"] == importlib.metadata.version("torch")


def test_importable_without_metadata(monkeypatch):
    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(doctor, "_dist_version", missing)
    monkeypatch.setattr(doctor, "_module_available", lambda module: module == "flash_attn_interface")
    acc = doctor.accelerator_report()
    assert acc["flash-attn 3"] == {**acc["flash-attn 3"], "importable": True, "version": "unknown"}
    assert acc["flash-attn 2"]["importable"] is False


def test_real_module_probe():
    assert doctor._module_available("json") is True
    assert doctor._module_available("erw_fast_no_such_module") is False
    assert doctor._module_available("erw_fast_no_such_parent.child") is False


# ------------------------------------------------------------------------------------------------ GPUs


def _fake_nvml(power_limit_mw: int = 700_000, default_mw: int = 700_000, init_error: bool = False):
    calls = {"shutdown": 0}
    m = types.ModuleType("pynvml")
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_NVLINK_MAX_LINKS, m.NVML_FEATURE_ENABLED = 1, 2, 18, 1

    def init():
        if init_error:
            raise RuntimeError("NVML Shared Library Not Found")

    def shutdown():
        calls["shutdown"] += 1

    def power_usage(h):
        if h == 1:
            raise RuntimeError("Not Supported")
        return 350_500

    m.nvmlInit, m.nvmlShutdown = init, shutdown
    m.nvmlDeviceGetCount = lambda: 2
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H800" if h == 0 else "NVIDIA H800"  # old pynvml returns bytes
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30, used=0, free=80 * 2**30)
    m.nvmlDeviceGetClockInfo = lambda h, kind: {1: 1755, 2: 2619}[kind]
    m.nvmlDeviceGetMaxClockInfo = lambda h, kind: {1: 1980, 2: 2619}[kind]
    m.nvmlDeviceGetPowerManagementLimit = lambda h: power_limit_mw
    m.nvmlDeviceGetPowerManagementDefaultLimit = lambda h: default_mw
    m.nvmlDeviceGetPowerUsage = power_usage
    m.nvmlDeviceGetNvLinkState = lambda h, link: 1
    m.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    m.nvmlSystemGetCudaDriverVersion = lambda: 12040
    return m, calls


def test_nvml_report(monkeypatch):
    fake, calls = _fake_nvml()
    monkeypatch.setattr(doctor, "_import_pynvml", lambda: fake)
    g = doctor.gpu_report()
    assert (g["source"], g["driver"], g["cuda_driver"]) == ("pynvml", "550.54.15", "12.4")
    d0, d1 = g["devices"]
    assert d0 == {"index": 0, "name": "NVIDIA H800", "memory_total_gib": 80.0, "sm_clock_mhz": 1755,
                  "sm_clock_max_mhz": 1980, "mem_clock_max_mhz": 2619, "power_limit_w": 700.0,
                  "power_default_limit_w": 700.0, "power_draw_w": 350.5, "nvlink_active_links": 18}
    assert d1["name"] == "NVIDIA H800" and d1["power_draw_w"] is None  # an unsupported query is None, not a crash
    assert calls["shutdown"] == 1
    text = doctor.format_report({**doctor.collect_report({}), "gpus": g})
    assert "[0] NVIDIA H800, 80.0 GiB, SM 1755/1980 MHz" in text and "limit 700 W" in text


def test_power_cap_warning(monkeypatch):
    fake, _ = _fake_nvml(power_limit_mw=500_000, default_mw=700_000)
    monkeypatch.setattr(doctor, "_import_pynvml", lambda: fake)
    found = [w for w in doctor.system_warnings(doctor.gpu_report()) if "power limit" in w.variable]
    assert [w.value for w in found] == ["500 W (default 700 W)"] * 2


def test_nvml_failure_falls_back(monkeypatch):
    fake, _ = _fake_nvml(init_error=True)
    monkeypatch.setattr(doctor, "_import_pynvml", lambda: fake)
    g = doctor.gpu_report()
    assert "NVML Shared Library Not Found" in g["nvml_error"]
    if not torch.cuda.is_available():
        assert (g["source"], g["devices"]) == ("none", [])


def test_torch_cuda_inventory(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA A100-SXM4-80GB", total_memory=80 * 2**30, major=8, minor=0,
                                  multi_processor_count=108)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    g = doctor.gpus_from_torch()
    assert g["source"] == "torch.cuda"
    assert g["devices"] == [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "memory_total_gib": 80.0,
                             "compute_capability": "8.0", "multiprocessors": 108}]


# ------------------------------------------------------------------------------------------------ docker/


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and line continuations joined, as Docker parses them."""
    lines = [ln for ln in (DOCKER / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """Token lists of every `pip install ...` inside RUN instructions (shell-tokenised: quotes respected, commands
    split at && || ; and parentheses)."""
    installs = []
    for word, args in instructions:
        if word != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "(", ")", "|", "{", "}"):
                if command[:2] == ["pip", "install"] or command[:4] == ["python", "-m", "pip", "install"]:
                    installs.append(command[command.index("install") + 1:])
                command = []
            else:
                command.append(token)
    return installs


def test_dockerfile_uses_ngc_pytorch_and_keeps_its_torch():
    ins = _dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", image), image

    installs = _pip_installs(ins)
    assert installs, "no pip install found"
    names = [re.split(r"[<>=!~\[ ]", t, maxsplit=1)[0].lower() for inst in installs for t in inst
             if not t.startswith("-")]
    assert "torch" not in names and "torchvision" not in names  # never replace the container's build
    flat = " ".join(" ".join(i) for i in installs)
    assert "--force-reinstall" not in flat and "download.pytorch.org" not in flat
    assert not any(t in ("-U", "--upgrade") for inst in installs for t in inst)
    assert {"deepspeed", "webdataset", "timm", "diffusers"} <= set(names)

    # The constraint is in force before the first install, and DeepSpeed builds no ops and sees the real torch.
    order = [w for w, _ in ins]
    env_text = " ".join(a for w, a in ins if w == "ENV")
    assert "PIP_CONSTRAINT=" in env_text and "DS_BUILD_OPS=0" in env_text
    first_pip = next(i for i, (w, a) in enumerate(ins) if w == "RUN" and "pip install" in a)
    assert any(w == "ENV" and "PIP_CONSTRAINT=" in a for w, a in ins[:first_pip])
    ds = next(i for i in installs if any(t.startswith("deepspeed") for t in i))
    assert "--no-build-isolation" in ds
    # erw_fast itself: editable, without resolving its `torch` requirement.
    own = next(i for i in installs if "-e" in i)
    assert own[own.index("-e") + 1] == "." and "--no-deps" in own
    assert order.index("COPY") < max(i for i, (w, a) in enumerate(ins) if w == "RUN" and "-e ." in a)


def test_hostfile_parses_with_deepspeed():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    pool = runner._parse_hostfile((DOCKER / "hostfile.example").read_text().splitlines())
    assert list(pool.values()) == [8] * len(pool) and len(pool) >= 2


@pytest.mark.multiprocess
def test_slurm_script_against_stub_commands(tmp_path):
    """Run the sbatch script with stub srun / scontrol / torchrun / python and check what it would launch."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        # A long node list: a reader that stops early (head -n 1) would kill the script with SIGPIPE under pipefail.
        "scontrol": 'printf "gpu-a\\n"; seq -f "gpu-%g" 1 20000',
        # srun: drop its own options, run the command (the stubs below only log).
        "srun": 'while [[ "$1" == --* ]]; do shift; done; echo "srun $*" >> "$LOG"; "$@"',
        "torchrun": 'echo "torchrun $*" >> "$LOG"',
        "python": 'echo "python $*" >> "$LOG"',
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NNODES": "2", "RUNS_DIR": str(tmp_path / "runs")}
    result = subprocess.run(["bash", str(DOCKER / "slurm_example.sbatch")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = log.read_text()
    assert "python -m erw_fast.cli.env --json --output logs/env-42-" in calls
    launch = next(ln for ln in calls.splitlines() if ln.startswith("torchrun"))
    assert "--nnodes 2 --nproc_per_node 8" in launch
    assert "--rdzv_endpoint gpu-a:29500 --rdzv_id 42" in launch
    assert launch.endswith("train.py --config configs/erw_sit_xl2.yaml data.path=/data/imagenet256")


def test_nccl_version_text():
    assert doctor._nccl_text((2, 27, 7)) == "2.27.7"
    assert doctor._nccl_text(22105) == "2.21.5"  # the integer code older torch returns
