"""Which machine a figure was measured on: the CPU's identity and ISA, and its measured peaks.

Two machines that both say "AMD EPYC, 2 cores" gave 2.2x different absolute figures for the same
commands, so the model name alone does not identify a machine. Every results file, report and sidecar
carries this fingerprint, and tables lead with ratios measured in the same run; the measured FP32 and
INT8 peaks (a short GEMM probe, cached per machine) turn absolute figures into "% of this CPU's peak".
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path

# The ISA features that decide CNN inference speed on x86 (FP32 FMA width, INT8 dot products, BF16, AMX)
# and their Arm counterparts.
FINGERPRINT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                     "amx_bf16", "asimd", "asimddp", "sve", "bf16", "i8mm")
PROBE_VERSION = 1


def _cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo (empty where there is none)."""
    facts: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    if facts:
                        break
                    continue
                key, _, value = line.partition(":")
                facts.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return facts


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def cpu_identity() -> dict:
    """CPU model name, vendor, family/model/stepping, microcode, ISA flags that matter, cores."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    ident = {
        "model_name": info.get("model name") or platform.processor() or "unknown",
        "vendor": info.get("vendor_id") or info.get("CPU implementer"),
        "family": info.get("cpu family"),
        "model": info.get("model") or info.get("CPU part"),
        "stepping": info.get("stepping") or info.get("CPU variant"),
        "microcode": info.get("microcode"),
        "arch": platform.machine(),
        "isa": [f for f in FINGERPRINT_FLAGS if f in flags],
        "cores_usable": _usable_cores(),
        "cpus_online": os.cpu_count(),
        "hypervisor": "hypervisor" in flags,
    }
    return ident


def machine_id(ident: dict | None = None) -> str:
    """A short stable id of the CPU identity (not of the host): the cache key of the peak probe."""
    ident = ident or cpu_identity()
    keys = ("model_name", "vendor", "family", "model", "stepping", "microcode", "arch", "isa", "cores_usable")
    return hashlib.sha256(json.dumps({k: ident.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    root = os.environ.get("REXPORT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rexport")
    return Path(root)


def _time_best(fn, *, repeats: int, min_time: float = 0.3) -> float:
    """Best seconds per call over repeated calls (the peak is what the machine can do, so take the best)."""
    fn()
    best = float("inf")
    t_end = time.perf_counter() + min_time
    n = 0
    while n < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def _probe_fp32(n: int = 1024) -> float:
    """GFLOP/s of a square FP32 GEMM through numpy's BLAS (FMA-bound at this size)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    sec = _time_best(lambda: a @ b, repeats=5)
    return 2.0 * n ** 3 / sec / 1e9


def _int8_gemm_onnx(m: int, k: int, n: int) -> bytes:
    """An INT8 GEMM as explicit Q/DQ ONNX (the form our INT8 files take), for OpenVINO to compile."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(np.full((n,), 0.02, np.float32), "ws"),
             numpy_helper.from_array(np.zeros((n,), np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=1),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "int8_peak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def _probe_int8(m: int = 512, k: int = 2048, n: int = 2048) -> float:
    """GOP/s of an INT8 GEMM compiled by OpenVINO (VNNI/AMX where the CPU has them), all cores."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(_int8_gemm_onnx(m, k, n), b""), "CPU",
                                  {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    x = np.abs(np.random.default_rng(1).standard_normal((m, k))).astype(np.float32)
    sec = _time_best(lambda: req.infer({0: x}), repeats=5)
    return 2.0 * m * k * n / sec / 1e9


def measured_peaks(*, refresh: bool = False) -> dict:
    """FP32 GFLOP/s and INT8 GOP/s this CPU reaches on a plain GEMM, measured once per machine and cached.

    A probe that fails (no OpenVINO, say) is recorded with its reason, never replaced by a datasheet figure.
    """
    ident = cpu_identity()
    path = _cache_dir() / f"peaks-{machine_id(ident)}.json"
    if not refresh and path.is_file():
        try:
            doc = json.loads(path.read_text())
            if doc.get("probe_version") == PROBE_VERSION:
                return {**doc, "cached": True}
        except (OSError, ValueError):
            pass
    doc: dict = {"probe_version": PROBE_VERSION, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                 "method": "best of repeated square FP32 GEMM (numpy BLAS, n=1024) and INT8 Q/DQ GEMM "
                           "(OpenVINO CPU, 512x2048x2048), all usable cores"}
    for key, probe in (("fp32_gflops", _probe_fp32), ("int8_gops", _probe_int8)):
        try:
            doc[key] = round(probe(), 1)
        except Exception as e:  # recorded, not hidden: the fingerprint says which peak is missing and why
            doc[key] = None
            doc[f"{key}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass
    return {**doc, "cached": False}


def machine_fingerprint(*, probe: bool = True) -> dict:
    """What every results file, report and sidecar records about the machine its figures come from.

    With ``probe=False`` the peaks are included only when already cached (no work is done).
    """
    ident = cpu_identity()
    fp = {"id": machine_id(ident), "cpu": ident, "hostname_hash": hashlib.sha256(
        platform.node().encode()).hexdigest()[:8]}
    if probe:
        fp["peaks"] = measured_peaks()
    else:
        path = _cache_dir() / f"peaks-{machine_id(ident)}.json"
        if path.is_file():
            try:
                fp["peaks"] = {**json.loads(path.read_text()), "cached": True}
            except (OSError, ValueError):
                pass
    return fp


def percent_of_peak(ops_per_image: float, images_per_s: float, peak_gops: float | None) -> float | None:
    """The share of the measured peak a throughput figure represents (None where no peak was measured)."""
    if not peak_gops or not images_per_s:
        return None
    return 100.0 * ops_per_image * images_per_s / (peak_gops * 1e9)
