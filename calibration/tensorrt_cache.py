"""TensorRT's IInt8Calibrator cache, as text: how our ranges reach TensorRT 8.x's implicit INT8 path.

The format TensorRT writes and reads back (``writeCalibrationCache`` / ``readCalibrationCache``)::

    TRT-8601-EntropyCalibration2
    input: 3c010204
    /conv1/Conv_output_0: 3d1a2b3c

The header names the TensorRT version (``NV_TENSORRT_VERSION``: 8601 for 8.6.1, 100300 for
10.3.0) and the calibrator algorithm, which TensorRT compares with its calibrator's. Each line is
a tensor name and its scale, amax / 127, as the hex digits of the big-endian IEEE float32 (we
always write 8; TensorRT omits leading zeros, so the reader accepts fewer).
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json, atomic_write_text

DEFAULT_VERSION = 8601  # TensorRT 8.6.1, the newest 8.x (JetPack 6.0); pass the builder's own when known
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
INT8_MAX = 127.0
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_LINE = re.compile(r"^(.+): ([0-9a-fA-F]{1,8})$")  # TensorRT itself does not zero-pad


def algorithm_for(method: str) -> str:
    """The calibrator algorithm a cache of ``method`` ranges is read by: MinMax for minmax, otherwise
    EntropyCalibration2 (TensorRT has no percentile calibrator; any fixed ranges fit there)."""
    return "MinMaxCalibration" if method == "minmax" else "EntropyCalibration2"


def tensorrt_version_tag(version: str) -> int:
    """'8.6.1' -> 8601, '10.3.0' -> 100300: the number in a cache header (NV_TENSORRT_VERSION)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    major, minor, patch = (parts + [0, 0, 0])[:3]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def scale_hex(amax: float) -> str:
    """The 8 hex digits of float32(amax / 127), big-endian."""
    return struct.pack(">f", np.float32(amax / INT8_MAX)).hex()


def write_tensorrt_cache(ranges: dict[str, float], path: str | os.PathLike, *, algorithm: str = "EntropyCalibration2",
                         version: int = DEFAULT_VERSION) -> Path:
    """Write one line per tensor of ``ranges`` (name -> amax > 0), in its order, atomically."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown TensorRT calibration algorithm {algorithm!r}; one of {ALGORITHMS}")
    lines = [f"TRT-{int(version)}-{algorithm}"]
    for name, amax in ranges.items():
        if not (np.isfinite(amax) and amax > 0):
            raise ValueError(f"tensor {name!r} has amax {amax}; a TensorRT scale must be finite and > 0")
        if "\n" in name:
            raise ValueError(f"tensor name {name!r} contains a newline")
        lines.append(f"{name}: {scale_hex(amax)}")
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_tensorrt_cache_header(path: str | os.PathLike) -> tuple[int, str]:
    """(version, algorithm) from a cache's first line."""
    version, algorithm, _ = _parse(Path(path))
    return version, algorithm


def read_tensorrt_scales(path: str | os.PathLike) -> dict[str, float]:
    """name -> scale (a float32 value, as a Python float) for every line of the cache."""
    return _parse(Path(path))[2]


def read_tensorrt_cache(path: str | os.PathLike) -> dict[str, float]:
    """name -> amax = scale * 127 (computed exactly in float64 from the float32 scale)."""
    return {name: scale * INT8_MAX for name, scale in read_tensorrt_scales(path).items()}


def _parse(path: Path) -> tuple[int, str, dict[str, float]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read TensorRT calibration cache {path} ({type(e).__name__})",
                         "re-run 'rexport quantize --precision int8 --force'") from None
    lines = text.splitlines()
    header = _HEADER.match(lines[0].strip()) if lines else None
    if header is None or header.group(2) not in ALGORITHMS:
        raise InputError(f"{path} is not a TensorRT calibration cache (first line {lines[0][:60] if lines else ''!r})",
                         "re-run 'rexport quantize --precision int8 --force'")
    scales: dict[str, float] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        m = _LINE.match(line.rstrip())
        if m is None:
            raise InputError(f"{path}:{n}: not a 'tensor: hexscale' line: {line[:80]!r}", "re-run 'rexport quantize --precision int8 --force'")
        scales[m.group(1)] = float(struct.unpack(">f", bytes.fromhex(m.group(2).zfill(8)))[0])
    return int(header.group(1)), header.group(2), scales


COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")   # weighted ops: what the per-layer intent is about
# Ops a quantized value passes through unchanged in scale; TensorRT propagates DQ past them (explicit mode).
SCALE_PRESERVING = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast")
LAYERS_SUFFIX = ".layers.json"      # <key>.int8.tensorrt.cache -> <key>.int8.tensorrt.cache.layers.json


def _qdq_graph(qdq_onnx):
    import onnx

    graph = onnx.load(str(qdq_onnx), load_external_data=False).graph
    made_by = {o: n for n in graph.node for o in n.output}
    used_by: dict[str, list] = {}
    for n in graph.node:
        for i in n.input[:1]:
            used_by.setdefault(i, []).append(n)
    return graph, made_by, used_by


def _through_casts(name: str, made_by: dict) -> str:
    while name in made_by and made_by[name].op_type == "Cast":
        name = made_by[name].input[0]
    return name


def quantized_tensors(qdq_onnx: str | os.PathLike) -> dict[str, str]:
    """The activation tensors a Q/DQ file quantizes, named as in the FP32 graph, each mapped to the tensor
    whose scale it carries: a QuantizeLinear input (not a weight; through any Cast the FP16-float form adds)
    carries its own, and the outputs of scale-preserving ops after its DequantizeLinear (MaxPool, Flatten...)
    carry the same one, as TensorRT's explicit quantization propagates it."""
    graph, made_by, used_by = _qdq_graph(qdq_onnx)
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    carries: dict[str, str] = {}
    for q in graph.node:
        src = _through_casts(q.input[0], made_by) if q.op_type == "QuantizeLinear" else None
        if src is None or src in weights:
            continue
        carries[src] = src
        frontier = [o for dq in used_by.get(q.output[0], []) if dq.op_type == "DequantizeLinear" for o in dq.output]
        while frontier:
            for n in used_by.get(frontier.pop(), []):
                if n.op_type in SCALE_PRESERVING:
                    for out in n.output:
                        if out not in carries:
                            carries[out] = src
                            frontier.append(out)
    return carries


def layer_intent(qdq_onnx: str | os.PathLike) -> dict:
    """What the file means per weighted node (named as in the FP32 graph and TensorRT's network): 'int8' when
    its data input and its weights come from a DequantizeLinear (through scale-preserving ops), else the
    file's float precision (fp16 when it has FP16 parts)."""
    import onnx

    graph, made_by, _ = _qdq_graph(qdq_onnx)
    half = onnx.TensorProto.FLOAT16
    float_parts = "fp16" if any(i.data_type == half for i in graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute) for n in graph.node) else "fp32"
    def dequantized(name: str) -> bool:
        src = made_by.get(name)
        while src is not None and src.op_type in SCALE_PRESERVING:
            src = made_by.get(src.input[0])
        return src is not None and src.op_type == "DequantizeLinear"

    # INT8 needs both the data and the weights dequantized (a DQ before a float-weight Gemm stays a DQ).
    layers = {node.name: "int8" if len(node.input) > 1 and dequantized(node.input[0]) and dequantized(node.input[1])
              else float_parts for node in graph.node if node.op_type in COMPUTE_OPS}
    return {"file": Path(qdq_onnx).name, "int8_float": float_parts, "layers": layers}


def write_tensorrt_cache_for_file(full_cache: str | os.PathLike, qdq_onnx: str | os.PathLike,
                                  path: str | os.PathLike) -> dict:
    """The calibration cache for one Q/DQ file, so that TensorRT 8.x's weak-typed INT8 quantizes what the file
    quantizes and nothing else: a line per tensor of ``quantized_tensors`` with the scale of ``full_cache`` (every
    calibrated tensor) it carries; and beside it (``<path>.layers.json``) the file's per-layer intent, which the
    build pins float layers by (a tensor shared by a quantized and a float consumer keeps its scale, so the
    cache alone cannot say that). Returns what was kept and left out. A quantized tensor without a range is an
    InputError."""
    version, algorithm, _ = _parse(Path(full_cache))
    lines = Path(full_cache).read_text(encoding="utf-8").splitlines()[1:]
    scale_of = {m.group(1): m.group(2) for line in lines if (m := _LINE.match(line.rstrip()))}
    carries = quantized_tensors(qdq_onnx)
    missing = sorted({src for src in carries.values() if src not in scale_of})
    if missing:
        raise InputError(f"{Path(qdq_onnx).name} quantizes {len(missing)} tensor(s) the calibration has no range "
                         f"for (first: {missing[0]!r})", "re-run 'rexport quantize --precision int8 --force'")
    path = Path(path)
    layers_path = path.with_name(path.name + LAYERS_SUFFIX)
    intent = layer_intent(qdq_onnx)
    atomic_write_json(layers_path, intent)
    body = [f"{name}: {scale_of[src]}" for name, src in carries.items()]
    atomic_write_text(path, "\n".join([f"TRT-{version}-{algorithm}", *body]) + "\n")
    return {"path": path, "layers_path": layers_path, "kept": len(carries),
            "left_out": [t for t in scale_of if t not in carries], "int8_float": intent["int8_float"]}
