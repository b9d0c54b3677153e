"""Where Q/DQ goes: the plan, made on the FP32 graph, that the Q/DQ writer then carries out.

Symmetric INT8 (zero point 0, scale = amax/127): TensorRT takes nothing else. Q/DQ on the activation
input and the weights (per output channel) of every Conv and of the classifier Gemm/MatMul; on the
inputs of MaxPool and the global average pool, so both run in INT8 (a MaxPool output needs no Q/DQ of
its own: TensorRT propagates the DQ forward across it); and on the inputs of each residual Add as
``residual_add`` says. One Q/DQ pair per tensor is shared by all its quantized consumers; bias stays
float. Which inputs each target wants is in :mod:`rexport.pipeline.quantization.forms`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from rexport.core.errors import InputError
from rexport.pipeline.quantization.onnx_io import load_onnx, node_id

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean")
_MAX_POOL_OPS = ("MaxPool", "GlobalMaxPool")
RESIDUAL_MODES = ("residual", "both", "none")


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
    #: also put Q/DQ on every consumer edge of a quantized pool's output, so the pool runs between a DQ and
    #: a Q (TensorRT's placement, as NVIDIA ModelOpt writes it); False: a MaxPool output stays on the INT8
    #: grid without one, and a global pool's output goes on in float
    pool_output_qdq: bool = False
    #: store weights as INT8 initializers + DequantizeLinear (TensorRT >= 10, OpenVINO) instead of
    #: FP32 + QuantizeLinear + DequantizeLinear (also TensorRT 8.5/8.6)
    int8_weights: bool = False

    def __post_init__(self) -> None:
        if self.residual_add not in RESIDUAL_MODES:
            raise InputError(f"residual_add must be one of {', '.join(RESIDUAL_MODES)}, got {self.residual_add!r}")
        if isinstance(self.exclude_nodes, str):
            raise InputError("exclude_nodes must be a sequence of names, not one string")


@dataclass(frozen=True)
class QdqPlan:
    #: (node index, input index) of each activation edge to quantize
    activation_edges: tuple[tuple[int, int], ...]
    #: (node index, input index, per-channel axis or None) of each weight to quantize
    weight_edges: tuple[tuple[int, int, int | None], ...]
    quantized_nodes: tuple[str, ...]
    excluded_nodes: tuple[str, ...]


def tensors_to_calibrate(fp32_path: Path, settings: QdqSettings = QdqSettings()) -> list[str]:
    """The activation tensors :func:`insert_qdq` needs an amax for, in graph order."""
    model = load_onnx(fp32_path)
    plan = plan_qdq(model, settings)
    return list(dict.fromkeys(model.graph.node[n].input[i] for n, i in plan.activation_edges))


def conv_branch(is_conv: list[bool], depths: list[int]) -> int | None:
    """Which input of a two-input Add is the Conv branch that TensorRT fuses the Add into (left in float
    in the "residual" placement); None when neither input comes from a Conv. Where both do (the
    downsampling block), the shallower one (the 1x1 downsample) is the residual, as in ModelOpt."""
    if is_conv == [True, False]:
        return 0
    if is_conv == [False, True]:
        return 1
    if is_conv == [True, True]:
        return 1 if depths[0] < depths[1] else 0
    return None

def plan_qdq(model: onnx.ModelProto, settings: QdqSettings) -> QdqPlan:
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    float_inits = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    producers = {out: idx for idx, node in enumerate(graph.node) for out in node.output}

    wanted = set(settings.exclude_nodes)
    known = {node_id(n) for n in graph.node} | {o for n in graph.node for o in n.output}
    unknown = sorted(wanted - known)
    if unknown:
        raise InputError(f"exclude_nodes names no node or output in the model: {', '.join(unknown)}",
                         "use node names or output tensor names of the FP32 ONNX")
    excluded = {idx for idx, n in enumerate(graph.node) if node_id(n) in wanted or wanted & set(n.output)}

    weighted = [idx for idx, n in enumerate(graph.node)
                if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in float_inits]
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
        quantized.append(node_id(node))

    depth = depths(graph, producers)
    for idx, node in enumerate(graph.node):
        if idx in excluded:
            continue
        if node.op_type == "Add" and settings.residual_add != "none":
            for i in _add_inputs_to_quantize(node, inits, producers, graph, depth, settings.residual_add):
                act.append((idx, i))
        elif node.op_type in POOL_OPS and settings.quantize_pool_inputs and node.input[0] not in inits:
            act.append((idx, 0))

    if settings.pool_output_qdq:
        act += _pool_output_edges(graph, act, excluded)
    else:
        # A max-pool of a dequantized tensor only selects values already on the INT8 grid: its output needs
        # no Q/DQ of its own (TensorRT propagates the DQ forward across it; OpenVINO runs the pool in INT8).
        quantized_pools = {graph.node[n].output[0] for n, i in act if graph.node[n].op_type in _MAX_POOL_OPS}
        act = [(n, i) for n, i in act if graph.node[n].input[i] not in quantized_pools]
    act = list(dict.fromkeys(act))

    return QdqPlan(activation_edges=tuple(sorted(act)), weight_edges=tuple(wts), quantized_nodes=tuple(quantized),
                 excluded_nodes=tuple(node_id(graph.node[i]) for i in sorted(excluded)))


def _pool_output_edges(graph: onnx.GraphProto, act: list[tuple[int, int]], excluded: set[int]) -> list[tuple[int, int]]:
    """The consumer edges of each pool whose input is quantized (node index, input index)."""
    pooled = {graph.node[n].output[0] for n, i in act if graph.node[n].op_type in POOL_OPS and i == 0}
    return [(idx, i) for idx, node in enumerate(graph.node) if idx not in excluded
            for i, x in enumerate(node.input) if x in pooled]


def _add_inputs_to_quantize(node: onnx.NodeProto, inits: set[str], producers: dict[str, int],
                            graph: onnx.GraphProto, depth: list[int], mode: str) -> list[int]:
    """Which inputs of an Add get Q/DQ. Only Adds of two computed tensors (residual joins) qualify."""
    if len(node.input) != 2 or any(x in inits or not x for x in node.input):
        return []
    if mode == "both":
        return [0, 1]
    src = [producers.get(x) for x in node.input]
    is_conv = [s is not None and graph.node[s].op_type == "Conv" for s in src]
    branch = conv_branch(is_conv, [depth[s] if s is not None else 0 for s in src])
    return [] if branch is None else [1 - branch]  # no Conv to fuse into: leave the Add in float


def depths(graph: onnx.GraphProto, producers: dict[str, int]) -> list[int]:
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
