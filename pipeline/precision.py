"""Precision is decided in ONNX: an FP16 model with FP32 inputs/outputs, and an INT8 model with
explicit Q/DQ nodes. TensorRT 11 (strongly typed) and OpenVINO take precision from these files only.

Pure functions, ONNX in and ONNX out; the quantize stage calls them and records what they made.
Every file written here has passed ``onnx.checker`` and run in ONNX Runtime (CPU) at batch 1 and 3,
and carries the FP32 model's ``metadata_props`` (the preprocessing spec among them).

Choices, with the evidence behind them
--------------------------------------
*FP16.* ``onnxconverter_common.float16`` with ``keep_io_types=True``. Nothing in a BN-folded ResNet needs
FP32: Conv, Relu, Add, MaxPool, the global average pool and the classifier all run in FP16 (activations
stay far below 65504). Keeping the classifier in FP32 was measured and bought nothing (random-weight
ResNet-50 at 224, batch 8: logit cosine to FP32 0.99983 all-FP16 vs 0.99977 with an FP32 Gemm; the error
comes from the backbone), so only ops that overflow in FP16 (``Softmax``/``LogSoftmax``: exp) are kept in
FP32 by default, for models that end in one. ``max_finite_val`` is FP16's own maximum (the converter's
default 1e4 would clip legitimate values between 1e4 and 65504); values below FP16's smallest subnormal
are clamped to it and counted in the report. ONNX Runtime's CPU provider lacks most FP16 kernels and runs
them in FP32 between inserted Casts, so the ORT check measures FP16 storage rounding.

*INT8 weights.* Stored as FP32 initializer -> QuantizeLinear -> DequantizeLinear ("fake-quant"), not as an
INT8 initializer -> DequantizeLinear. TensorRT 10+ accepts both ("You can specify weights of Q/DQ models
using a high-precision data type ... or a low-precision quantized type", TensorRT docs, Explicit
Quantization), but the 8.x ONNX parser rejects an INT8 initializer feeding DequantizeLinear
("DequantizeLinear: only activation types allowed as input to this layer", microsoft/onnxruntime#14229 on
TRT 8.x), which is why ONNX Runtime's ``AddQDQPairToWeight`` and Optimum's TensorRT config exist. JetPack
5.1/6.0 ship TRT 8.5/8.6, so the portable form is the default; ``int8_weights=True`` writes the smaller file
for TRT >= 10 and OpenVINO. OpenVINO folds either form into INT8 weights (same speed, measured in
benchmarks/bench_int8_placement.py).

*Placement.* Symmetric INT8 (zero point 0, scale = amax/127): TensorRT takes nothing else. Q/DQ on the
activation input and the weights (per output channel) of every Conv and of the classifier Gemm/MatMul; on
the inputs of MaxPool and the global average pool, so both run in INT8 (a MaxPool output needs no Q/DQ of
its own: TensorRT propagates the DQ forward across it); and on both inputs of each residual Add. One Q/DQ
pair per tensor is shared by all its quantized consumers; bias stays float.

The residual Add is where the two engines disagree, so here is the evidence. OpenVINO fuses
Conv + Add + ReLU (+ the next Q) into one INT8 convolution only when both Add inputs are quantized (its
in-place "sum" post-op needs the branch in INT8); with the residual input alone quantized, each identity
block keeps a separate Add/ReLU/FakeQuantize subgraph (12 in ResNet-50; 0 to 2.5 % slower, measured).
NNCF's own placement is also "both". TensorRT's placement guide recommends the opposite: quantize only the
residual input, because a Q/DQ on the Conv branch "forces the separation of the convolution operator from
the element-wise addition" (TensorRT developer guide, "suboptimal quantization fusions"; NVIDIA ModelOpt's
ONNX PTQ removes that Q/DQ, ``remove_partial_input_qdq``). The file keeps "both" (OpenVINO's optimum,
correct for TensorRT), and :func:`drop_residual_branch_qdq` turns it into TensorRT's optimum without
recalibrating (it only removes Q/DQ pairs); ``residual_add="residual"`` writes that form directly. Where
both Add inputs come from Convs (the downsampling block), the shallower one (the 1x1 downsample) is the
residual, as in ModelOpt.

*What the file cannot carry.* OpenVINO imports a signed INT8 Q/DQ pair as a signed activation, but x86
VNNI multiplies unsigned activations by signed weights; a signed input costs oneDNN a shift-and-compensate
pass, 5-12 % of the INT8 speed against NNCF, which picks unsigned ranges for post-ReLU tensors. TensorRT
only takes signed INT8 with zero point 0, so the fix belongs in the OpenVINO builder: re-express each
FakeQuantize whose input is >= 0 by construction as unsigned with the same step (measured at NNCF parity;
``ov_unsigned_after_relu`` in benchmarks/bench_int8_placement.py).

All tensor names of the FP32 model survive: Q/DQ only add tensors (``<t>_quantized``,
``<t>_dequantized``) and rewire the quantized consumers, so Conv/Add/Relu outputs can be compared layer by
layer between the FP32 and INT8 files (see :func:`quantized_layer_outputs`).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rexport.core.errors import CheckFailed, InputError
from rexport.core.fsio import atomic_path

#: op types kept in FP32 in the FP16 model (see the module docstring for why)
DEFAULT_FP32_OPS: tuple[str, ...] = ("Softmax", "LogSoftmax")
#: batch sizes every written model is run at in ONNX Runtime before it is kept
CHECK_BATCHES: tuple[int, ...] = (1, 3)

_FP16_MAX = 65504.0
_FP16_MIN_SUBNORMAL = 2.0 ** -24
_WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean")
_MAX_POOL_OPS = ("MaxPool", "GlobalMaxPool")
_INT8_MAX = 127.0
# A zero range (a tensor or weight channel that is all zeros) still needs a positive scale: TensorRT's
# parser rejects scale <= 0. Any positive scale represents zeros exactly.
_AMAX_FLOOR = 1e-8
_RESIDUAL_MODES = ("residual", "both", "none")


# ---------------------------------------------------------------------------------------------------
# FP16


@dataclass(frozen=True)
class FP16Report:
    path: Path
    size_bytes: int
    #: names of the nodes left in FP32 (op types in ``keep_fp32_ops``)
    fp32_nodes: tuple[str, ...]
    #: weight values that FP16 cannot hold and were clamped (|w| < 2**-24 -> +-2**-24, |w| > 65504 -> +-65504)
    clamped_values: int
    checked_batches: tuple[int, ...] = CHECK_BATCHES


def convert_fp16(fp32_path: Path, out_path: Path, *,
                 keep_fp32_ops: Sequence[str] = DEFAULT_FP32_OPS) -> FP16Report:
    """FP16 weights and compute with FP32 inputs/outputs, ``keep_fp32_ops`` left in FP32."""
    from onnxconverter_common import float16

    model = _load(fp32_path)
    block = list(dict.fromkeys([*keep_fp32_ops, *float16.DEFAULT_OP_BLOCK_LIST]))
    fp32_nodes = tuple(_node_id(n) for n in model.graph.node if n.op_type in block)
    clamped = _fp16_unrepresentable(model, set(block))
    metadata = [(p.key, p.value) for p in model.metadata_props]
    kept_inputs = {x for n in model.graph.node if n.op_type in block for x in n.input}
    kept_weights = {}
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name in kept_inputs:
            kept_weights[init.name] = TensorProto()
            kept_weights[init.name].CopyFrom(init)
    guards = _guard_blocked_outputs(model, set(block))
    with warnings.catch_warnings():
        # the converter warns once per clamped value; the count goes into the report instead
        warnings.simplefilter("ignore", UserWarning)
        fp16 = float16.convert_float_to_float16(
            model, min_positive_val=_FP16_MIN_SUBNORMAL, max_finite_val=_FP16_MAX, keep_io_types=True,
            op_block_list=block)
    _unguard_blocked_outputs(fp16, guards)
    _restore_fp32_weights(fp16, kept_weights)
    _set_metadata(fp16, metadata)
    path = _write_checked(fp16, out_path)
    return FP16Report(path=path, size_bytes=path.stat().st_size, fp32_nodes=fp32_nodes, clamped_values=clamped)


_GUARD_SUFFIX = "__rexport_fp32_out"


def _guard_blocked_outputs(model: onnx.ModelProto, block: set[str]) -> list[str]:
    """Put an Identity between each kept-in-FP32 node and the graph output it writes.

    onnxconverter-common (1.16) fails with keep_io_types when a blocked node writes a graph output
    ("The downstream node of the second cast node should be graph output"), which is exactly the
    classifier Gemm of every exported ResNet. The Identity is removed again after conversion."""
    outputs = {o.name for o in model.graph.output}
    guarded = []
    for node in model.graph.node:
        if node.op_type in block:
            for i, name in enumerate(node.output):
                if name in outputs:
                    node.output[i] = name + _GUARD_SUFFIX
                    model.graph.node.append(onnx.helper.make_node("Identity", [node.output[i]], [name],
                                                                  name=name + _GUARD_SUFFIX))
                    guarded.append(name)
    return guarded


def _unguard_blocked_outputs(model: onnx.ModelProto, guarded: list[str]) -> None:
    """Undo ``_guard_blocked_outputs``: the converter wrapped each guard Identity in casts to FP16 and
    back; the FP32 node writes its graph output directly again, without a trip through FP16."""
    g = model.graph
    for name in guarded:
        producers = {o: n for n in g.node for o in n.output}
        doomed, t = [], name
        while producers.get(t) is not None and producers[t].op_type in ("Cast", "Identity"):
            doomed.append(producers[t])
            t = producers[t].input[0]
        if producers.get(t) is None or len(doomed) > 4:
            raise RuntimeError(f"unexpected FP16 conversion around output {name}")
        node = producers[t]
        node.output[list(node.output).index(t)] = name
        stale = {name, *(o for n in doomed for o in n.output)}
        for n in doomed:
            g.node.remove(n)
        for vi in [v for v in g.value_info if v.name in stale or v.name == t]:
            g.value_info.remove(vi)


def _restore_fp32_weights(model: onnx.ModelProto, originals: dict[str, TensorProto]) -> None:
    """The converter stores even an FP32-kept node's weights in FP16 and casts them back: put the FP32
    weights back, so a node kept in FP32 loses nothing."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    uses: dict[str, int] = defaultdict(int)
    for node in g.node:
        for x in node.input:
            uses[x] += 1
    names = _NameSource(model)
    rename: dict[str, str] = {}
    casts = []
    for node in g.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        w = node.input[0] if node.op_type == "Cast" and node.input else ""
        if to != TensorProto.FLOAT or w not in inits or w not in originals:
            continue
        if uses[w] == 1:  # only this Cast reads it: the FP32 tensor takes its name back
            inits[w].CopyFrom(originals[w])
            rename[node.output[0]] = w
        else:
            restored = onnx.TensorProto()
            restored.CopyFrom(originals[w])
            restored.name = names.tensor(f"{w}_fp32")
            g.initializer.append(restored)
            rename[node.output[0]] = restored.name
        casts.append(node)
    for node in casts:
        g.node.remove(node)
    for node in g.node:
        for i, x in enumerate(node.input):
            if x in rename:
                node.input[i] = rename[x]
    stale = set(rename) | set(rename.values())  # the converter also typed the weights FP16 in value_info
    infos = [v for v in g.value_info if v.name not in stale]
    del g.value_info[:]
    g.value_info.extend(infos)


def _fp16_unrepresentable(model: onnx.ModelProto, block: set[str]) -> int:
    """How many FP32 weight values the converter will clamp (weights of FP32-kept nodes excluded)."""
    used_in_fp16: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in block:
            used_in_fp16.update(node.input)
    count = 0
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.name in used_in_fp16:
            a = np.abs(numpy_helper.to_array(init))
            count += int(np.count_nonzero((a > 0) & (a < _FP16_MIN_SUBNORMAL)) + np.count_nonzero(a > _FP16_MAX))
    return count


# ---------------------------------------------------------------------------------------------------
# INT8 Q/DQ


@dataclass(frozen=True)
class QdqSettings:
    """Where Q/DQ goes. Layers are named by node name or output tensor name (as in ``exclude_nodes``)."""

    #: node names (or output tensor names) left in float: their inputs are not quantized, weights stay float
    exclude_nodes: tuple[str, ...] = ()
    quantize_first_conv: bool = True
    #: the final Gemm/MatMul
    quantize_classifier: bool = True
    #: per-output-channel weight scales (per-tensor when False)
    per_channel: bool = True
    #: which inputs of a residual Add get Q/DQ: "both" (OpenVINO fuses Add into the Conv), "residual"
    #: (TensorRT fuses Add into the Conv; see drop_residual_branch_qdq), or "none"
    residual_add: str = "both"
    #: put Q/DQ on the inputs of MaxPool and the global average pool, so both run in INT8; a MaxPool's
    #: output then needs no Q/DQ of its own
    quantize_pool_inputs: bool = True
    #: store weights as INT8 initializers + DequantizeLinear (TensorRT >= 10, OpenVINO) instead of
    #: FP32 + QuantizeLinear + DequantizeLinear (also TensorRT 8.5/8.6)
    int8_weights: bool = False

    def __post_init__(self) -> None:
        if self.residual_add not in _RESIDUAL_MODES:
            raise InputError(f"residual_add must be one of {', '.join(_RESIDUAL_MODES)}, got {self.residual_add!r}")
        if isinstance(self.exclude_nodes, str):
            raise InputError("exclude_nodes must be a sequence of names, not one string")


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


@dataclass(frozen=True)
class _Plan:
    # (node index, input index) of each activation edge to quantize
    activation_edges: tuple[tuple[int, int], ...]
    # (node index, input index, per-channel axis or None) of each weight to quantize
    weight_edges: tuple[tuple[int, int, int | None], ...]
    quantized_nodes: tuple[str, ...]
    excluded_nodes: tuple[str, ...]


def tensors_to_calibrate(fp32_path: Path, settings: QdqSettings = QdqSettings()) -> list[str]:
    """The activation tensors :func:`insert_qdq` needs an amax for, in graph order."""
    model = _load(fp32_path)
    plan = _plan(model, settings)
    return list(dict.fromkeys(model.graph.node[n].input[i] for n, i in plan.activation_edges))


def insert_qdq(fp32_path: Path, ranges: Mapping[str, float], out_path: Path,
               settings: QdqSettings = QdqSettings()) -> QdqReport:
    """Write an explicitly quantized (symmetric INT8 Q/DQ) copy of the FP32 model.

    ``ranges`` maps activation tensor name -> amax (symmetric range); scale = amax / 127, zero point 0.
    """
    model = _load(fp32_path)
    opset = _default_opset(model)
    if opset < 13:
        raise InputError(f"{fp32_path} has opset {opset}; per-axis QuantizeLinear/DequantizeLinear need opset >= 13",
                         "re-export with opset 17")
    plan = _plan(model, settings)
    graph = model.graph
    act_tensors = list(dict.fromkeys(graph.node[n].input[i] for n, i in plan.activation_edges))
    amax = _checked_ranges(act_tensors, ranges)

    names = _NameSource(model)
    shapes = _value_infos(model)
    inits = {i.name: i for i in graph.initializer}
    new_inits: list[TensorProto] = []
    new_infos: list[onnx.ValueInfoProto] = []
    qdq_nodes: dict[str, list[onnx.NodeProto]] = {}  # tensor -> [Q, DQ] or [DQ]
    replaced: dict[str, str] = {}  # tensor -> its dequantized name

    for t in act_tensors:
        scale = np.float32(max(amax[t], _AMAX_FLOOR) / _INT8_MAX)
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
            new_infos += [_like(shapes[t], q_out, TensorProto.INT8), _like(shapes[t], dq_out, TensorProto.FLOAT)]

    weight_names: list[str] = []
    for n, i, axis in plan.weight_edges:
        w_name = graph.node[n].input[i]
        if w_name in replaced:  # a weight shared by two layers: one quantizer
            continue
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        w_amax = _weight_amax(w, axis if settings.per_channel else None)
        scale = (np.maximum(w_amax, _AMAX_FLOOR) / _INT8_MAX).astype(np.float32)
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
            q = np.clip(np.rint(w / scale.reshape(bshape)), -_INT8_MAX, _INT8_MAX).astype(np.int8)
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
    layer_outputs = tuple((_node_id(n), n.output[0]) for n in graph.node if _node_id(n) in quantized)
    path = _write_checked(model, out_path)
    return QdqReport(path=path, size_bytes=path.stat().st_size, quantized_nodes=plan.quantized_nodes,
                     excluded_nodes=plan.excluded_nodes, activation_amax={t: amax[t] for t in act_tensors},
                     quantized_weights=tuple(weight_names), layer_outputs=layer_outputs,
                     qdq_pairs=len(act_tensors) + len(weight_names), settings=settings)


def drop_residual_branch_qdq(int8_path: Path, out_path: Path) -> list[str]:
    """Remove the Q/DQ on the Conv-branch input of each residual Add (TensorRT's preferred placement).

    The INT8 file quantizes both Add inputs, which OpenVINO needs to fuse the Add into the Conv; TensorRT
    fuses Conv + Add + ReLU only when the Conv branch reaches the Add in float. Only Q/DQ pairs are removed
    (no scale changes), so the result is what ``insert_qdq(..., residual_add="residual")`` writes from the
    same ranges. Returns the names of the Adds changed.
    """
    model = _load(int8_path)
    graph = model.graph
    producers = {out: idx for idx, node in enumerate(graph.node) for out in node.output}
    consumers: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for x in node.input:
            consumers[x] += 1

    def through_qdq(tensor: str) -> tuple[str, int | None, int | None]:
        """(float tensor before Q/DQ, Q index, DQ index), or the tensor itself when no Q/DQ feeds it."""
        dq = producers.get(tensor)
        if dq is None or graph.node[dq].op_type != "DequantizeLinear":
            return tensor, None, None
        q = producers.get(graph.node[dq].input[0])
        if q is None or graph.node[q].op_type != "QuantizeLinear":
            return tensor, None, None
        return graph.node[q].input[0], q, dq

    # depths on the float graph: Q/DQ nodes count as zero-length
    depth = [0] * len(graph.node)
    for idx, node in enumerate(graph.node):
        d = max((depth[producers[x]] for x in node.input if x in producers), default=0)
        depth[idx] = d if node.op_type in ("QuantizeLinear", "DequantizeLinear") else d + 1

    changed: list[str] = []
    drop: set[int] = set()
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        sources = [through_qdq(x) for x in node.input]
        src = [producers.get(t) for t, _, _ in sources]
        is_conv = [s is not None and graph.node[s].op_type == "Conv" for s in src]
        if is_conv == [True, False]:
            branch = 0
        elif is_conv == [False, True]:
            branch = 1
        elif is_conv == [True, True]:
            branch = 1 if depth[src[0]] < depth[src[1]] else 0
        else:
            continue
        tensor, q, dq = sources[branch]
        if q is None:  # the Conv branch is float already
            continue
        dq_out = node.input[branch]
        node.input[branch] = tensor
        changed.append(_node_id(node))
        consumers[dq_out] -= 1
        if consumers[dq_out] == 0 and consumers[graph.node[q].output[0]] == 1:
            drop.update((q, dq))
    kept = [n for i, n in enumerate(graph.node) if i not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    used = {x for n in graph.node for x in n.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    live = {o for n in graph.node for o in n.output} | {x for n in graph.node for x in n.input}
    infos = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    _write_checked(model, out_path)
    return changed


def quantized_layer_outputs(int8_path: Path) -> list[tuple[str, str]]:
    """(layer name, output tensor) of each Conv/Gemm/MatMul whose weights come from a DequantizeLinear.

    The tensor names are those of the FP32 model, so both files can expose them as extra outputs and be
    compared layer by layer.
    """
    model = _load(int8_path)
    producers = {out: node for node in model.graph.node for out in node.output}
    result = []
    for node in model.graph.node:
        if node.op_type in _WEIGHTED_OPS and len(node.input) > 1:
            src = producers.get(node.input[1])
            if src is not None and src.op_type == "DequantizeLinear":
                result.append((_node_id(node), node.output[0]))
    return result


def _plan(model: onnx.ModelProto, settings: QdqSettings) -> _Plan:
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    float_inits = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    producers = {out: idx for idx, node in enumerate(graph.node) for out in node.output}

    wanted = set(settings.exclude_nodes)
    known = {_node_id(n) for n in graph.node} | {o for n in graph.node for o in n.output}
    unknown = sorted(wanted - known)
    if unknown:
        raise InputError(f"exclude_nodes names no node or output in the model: {', '.join(unknown)}",
                         "use node names or output tensor names of the FP32 ONNX")
    excluded = {idx for idx, n in enumerate(graph.node) if _node_id(n) in wanted or wanted & set(n.output)}

    weighted = [idx for idx, n in enumerate(graph.node)
                if n.op_type in _WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in float_inits]
    convs = [idx for idx in weighted if graph.node[idx].op_type == "Conv"]
    linears = [idx for idx in weighted if graph.node[idx].op_type != "Conv"]
    if convs and not settings.quantize_first_conv:
        excluded.add(convs[0])
    if linears and not settings.quantize_classifier:
        excluded.add(linears[-1])

    act: list[tuple[int, int]] = []
    wts: list[tuple[int, int, int | None]] = []
    quantized: list[str] = []
    for idx in weighted:
        if idx in excluded:
            continue
        node = graph.node[idx]
        if node.input[0] in inits:  # a constant "activation": nothing to calibrate
            continue
        act.append((idx, 0))
        wts.append((idx, 1, _weight_axis(node, model)))
        quantized.append(_node_id(node))

    depth = _depths(graph, producers)
    for idx, node in enumerate(graph.node):
        if idx in excluded:
            continue
        if node.op_type == "Add" and settings.residual_add != "none":
            for i in _add_inputs_to_quantize(node, inits, producers, graph, depth, settings.residual_add):
                act.append((idx, i))
        elif node.op_type in _POOL_OPS and settings.quantize_pool_inputs and node.input[0] not in inits:
            act.append((idx, 0))

    # A max-pool of a dequantized tensor only selects values already on the INT8 grid: its output needs no
    # Q/DQ of its own (TensorRT propagates the DQ forward across it; OpenVINO runs the pool in INT8).
    quantized_pools = {graph.node[n].output[0] for n, i in act if graph.node[n].op_type in _MAX_POOL_OPS}
    act = [(n, i) for n, i in act if graph.node[n].input[i] not in quantized_pools]

    return _Plan(activation_edges=tuple(sorted(act)), weight_edges=tuple(wts), quantized_nodes=tuple(quantized),
                 excluded_nodes=tuple(_node_id(graph.node[i]) for i in sorted(excluded)))


def _add_inputs_to_quantize(node: onnx.NodeProto, inits: set[str], producers: dict[str, int],
                            graph: onnx.GraphProto, depth: list[int], mode: str) -> list[int]:
    """Which inputs of an Add get Q/DQ. Only Adds of two computed tensors (residual joins) qualify."""
    if len(node.input) != 2 or any(x in inits or not x for x in node.input):
        return []
    if mode == "both":
        return [0, 1]
    src = [producers.get(x) for x in node.input]
    is_conv = [s is not None and graph.node[s].op_type == "Conv" for s in src]
    if is_conv == [True, False]:
        return [1]
    if is_conv == [False, True]:
        return [0]
    if is_conv == [True, True]:
        # the downsampling block: the shallower conv (1x1 downsample) is the residual branch
        return [0] if depth[src[0]] < depth[src[1]] else [1]
    return []  # no Conv to fuse into: leave the Add in float


def _depths(graph: onnx.GraphProto, producers: dict[str, int]) -> list[int]:
    """Longest path (in nodes) from the graph inputs to each node; the graph is topologically sorted."""
    depth = [0] * len(graph.node)
    for idx, node in enumerate(graph.node):
        depth[idx] = 1 + max((depth[producers[x]] for x in node.input if x in producers), default=0)
    return depth


def _weight_axis(node: onnx.NodeProto, model: onnx.ModelProto) -> int | None:
    """The output-channel axis of a weight: 0 for Conv and Gemm(transB=1), 1 for Gemm(transB=0)/MatMul."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    w = next(i for i in model.graph.initializer if i.name == node.input[1])
    return len(w.dims) - 1 if len(w.dims) >= 2 else None


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


# ---------------------------------------------------------------------------------------------------
# shared helpers


def _load(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}", "run 'rexport export' first")
    try:
        return onnx.load(str(path))
    except Exception as e:  # a truncated or foreign file
        raise InputError(f"cannot read ONNX file {path}: {e}") from None


def _node_id(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _set_metadata(model: onnx.ModelProto, metadata: list[tuple[str, str]]) -> None:
    del model.metadata_props[:]
    for key, value in metadata:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in [*g.input, *g.value_info, *g.output]}


def _like(info: onnx.ValueInfoProto, name: str, elem_type: int) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = name
    out.type.tensor_type.elem_type = elem_type
    del out.metadata_props[:]
    return out


class _NameSource:
    """Fresh tensor and node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self._tensors = {x for n in g.node for x in (*n.input, *n.output)}
        self._tensors |= {i.name for i in g.initializer} | {v.name for v in (*g.input, *g.output, *g.value_info)}
        self._nodes = {n.name for n in g.node}

    @staticmethod
    def _fresh(base: str, taken: set[str]) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def tensor(self, base: str) -> str:
        return self._fresh(base, self._tensors)

    def node(self, base: str) -> str:
        return self._fresh(base, self._nodes)


def _write_checked(model: onnx.ModelProto, out_path: Path) -> Path:
    """Write atomically, after onnx.checker and an ONNX Runtime run at each of CHECK_BATCHES."""
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise CheckFailed(f"{out_path.name} fails the ONNX checker: {str(e).splitlines()[0]}") from None
        _run_in_ort(tmp, out_path.name)
    return out_path


def _run_in_ort(path: Path, label: str) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise CheckFailed(f"ONNX Runtime cannot load {label}: {str(e).splitlines()[0]}") from None
    inp = sess.get_inputs()[0]
    rng = np.random.default_rng(0)
    for batch in CHECK_BATCHES:
        dims = [batch] + [d if isinstance(d, int) and d > 0 else 224 for d in inp.shape[1:]]
        x = rng.standard_normal(dims).astype(np.float32)
        try:
            outs = sess.run(None, {inp.name: x})
        except Exception as e:
            raise CheckFailed(f"ONNX Runtime cannot run {label} at batch {batch}: {str(e).splitlines()[0]}") from None
        y = outs[0]
        if y.shape[0] != batch or not np.all(np.isfinite(y)):
            raise CheckFailed(f"{label} gives {'non-finite' if y.shape[0] == batch else 'wrong-shaped'} output "
                              f"at batch {batch}")
