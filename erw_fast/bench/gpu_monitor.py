"""Samples the GPU's SM clock, power draw and temperature in a background thread while a benchmark runs.

Why: MFU is quoted against the dense peak at the boost clock, but a power- or heat-limited GPU runs slower
(an H100 held at 1.4 GHz instead of 1.98 GHz has about 70% of that peak). Each timed case therefore reports
the clocks and power it actually ran at, and the ratio of the median SM clock to the maximum.

NVML is read through `pynvml` (the nvidia-ml-py package); where it is missing or unusable the summary says
why instead of failing the benchmark.
"""

from __future__ import annotations

import statistics
import threading
from typing import Any

# NVML's throttle-reason bits (nvml.h, nvmlClocksEventReasons), named for the report.
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
_NVML_CLOCK_SM = 1  # NVML_CLOCK_SM
_NVML_TEMPERATURE_GPU = 0


def _load_nvml() -> Any:
    import pynvml

    return pynvml


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class GpuMonitor:
    """Context manager: samples one GPU every `interval_s` seconds between enter and exit.

    `nvml` is the pynvml module (or anything with its functions); None imports pynvml.
    """

    def __init__(self, device_index: int = 0, interval_s: float = 0.1, nvml: Any | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.device_index, self.interval_s = device_index, interval_s
        self._nvml = nvml
        self._handle: Any = None
        self.unavailable: str | None = None
        self.static: dict[str, Any] = {}
        self.samples: list[dict[str, float]] = []
        self.throttle_mask = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open(self) -> None:
        try:
            nvml = self._nvml if self._nvml is not None else _load_nvml()
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
            self._nvml = nvml
        except Exception as exc:  # no pynvml, no driver access (containers), MIG without NVML rights
            self.unavailable = f"NVML not usable: {type(exc).__name__}: {exc}"
            return
        for key, read in (
            ("max_sm_clock_mhz", lambda: nvml.nvmlDeviceGetMaxClockInfo(self._handle, _NVML_CLOCK_SM)),
            ("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1000.0),
        ):
            try:
                self.static[key] = read()
            except Exception:  # some fields are not supported on every part or driver
                self.static[key] = None

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        sample: dict[str, float] = {}
        for key, read in (
            ("sm_clock_mhz", lambda: nvml.nvmlDeviceGetClockInfo(handle, _NVML_CLOCK_SM)),
            ("power_w", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            ("temperature_c", lambda: nvml.nvmlDeviceGetTemperature(handle, _NVML_TEMPERATURE_GPU)),
        ):
            try:
                sample[key] = float(read())
            except Exception:
                continue
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        if reasons is not None:
            try:
                self.throttle_mask |= int(reasons(handle))
            except Exception:
                pass
        self.samples.append(sample)

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> GpuMonitor:
        self._open()
        if self.unavailable is None:
            self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()  # the state at the end of the timed region too

    def summary(self) -> dict[str, Any]:
        """Min/median/max of each sampled quantity, the static limits, and the throttle reasons seen."""
        if self.unavailable is not None:
            return {"unavailable": self.unavailable}
        out: dict[str, Any] = {"samples": len(self.samples), "interval_s": self.interval_s, **self.static}
        for key in ("sm_clock_mhz", "power_w", "temperature_c"):
            out[key] = _stats([s[key] for s in self.samples if key in s])
        clock, top = out["sm_clock_mhz"], self.static.get("max_sm_clock_mhz")
        out["clock_ratio"] = clock["median"] / top if clock and top else None
        # gpu_idle between timed steps is expected (host gaps), so it is reported but not a slowdown.
        out["throttle_reasons"] = [name for bit, name in THROTTLE_REASONS.items() if self.throttle_mask & bit]
        return out


def gpu_telemetry_unavailable(device_type: str) -> dict[str, Any]:
    return {"unavailable": f"not a CUDA device ({device_type})"}
