"""Deployment layouts over the same variants and sidecars: one table of formats (what each server
can hold, checked up front), one writer module per server, and a loader per layout for
``rexport infer BUNDLE_DIR IMAGE``."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from rexport.core.errors import InputError


@dataclass(frozen=True)
class Format:
    name: str
    server: str
    kinds: tuple[str, ...]                      # onnx / openvino / tensorrt variants it can hold
    why_not: dict[str, str] = field(default_factory=dict)
    module: str | None = None                   # rexport.pipeline.deploy.<module>; None: the folder bundle
    tensorrt_onnx: bool = False                 # its ONNX variants are compiled by TensorRT


FORMATS = {
    "folder": Format("folder", "rexport's run_engine.py", ("onnx", "openvino", "tensorrt")),
    "triton": Format("triton", "Triton Inference Server", ("onnx", "openvino", "tensorrt"), module="triton"),
    "deepstream": Format("deepstream", "DeepStream nvinfer", ("onnx", "tensorrt"),
                         {"openvino": "nvinfer runs TensorRT engines only"}, module="deepstream", tensorrt_onnx=True),
    "ovms": Format("ovms", "OpenVINO Model Server", ("onnx", "openvino"),
                   {"tensorrt": "OVMS runs OpenVINO only (a TensorRT plan goes to --format triton or deepstream)"},
                   module="ovms"),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise InputError(f"unknown bundle format {name!r}", f"use one of: {', '.join(FORMATS)}")
    return FORMATS[name]


def tensorrt_compiles(onnx_variant: str) -> bool:
    """Whether TensorRT is meant to compile this ONNX variant (not the OpenVINO-form ``int8-openvino``)."""
    return not onnx_variant.endswith("-openvino")


def refusal(fmt: Format, variant: str, kind: str) -> str | None:
    """Why ``fmt`` cannot hold ``variant`` (of ``kind``), or None."""
    if kind not in fmt.kinds:
        return fmt.why_not.get(kind, f"{fmt.server} cannot serve {kind} models")
    if kind == "onnx" and fmt.tensorrt_onnx and not tensorrt_compiles(variant):
        return "it is the OpenVINO-form INT8 ONNX; TensorRT compiles the TensorRT-form 'int8'"
    return None


def check_variants(fmt: Format, variants: list[str], kinds: dict[str, str]) -> None:
    """One InputError naming every variant the format cannot hold, before anything is written."""
    bad = [(v, r) for v in variants if (r := refusal(fmt, v, kinds[v]))]
    if bad:
        fits = [v for v in kinds if not refusal(fmt, v, kinds[v])]
        raise InputError(f"--format {fmt.name} cannot hold " + "; ".join(f"{v} ({r})" for v, r in bad),
                         f"bundle one of: {', '.join(fits) or 'none in this run'}, or use another --format")


def writer(fmt: Format):
    return importlib.import_module(f"rexport.pipeline.deploy.{fmt.module}")


def detect_format(root: Path) -> str | None:
    """The format a bundle folder was written in (from bundle.json), None when it is not a bundle."""
    import json

    path = Path(root) / "bundle.json"
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("format") or "folder")
    except ValueError:
        raise InputError(f"{path} is corrupt (not JSON)", "bundle again") from None
