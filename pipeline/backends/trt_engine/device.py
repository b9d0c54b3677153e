"""This machine: TensorRT's import, the CUDA device's facts and a Jetson's board facts. Device memory and
streams come from polygraphy's CUDA wrapper (``polygraphy.cuda``, ctypes over whatever libcudart is
installed: pip wheel, CUDA toolkit or JetPack); events, graphs and device facts use the same handle."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from .spec import TrtError


def import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:   # ImportError, or OSError when libnvinfer is missing
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrtError(f"tensorrt cannot be imported ({first})",
                       "pip install tensorrt (JetPack: apt install python3-libnvinfer)") from None
    return trt


def tensorrt_version() -> str:
    return import_tensorrt().__version__


def _cuda():
    try:
        from polygraphy import cuda
    except ImportError:
        raise TrtError("polygraphy's CUDA wrapper is missing (device memory for TensorRT)",
                       "pip install polygraphy") from None
    return cuda


def _ptr(value=None) -> ctypes.c_void_p:
    return ctypes.c_void_p(value)


class _Cudart:
    """cudart calls polygraphy's wrapper lacks (events, graphs, device facts), on its library handle."""

    def __init__(self) -> None:
        self.cuda = _cuda()
        self.lib = self.cuda.wrapper().handle

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"CUDA error {rc} in {what}")

    def attribute(self, attr: int, device: int = 0) -> int:
        v = ctypes.c_int(0)
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(v), attr, device), "cudaDeviceGetAttribute")
        return v.value

    def event(self) -> ctypes.c_void_p:
        e = _ptr()
        self.check(self.lib.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        return e

    def record(self, event, stream: int) -> None:
        self.check(self.lib.cudaEventRecord(event, _ptr(stream)), "cudaEventRecord")

    def elapsed_ms(self, start, end) -> float:
        ms = ctypes.c_float(0.0)
        self.check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime")
        return float(ms.value)


def cuda_device() -> dict:
    """Name, compute capability, integrated flag and driver version of CUDA device 0 (via cudart)."""
    rt = _Cudart()
    count = ctypes.c_int(0)
    if rt.lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        raise TrtError("no CUDA device: TensorRT needs an NVIDIA GPU")
    props = ctypes.create_string_buffer(8192)   # cudaDeviceProp begins with char name[256]
    rt.check(rt.lib.cudaGetDeviceProperties(props, 0), "cudaGetDeviceProperties")
    drv = ctypes.c_int(0)
    rt.lib.cudaDriverGetVersion(ctypes.byref(drv))
    facts = {"name": props.raw[:256].split(b"\0", 1)[0].decode(errors="replace"),
             "compute_capability": f"{rt.attribute(75)}.{rt.attribute(76)}",   # cudaDevAttrComputeCapabilityMajor/Minor
             "integrated": bool(rt.attribute(18)),                               # cudaDevAttrIntegrated (Jetson)
             "cuda_driver": f"{drv.value // 1000}.{(drv.value % 1000) // 10}"}
    return {**facts, **board_facts()} if facts["integrated"] else facts


def board_facts(root: str = "/") -> dict:
    """Jetson board model and JetPack version (for the DLA rules), from the device tree and dpkg's status."""
    out = {"platform": f"{sys.platform}-{os.uname().machine if hasattr(os, 'uname') else ''}"}
    try:
        out["board"] = Path(root, "proc/device-tree/model").read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        pass
    try:
        status = Path(root, "var/lib/dpkg/status").read_text(encoding="utf-8", errors="replace")
        for block in status.split("\n\n"):
            if "Package: nvidia-jetpack\n" in block + "\n":
                out["jetpack"] = next(line.split(":", 1)[1].strip() for line in block.splitlines()
                                      if line.startswith("Version:"))
    except (OSError, StopIteration):
        pass
    return out
