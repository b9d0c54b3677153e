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
LAYERS_SUFFIX = ".layers.json"      # <key>.int8.tensorrt.cache -> <key>.int8.tensorrt.cache.layers.json


def _qdq_graph(qdq_onnx):
    import onnx

    graph = onnx.load(str(qdq_onnx), load_external_data=False).graph
    made_by = {o: n for n in graph.node for o in n.output}

    def through_casts(name: str) -> str:
        while name in made_by and made_by[name].op_type == "Cast":
            name = made_by[name].input[0]
        return name

    return graph, made_by, through_casts


def quantized_tensors(qdq_onnx: str | os.PathLike) -> list[str]:
    """The activation tensors a Q/DQ ONNX file quantizes (inputs of its QuantizeLinear nodes that are not
    weights), named as in the FP32 graph: through any Cast the FP16-float form puts before a Q."""
    graph, _, through_casts = _qdq_graph(qdq_onnx)
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    found: dict[str, None] = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and through_casts(node.input[0]) not in weights:
            found[through_casts(node.input[0])] = None
    return list(found)


def layer_intent(qdq_onnx: str | os.PathLike) -> dict:
    """What the file means per weighted node (named as in the FP32 graph and TensorRT's network): 'int8' when
    its data input comes from a DequantizeLinear, else the file's float precision (fp16 when it has FP16 parts)."""
    import onnx

    graph, made_by, through_casts = _qdq_graph(qdq_onnx)
    half = onnx.TensorProto.FLOAT16
    float_parts = "fp16" if any(i.data_type == half for i in graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute) for n in graph.node) else "fp32"
    layers = {}
    for node in graph.node:
        if node.op_type in COMPUTE_OPS:
            src = made_by.get(through_casts(node.input[0]))
            layers[node.name] = "int8" if src is not None and src.op_type == "DequantizeLinear" else float_parts
    return {"file": Path(qdq_onnx).name, "int8_float": float_parts, "layers": layers}


def write_tensorrt_cache_for_file(full_cache: str | os.PathLike, qdq_onnx: str | os.PathLike,
                                  path: str | os.PathLike) -> dict:
    """The calibration cache for one Q/DQ file: the lines of ``full_cache`` (every calibrated tensor) of the
    tensors the file quantizes, verbatim, so TensorRT 8.x's weak-typed INT8 leaves the rest in float; and beside
    it (``<path>.layers.json``) the file's per-layer intent, which the build pins float layers by (a tensor
    shared by a quantized and a float consumer keeps its scale, so the cache alone cannot say that).
    Returns what was kept and left out. A tensor the file quantizes without a range is an InputError."""
    version, algorithm, _ = _parse(Path(full_cache))
    lines = Path(full_cache).read_text(encoding="utf-8").splitlines()[1:]
    by_name = {m.group(1): line for line in lines if (m := _LINE.match(line.rstrip()))}
    wanted = quantized_tensors(qdq_onnx)
    missing = [t for t in wanted if t not in by_name]
    if missing:
        raise InputError(f"{Path(qdq_onnx).name} quantizes {len(missing)} tensor(s) the calibration has no range "
                         f"for (first: {missing[0]!r})", "re-run 'rexport quantize --precision int8 --force'")
    kept = set(wanted)
    path = Path(path)
    intent = layer_intent(qdq_onnx)
    atomic_write_json(path.with_name(path.name + LAYERS_SUFFIX), intent)
    atomic_write_text(path, "\n".join([f"TRT-{version}-{algorithm}"] + [by_name[t] for t in wanted]) + "\n")
    return {"path": path, "layers_path": path.with_name(path.name + LAYERS_SUFFIX), "kept": len(kept),
            "left_out": [t for t in by_name if t not in kept], "int8_float": intent["int8_float"]}
