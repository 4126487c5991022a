"""The benchmark's GPU telemetry sampler: statistics, limits, throttle reasons and graceful absence.

NVML needs an NVIDIA driver, so the sampler is fed by a scripted stand-in with pynvml's function names; the
statistics are checked against values computed by hand from the script.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from erw_fast.bench.gpu_monitor import GpuMonitor


class ScriptedNvml:
    """pynvml's calls used by GpuMonitor, answering from fixed sequences (the last value repeats)."""

    def __init__(self, clocks, powers_mw, temps, reasons=(0,), fail_init=False):
        self.clocks, self.powers, self.temps, self.reasons = list(clocks), list(powers_mw), list(temps), list(reasons)
        self.fail_init = fail_init
        self.lock = threading.Lock()
        self.calls = 0

    @staticmethod
    def _next(seq):
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("Driver Not Loaded")

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        assert kind == 1  # NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetClockInfo(self, handle, kind):
        with self.lock:
            self.calls += 1
            return self._next(self.clocks)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._next(self.powers)

    def nvmlDeviceGetTemperature(self, handle, kind):
        return self._next(self.temps)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self._next(self.reasons)


def test_summary_statistics_match_the_samples():
    clocks = [1980, 1755, 1410, 1980, 1620]
    nvml = ScriptedNvml(clocks, [650_000, 700_000, 690_000, 500_000, 710_000], [60, 61, 62, 63, 64], [0, 0x4, 0x40])
    monitor = GpuMonitor(3, interval_s=0.001, nvml=nvml)
    with monitor:
        while nvml.calls < len(clocks):
            time.sleep(0.001)
    summary = monitor.summary()
    seen = [s["sm_clock_mhz"] for s in monitor.samples]
    assert seen[: len(clocks)] == clocks and set(seen[len(clocks) :]) <= {1620.0}  # the last value repeats
    assert summary["samples"] == len(seen) >= len(clocks)
    assert summary["sm_clock_mhz"] == {"min": 1410, "median": statistics.median(seen), "max": 1980}
    assert summary["power_w"]["max"] == 710.0 and summary["power_w"]["min"] == 500.0
    assert summary["max_sm_clock_mhz"] == 1980 and summary["power_limit_w"] == 700.0
    assert summary["clock_ratio"] == pytest.approx(statistics.median(seen) / 1980)
    assert summary["throttle_reasons"] == ["sw_power_cap", "hw_thermal_slowdown"]


def test_missing_nvml_is_reported_not_raised():
    monitor = GpuMonitor(0, nvml=ScriptedNvml([1], [1], [1], fail_init=True))
    with monitor:
        pass
    assert monitor.summary() == {"unavailable": "NVML not usable: RuntimeError: Driver Not Loaded"}


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        GpuMonitor(0, interval_s=0)
