"""Facts about this machine and the installed tools, read without importing heavy packages."""
from __future__ import annotations

import functools
import os
import platform
from importlib import metadata

TRACKED_PACKAGES = ("rexport", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxslim",
                    "onnxconverter-common", "openvino", "polygraphy", "tensorrt", "numpy")
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni", "fma")


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
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("unknown", "", platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "arch": platform.machine(),
            "isa": [f for f in ISA_FLAGS if f in flags]}


def cpu_has(flag: str) -> bool:
    return flag in cpu_info()["isa"]


def cuda_device() -> dict | None:
    """The first CUDA device as {name, compute_capability}, or None. Imports torch lazily."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda}


def environment() -> dict:
    return {"cpu": cpu_info(), "gpu": cuda_device(), "python": platform.python_version(),
            "os": platform.platform(), "versions": versions()}
