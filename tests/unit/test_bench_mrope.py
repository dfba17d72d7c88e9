"""tools/bench/mrope.py's JSON records (GB/s, fraction of peak HBM bandwidth, ratios) and its peak
bandwidth table; the timing itself needs a GPU (tools/gpu_acceptance.sh runs it there)."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mrope", os.path.join(ROOT, "tools", "bench", "mrope.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, tbs", [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0),
                                       ("NVIDIA H200", 4.8), ("NVIDIA H20", 4.0), ("Some GPU", 0.0)])
def test_peak_bandwidth_by_device_name(bench, name, tbs):
    assert bench.peak_bandwidth_tbs(name) == tbs


def test_record_reports_gb_per_s_fraction_of_peak_and_ratios(bench):
    times = {"fused-cuda": 1e-3, "unfused": 4e-3}
    entry = bench.record("fused-cuda", 131072, 1e-3, 2_000_000_000, 4.8e12, times)
    assert entry["achieved_gb_per_s"] == pytest.approx(2000)
    assert entry["fraction_of_peak"] == pytest.approx(2000 / 4800)
    assert entry["speedup_vs"] == {"unfused": pytest.approx(4.0)}
    assert bench.record("unfused", 1, 1.0, 10, 0.0, times)["fraction_of_peak"] is None
