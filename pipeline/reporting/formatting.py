"""How every number of the report is written: the one place, so report.json/md/html and the
summary table of ``rexport run`` agree digit for digit."""
from __future__ import annotations

from typing import Any, Callable

BACKEND_NAMES = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT",
                 "openvino": "OpenVINO"}
PREFERRED_LATENCY_BATCH = 1
PREFERRED_THROUGHPUT_BATCH = 8

_PERCENT = "{:.2%}".format
_SCI = "{:.3e}".format
FORMATS: dict[str, Callable[[Any], str]] = {
    "size_mib": "{:.1f}".format,
    "max_abs": _SCI, "max_rel": _SCI, "rel_to_range": _SCI, "rel_error": _SCI,
    "cosine_min": "{:.6f}".format, "cosine_mean": "{:.6f}".format, "cosine": "{:.6f}".format,
    "top1_agreement": _PERCENT, "top5_agreement": _PERCENT,
    "accuracy_top1": _PERCENT, "accuracy_top5": _PERCENT, "top1": _PERCENT, "top5": _PERCENT,
    "drop_top1_vs_reference": lambda v: f"{v * 100:+.2f} pp",
    "p50_ms": "{:.3f}".format, "p90_ms": "{:.3f}".format, "p99_ms": "{:.3f}".format,
    "mean_ms": "{:.3f}".format, "std_ms": "{:.3f}".format, "min_ms": "{:.3f}".format,
    "images_per_s": "{:.1f}".format, "speedup_vs_pytorch": "{:.2f}x".format,
    "percent_of_probe": "{:.1f}%".format,   # of this machine's probe convolution (rexport.core.machine)
}


def fmt(field: str, value: Any) -> str:
    """How ``value`` of ``field`` is written in every table: '-' when it was not measured."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, (int, float)) and field in FORMATS:
        return FORMATS[field](value)
    return str(value)
