"""The Q/DQ writer: carries out a :class:`QdqPlan` on the FP32 graph with the calibrated ranges.

*INT8 weights.* Stored as FP32 initializer -> QuantizeLinear -> DequantizeLinear ("fake-quant"), not as
an INT8 initializer -> DequantizeLinear. TensorRT 10+ accepts both ("You can specify weights of Q/DQ
models using a high-precision data type ... or a low-precision quantized type", TensorRT docs, Explicit
Quantization), but the 8.x ONNX parser rejects an INT8 initializer feeding DequantizeLinear
("DequantizeLinear: only activation types allowed as input to this layer", microsoft/onnxruntime#14229 on
TRT 8.x), which is why ONNX Runtime's ``AddQDQPairToWeight`` and Optimum's TensorRT config exist. JetPack
5.1/6.0 ship TRT 8.5/8.6, so the portable form is the default; ``int8_weights=True`` writes the smaller
file for TRT >= 10 and OpenVINO. OpenVINO folds either form into INT8 weights (same speed, measured in
benchmarks/bench_int8_placement.py).

All tensor names of the FP32 model survive: Q/DQ only add tensors (``<t>_quantized``,
``<t>_dequantized``) and rewire the quantized consumers, so Conv/Add/Relu outputs can be compared layer
by layer between the FP32 and INT8 files (see :func:`quantized_layer_outputs`).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rexport.core.errors import InputError
from rexport.pipeline.quantization.onnx_io import (CHECK_BATCHES, NameSource, default_opset, like_info, load_onnx,
                                                   node_id, value_infos, write_checked)
from rexport.pipeline.quantization.qdq_plan import WEIGHTED_OPS, QdqSettings, plan_qdq

INT8_MAX = 127.0
# A zero range (a tensor or weight channel that is all zeros) still needs a positive scale: TensorRT's
# parser rejects scale <= 0. Any positive scale represents zeros exactly.
AMAX_FLOOR = 1e-8


@dataclass(frozen=True)
class QdqReport:
    path: Path
    size_bytes: int
    #: weighted layers (Conv/Gemm/MatMul) running in INT8, by node name
    quantized_nodes: tuple[str, ...]
    #: weighted layers and other nodes left in float (exclusions, first conv, classifier)
    excluded_nodes: tuple[str, ...]
    #: activation tensors with a Q/DQ pair, and the amax each was given
    activation_amax: Mapping[str, float]
    #: weight tensors with Q/DQ (or DQ only, with int8_weights)
    quantized_weights: tuple[str, ...]
    #: (layer name, output tensor name) of each quantized layer; the names are the FP32 model's
    layer_outputs: tuple[tuple[str, str], ...]
    #: activation Q/DQ pairs plus weight quantizers
    qdq_pairs: int
    settings: QdqSettings = field(default_factory=QdqSettings)
    checked_batches: tuple[int, ...] = CHECK_BATCHES



def insert_qdq(fp32_path: Path, ranges: Mapping[str, float], out_path: Path,
               settings: QdqSettings = QdqSettings()) -> QdqReport:
    """Write an explicitly quantized (symmetric INT8 Q/DQ) copy of the FP32 model.

    ``ranges`` maps activation tensor name -> amax (symmetric range); scale = amax / 127, zero point 0.
    """
    model = load_onnx(fp32_path)
    opset = default_opset(model)
    if opset < 13:
        raise InputError(f"{fp32_path} has opset {opset}; per-axis QuantizeLinear/DequantizeLinear need opset >= 13",
                         "re-export with opset 17")
    plan = plan_qdq(model, settings)
    graph = model.graph
    act_tensors = list(dict.fromkeys(graph.node[n].input[i] for n, i in plan.activation_edges))
    amax = _checked_ranges(act_tensors, ranges)

    names = NameSource(model)
    shapes = value_infos(model)
    inits = {i.name: i for i in graph.initializer}
    new_inits: list[TensorProto] = []
    new_infos: list[onnx.ValueInfoProto] = []
    qdq_nodes: dict[str, list[onnx.NodeProto]] = {}  # tensor -> [Q, DQ] or [DQ]
    replaced: dict[str, str] = {}  # tensor -> its dequantized name

    for t in act_tensors:
        scale = np.float32(max(amax[t], AMAX_FLOOR) / INT8_MAX)
        s = names.tensor(f"{t}_scale")
        z = names.tensor(f"{t}_zero_point")
        new_inits += [numpy_helper.from_array(np.array(scale, dtype=np.float32), s),
                      numpy_helper.from_array(np.array(0, dtype=np.int8), z)]
        q_out, dq_out = names.tensor(f"{t}_quantized"), names.tensor(f"{t}_dequantized")
        qdq_nodes[t] = [
            helper.make_node("QuantizeLinear", [t, s, z], [q_out], name=names.node(f"{t}_QuantizeLinear")),
            helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out], name=names.node(f"{t}_DequantizeLinear")),
        ]
        replaced[t] = dq_out
        if t in shapes:
            new_infos += [like_info(shapes[t], q_out, TensorProto.INT8), like_info(shapes[t], dq_out, TensorProto.FLOAT)]

    weight_names: list[str] = []
    for n, i, axis in plan.weight_edges:
        w_name = graph.node[n].input[i]
        if w_name in replaced:  # a weight shared by two layers: one quantizer
            continue
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        w_amax = _weight_amax(w, axis if settings.per_channel else None)
        scale = (np.maximum(w_amax, AMAX_FLOOR) / INT8_MAX).astype(np.float32)
        s = names.tensor(f"{w_name}_scale")
        z = names.tensor(f"{w_name}_zero_point")
        new_inits += [numpy_helper.from_array(scale, s),
                      numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), z)]
        dq_out = names.tensor(f"{w_name}_dequantized")
        axis_attr = {"axis": axis} if scale.ndim == 1 else {}
        if settings.int8_weights:
            bshape = [1] * w.ndim
            if scale.ndim == 1:
                bshape[axis] = -1
            q = np.clip(np.rint(w / scale.reshape(bshape)), -INT8_MAX, INT8_MAX).astype(np.int8)
            q_name = names.tensor(f"{w_name}_quantized")
            new_inits.append(numpy_helper.from_array(q, q_name))
            qdq_nodes[w_name] = [helper.make_node("DequantizeLinear", [q_name, s, z], [dq_out],
                                                  name=names.node(f"{w_name}_DequantizeLinear"), **axis_attr)]
        else:
            q_out = names.tensor(f"{w_name}_quantized")
            qdq_nodes[w_name] = [
                helper.make_node("QuantizeLinear", [w_name, s, z], [q_out],
                                 name=names.node(f"{w_name}_QuantizeLinear"), **axis_attr),
                helper.make_node("DequantizeLinear", [q_out, s, z], [dq_out],
                                 name=names.node(f"{w_name}_DequantizeLinear"), **axis_attr),
            ]
        replaced[w_name] = dq_out
        weight_names.append(w_name)

    # Rewire the planned edges and put each Q/DQ just before its first consumer (after its producer,
    # since the graph is topologically sorted).
    edges_by_node: dict[int, list[int]] = defaultdict(list)
    for n, i in plan.activation_edges:
        edges_by_node[n].append(i)
    for n, i, _ in plan.weight_edges:
        edges_by_node[n].append(i)
    emitted: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for idx, node in enumerate(graph.node):
        for i in sorted(edges_by_node.get(idx, ())):
            t = node.input[i]
            if t not in emitted:
                nodes.extend(qdq_nodes[t])
                emitted.add(t)
            node.input[i] = replaced[t]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    graph.value_info.extend(new_infos)
    if settings.int8_weights:
        still_used = {x for node in graph.node for x in node.input}
        keep = [init for init in graph.initializer if init.name in still_used or init.name not in weight_names]
        del graph.initializer[:]
        graph.initializer.extend(keep)

    quantized = set(plan.quantized_nodes)
    layer_outputs = tuple((node_id(n), n.output[0]) for n in graph.node if node_id(n) in quantized)
    path = write_checked(model, out_path)
    return QdqReport(path=path, size_bytes=path.stat().st_size, quantized_nodes=plan.quantized_nodes,
                     excluded_nodes=plan.excluded_nodes, activation_amax={t: amax[t] for t in act_tensors},
                     quantized_weights=tuple(weight_names), layer_outputs=layer_outputs,
                     qdq_pairs=len(act_tensors) + len(weight_names), settings=settings)



def quantized_layer_outputs(int8_path: Path) -> list[tuple[str, str]]:
    """(layer name, output tensor) of each Conv/Gemm/MatMul whose weights come from a DequantizeLinear.

    The tensor names are those of the FP32 model, so both files can expose them as extra outputs and be
    compared layer by layer.
    """
    model = load_onnx(int8_path)
    producers = {out: node for node in model.graph.node for out in node.output}
    result = []
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1:
            src = producers.get(node.input[1])
            if src is not None and src.op_type == "DequantizeLinear":
                result.append((node_id(node), node.output[0]))
    return result



def _weight_amax(w: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return np.array(np.abs(w).max(), dtype=np.float32)
    reduce = tuple(d for d in range(w.ndim) if d != axis)
    return np.abs(w).max(axis=reduce).astype(np.float32)


def _checked_ranges(tensors: Iterable[str], ranges: Mapping[str, float]) -> dict[str, float]:
    tensors = list(tensors)
    missing = [t for t in tensors if t not in ranges]
    if missing:
        raise InputError(f"no calibration range for {len(missing)} tensor(s) that need one: {', '.join(missing)}",
                         "calibrate again for this model and these settings")
    out = {}
    for t in tensors:
        v = float(ranges[t])
        if not math.isfinite(v) or v < 0:
            raise InputError(f"calibration range for {t} is {v}; an amax must be finite and >= 0")
        out[t] = v
    return out
