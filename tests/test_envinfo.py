"""erw_fast.envinfo: the one device and version report behind every benchmark and output file."""

import sys

import torch

from erw_fast import envinfo


def test_cpu_device_report():
    info = envinfo.device_info("cpu")
    assert info["type"] == "cpu" and info["peak_bf16_tflops"] is None and info["threads"] >= 1
    assert info["name"] == envinfo.device_name(torch.device("cpu")) == envinfo.cpu_name() != ""


def test_versions_report_what_ran():
    v = envinfo.versions("erw_fast_no_such_module")
    assert v["torch"] == torch.__version__ and v["cuda"] == torch.version.cuda and v["python"] and v["platform"]
    assert v["erw_fast_no_such_module"] is None
    assert "numpy" in sys.modules and envinfo.module_version("numpy") is not None  # imported: reported
    assert envinfo.module_version("erw_fast_no_such_module", import_missing=True) is None


def test_peak_table_matches_the_most_specific_name():
    assert envinfo.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert envinfo.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert envinfo.peak_bf16_tflops("cpu") is None
