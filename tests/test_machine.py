"""The machine fingerprint and its probe cache: real OpenVINO probes, a real cache folder."""
from __future__ import annotations

import json
import os

from rexport.core import machine


def test_probe_is_measured_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("REXPORT_CACHE_DIR", str(tmp_path))
    first = machine.measured_peaks()
    assert first["cached"] is False and first["fp32_gflops"] > 0 and first["int8_gops"] > 0
    again = machine.measured_peaks()
    if not first["busy"] or machine._busy(machine._load_1m(), machine.cpu_identity()["cores_usable"]):
        assert again["cached"] is True and again["fp32_gflops"] == first["fp32_gflops"]
    fp = machine.machine_fingerprint(probe=False)
    assert fp["id"] == machine.machine_id() and fp["peaks"]["probe_version"] == machine.PROBE_VERSION


def test_a_busy_figure_is_measured_again_once_the_machine_is_quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("REXPORT_CACHE_DIR", str(tmp_path))
    path = tmp_path / f"peaks-{machine.machine_id()}.json"
    path.write_text(json.dumps({"probe_version": machine.PROBE_VERSION, "busy": True,
                                "fp32_gflops": -1.0, "int8_gops": -1.0}))
    cores = machine.cpu_identity()["cores_usable"]
    before = machine._busy(os.getloadavg()[0], cores)
    got = machine.measured_peaks()
    busy_now = machine._busy(os.getloadavg()[0], cores)
    if before != busy_now:  # the load crossed the line while we looked: nothing to judge this time
        return
    assert got["cached"] is busy_now                          # busy now: the busy figure serves
    assert (got["fp32_gflops"] == -1.0) is busy_now            # quiet now: measured again
