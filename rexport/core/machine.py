"""Which machine a figure was measured on: the CPU's identity and ISA, and what its probe measured.

Two machines that both say "AMD EPYC, 2 cores" gave 2.2x different absolute figures for the same
commands, so the model name alone does not identify a machine. Every results file, report and sidecar
carries this fingerprint, and tables lead with ratios measured in the same run. A short probe (the best
of three ResNet-shaped convolutions in FP32 and as INT8 Q/DQ, compiled by OpenVINO, cached per machine)
measures the peak this CPU reaches on such kernels: throughput is also reported as a percent of it. It is
a measured peak, not a datasheet one; a network with cheaper layers around its convolutions stays below it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path

from rexport.core.errors import first_line

# The ISA features that decide CNN inference speed on x86 (FP32 FMA width, INT8 dot products, BF16, AMX)
# and their Arm counterparts.
FINGERPRINT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                     "amx_bf16", "asimd", "asimddp", "sve", "bf16", "i8mm")
PROBE_VERSION = 3


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


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: a pinned container, Ray task or test worker has
    fewer than the machine's count)."""
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
        "cores_usable": usable_cores(),
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


#: The probe's kernels: convolutions of the shapes ResNets are made of (a 1x1 at 56x56, 3x3s at 28x28 and
#: 14x14), each compiled on its own; the probe is the best of them. A 3x3 convolution whose input stays in
#: cache runs oneDNN's densest kernels (measured here: 1.2-2.1x the 1x1's figure), so a single 1x1
#: yardstick let whole networks show "over 100%" of it.
PROBE_SHAPES = ((512, 56, 1), (256, 28, 3), (512, 14, 3))


def _conv_onnx(channels: int, size: int, kernel: int, int8: bool) -> bytes:
    """A ``kernel`` x ``kernel`` convolution, ``channels`` -> ``channels`` at ``size`` x ``size``, plain FP32 or
    as explicit Q/DQ (the form our INT8 files take, u8 activations after a ReLU), for OpenVINO to compile."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((channels, channels, kernel, kernel)).astype(np.float32) * 0.05
    inits = [numpy_helper.from_array(w, "w")]
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    src, weight = "r", "w"
    if int8:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
                  numpy_helper.from_array(np.array(0, np.uint8), "xz"),
                  numpy_helper.from_array(np.full((channels,), 0.001, np.float32), "ws"),
                  numpy_helper.from_array(np.zeros((channels,), np.int8), "wz")]
        nodes += [helper.make_node("QuantizeLinear", ["r", "xs", "xz"], ["rq"]),
                  helper.make_node("DequantizeLinear", ["rq", "xs", "xz"], ["rd"]),
                  helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0)]
        src, weight = "rd", "wd"
    nodes.append(helper.make_node("Conv", [src, weight], ["y"], pads=[kernel // 2] * 4))
    shape = [1, channels, size, size]
    graph = helper.make_graph(nodes, "peak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _probe_conv(int8: bool, channels: int, size: int, kernel: int) -> float:
    """G(FL)OP/s of one convolution compiled by OpenVINO on all usable cores (VNNI/AMX where present)."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(_conv_onnx(channels, size, kernel, int8), b""), "CPU",
                                  {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    req = compiled.create_infer_request()
    x = np.random.default_rng(1).standard_normal((1, channels, size, size)).astype(np.float32)
    sec = _time_best(lambda: req.infer({0: x}), repeats=10, min_time=0.5)
    return 2.0 * channels * channels * kernel * kernel * size * size / sec / 1e9


def _probe(int8: bool) -> tuple[float, str]:
    """The best figure over PROBE_SHAPES, and which shape gave it."""
    figures = {f"{k}x{k} {c}ch @{s}": _probe_conv(int8, c, s, k) for c, s, k in PROBE_SHAPES}
    best = max(figures, key=figures.get)
    return figures[best], best


def _load_1m() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _busy(load: float | None, cores: int) -> bool:
    return bool(load is not None and load > 0.5 * max(1, cores))


def measured_peaks(*, refresh: bool = False) -> dict:
    """FP32 GFLOP/s and INT8 GOP/s of the probe (the best of PROBE_SHAPES) on this CPU, measured once per
    machine and cached.

    A figure measured while the machine was busy is cached marked ``busy`` and measured again only once the
    machine is quiet, so a busy machine pays for the probe once, not at every bench. A probe that fails (no
    OpenVINO, say) is recorded with its reason, never replaced by a datasheet figure.
    """
    ident = cpu_identity()
    path = _cache_dir() / f"peaks-{machine_id(ident)}.json"
    if not refresh and path.is_file():
        try:
            doc = json.loads(path.read_text())
            if doc.get("probe_version") == PROBE_VERSION and (
                    not doc.get("busy") or _busy(_load_1m(), ident["cores_usable"])):
                return {**doc, "cached": True}
        except (OSError, ValueError):
            pass
    doc: dict = {"probe_version": PROBE_VERSION, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "loadavg_1m": _load_1m(),
                 "method": "best call of the best of three convolutions (1x1 512ch @56, 3x3 256ch @28, 3x3 512ch "
                           "@14), FP32 and as INT8 Q/DQ, each compiled by OpenVINO CPU on all usable cores "
                           "(at least 0.5 s each)"}
    for key, int8 in (("fp32_gflops", False), ("int8_gops", True)):
        try:
            figure, doc[f"{key}_kernel"] = _probe(int8)
            doc[key] = round(figure, 1)
        except Exception as e:  # recorded, not hidden: the fingerprint says which figure is missing and why
            doc[key] = None
            doc[f"{key}_error"] = f"{type(e).__name__}: {first_line(e)}"
    doc["busy"] = _busy(doc["loadavg_1m"], ident["cores_usable"])  # other work competed with the probe
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


def percent_of_probe(ops_per_image: float, images_per_s: float, peak_gops: float | None) -> float | None:
    """A throughput figure as a percent of the probe's (None where no probe was measured)."""
    if not peak_gops or not images_per_s:
        return None
    return 100.0 * ops_per_image * images_per_s / (peak_gops * 1e9)
