"""Facts about this machine and the installed tools, read without importing heavy packages."""
from __future__ import annotations

import ctypes
import functools
import platform
import sys
from importlib import metadata

TRACKED_PACKAGES = ("rexport", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxslim",
                    "onnxconverter-common", "openvino", "polygraphy", "tensorrt", "numpy")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni", "fma")  # shown in sidecars


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    """Installed versions of the tools whose numbers rexport reports; absent ones are left out."""
    return {n: v for n in TRACKED_PACKAGES if (v := package_version(n))}


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """The CPU as sidecars and results record it: model name plus family/model/stepping, ISA, cores."""
    from rexport.core.machine import cpu_identity, machine_id

    ident = cpu_identity()
    return {"model": ident["model_name"], "family": ident["family"], "model_id": ident["model"],
            "stepping": ident["stepping"], "cores": ident["cores_usable"], "arch": ident["arch"],
            "isa": [f for f in ISA_FLAGS if f in ident["isa"]], "machine_id": machine_id(ident)}


def cpu_has(flag: str) -> bool:
    return flag in cpu_info()["isa"]


def _cuda_driver():
    """The CUDA driver library, or None. Without it neither TensorRT nor torch.cuda can see a GPU."""
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=4)
def cuda_gpu(index: int = 0) -> tuple[dict | None, str | None]:
    """(device facts, None) for CUDA device ``index``, or (None, why not); through the CUDA driver
    API with ctypes, so it needs neither torch nor cuda-python and creates no CUDA context."""
    lib = _cuda_driver()
    if lib is None:
        return None, "no NVIDIA driver: libcuda.so.1 not found"
    rc = lib.cuInit(0)
    if rc != 0:
        why = {100: "no CUDA-capable device", 999: "unknown error", 35: "driver too old",
               803: "driver/runtime mismatch"}.get(rc, "error")
        return None, f"cuInit failed with CUDA error {rc} ({why})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        return None, f"the NVIDIA driver sees {count.value} CUDA device(s)"
    dev, major, minor, integrated, drv = (ctypes.c_int(0) for _ in range(5))
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGet(ctypes.byref(dev), index)
    lib.cuDeviceGetName(name, 256, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)       # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)       # ..._MINOR
    lib.cuDeviceGetAttribute(ctypes.byref(integrated), 18, dev)  # CU_DEVICE_ATTRIBUTE_INTEGRATED (Jetson)
    lib.cuDriverGetVersion(ctypes.byref(drv))
    return {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}",
            "integrated": bool(integrated.value),
            "cuda_driver": f"{drv.value // 1000}.{(drv.value % 1000) // 10}"}, None


def cuda_device() -> dict | None:
    """The first CUDA device's facts (name, compute capability, driver), or None."""
    return cuda_gpu()[0]


def environment() -> dict:
    from rexport.core.machine import machine_fingerprint

    return {"cpu": cpu_info(), "gpu": cuda_device(), "python": platform.python_version(),
            "os": platform.platform(), "versions": versions(), "machine": machine_fingerprint(probe=False)}
