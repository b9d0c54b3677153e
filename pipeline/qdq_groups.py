"""Quantizer groups of a Q/DQ file: each activation tensor's Q/DQ pair and the weight quantizers of
the layers it feeds. A group is the unit that sensitivity ranks and that a fallback leaves in float.

Groups are read from a written INT8 file (any form: both Add inputs quantized, or the residual input
only), so they are exactly what the writer emitted. Two graph edits are offered: a *switchable* copy
where every group can be turned on or off per run through a boolean input (one ONNX Runtime session
measures any subset), and a *stripped* copy with some groups' Q/DQ removed (the fallback file).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import onnx
from onnx import TensorProto, helper

from rexport.core.errors import InputError
from rexport.pipeline.quantization.onnx_io import load_onnx, node_id, write_checked

_WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_TRANSPARENT_OPS = ("MaxPool", "GlobalMaxPool")  # select values already on the INT8 grid
#: prefix of the boolean inputs of a switchable model, one per group, in group order
SWITCH_PREFIX = "rexport_qgroup_"


@dataclass(frozen=True)
class QuantizerGroup:
    #: the FP32 tensor whose Q/DQ pair this is (or, for a weight-only group, the layer's name)
    name: str
    #: layers that read the dequantized tensor (through max-pools), by node name
    consumers: tuple[str, ...]
    #: weight tensors of the weighted consumers (Conv/Gemm/MatMul) quantized with it
    weights: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "consumers": list(self.consumers), "weights": list(self.weights)}


@dataclass(frozen=True)
class _Quantizer:
    source: str          # the float tensor quantized (activation or FP32 weight initializer)
    output: str          # the dequantized tensor consumers read
    nodes: tuple[int, ...]  # Q and DQ node indices (DQ only for INT8-stored weights)
    weight: bool


def _quantizers(model: onnx.ModelProto) -> list[_Quantizer]:
    g = model.graph
    inits = {i.name for i in g.initializer}
    producers = {o: i for i, n in enumerate(g.node) for o in n.output}
    found = []
    for idx, node in enumerate(g.node):
        if node.op_type != "DequantizeLinear":
            continue
        src = producers.get(node.input[0])
        if src is not None and g.node[src].op_type == "QuantizeLinear":
            x = g.node[src].input[0]
            found.append(_Quantizer(x, node.output[0], (src, idx), x in inits))
        elif node.input[0] in inits:  # INT8 initializer -> DQ
            name = node.output[0].removesuffix("_dequantized")
            found.append(_Quantizer(name, node.output[0], (idx,), True))
    return found


def find_groups(model: onnx.ModelProto) -> list[QuantizerGroup]:
    """The quantizer groups of a Q/DQ model, in graph order."""
    g = model.graph
    consumers: dict[str, list[int]] = defaultdict(list)
    for idx, node in enumerate(g.node):
        for x in node.input:
            consumers[x].append(idx)
    quantizers = _quantizers(model)
    weight_by_output = {q.output: q for q in quantizers if q.weight}
    groups, claimed = [], set()
    for q in quantizers:
        if q.weight:
            continue
        reached, frontier = [], [q.output]
        while frontier:
            t = frontier.pop()
            for c in consumers.get(t, ()):
                reached.append(c)
                if g.node[c].op_type in _TRANSPARENT_OPS:
                    frontier.append(g.node[c].output[0])
        weights = []
        for c in reached:
            node = g.node[c]
            if node.op_type in _WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in weight_by_output:
                weights.append(weight_by_output[node.input[1]].source)
        claimed.update(weights)
        groups.append(QuantizerGroup(q.source, tuple(dict.fromkeys(node_id(g.node[c]) for c in sorted(reached))),
                                     tuple(dict.fromkeys(weights))))
    for q in quantizers:  # weights whose layer input is float: a group of their own
        if q.weight and q.source not in claimed:
            layer = next(node_id(g.node[c]) for c in consumers[q.output])
            groups.append(QuantizerGroup(layer, (layer,), (q.source,)))
    return groups


def _float_weight(model: onnx.ModelProto, fp32: onnx.ModelProto | None, q: _Quantizer) -> str:
    """The name of the FP32 weight a weight quantizer was made from, adding it from ``fp32`` when the
    Q/DQ file stores that weight in INT8 only."""
    if q.source in {i.name for i in model.graph.initializer}:
        return q.source
    if fp32 is None:
        raise InputError(f"{q.source} is stored in INT8 only", "pass the FP32 model to restore its float weight")
    init = next((i for i in fp32.graph.initializer if i.name == q.source), None)
    if init is None:
        raise InputError(f"the FP32 model has no weight {q.source}", "use the FP32 file the INT8 file was made from")
    model.graph.initializer.append(init)
    return q.source


def _by_group(model: onnx.ModelProto, groups: list[QuantizerGroup]) -> dict[str, list[_Quantizer]]:
    quantizers = {q.source: q for q in _quantizers(model)}
    out = {}
    for grp in groups:
        members = [quantizers[t] for t in (grp.name, *grp.weights) if t in quantizers]
        if not members:
            raise InputError(f"no quantizer group {grp.name!r} in this Q/DQ file",
                             "name groups as the sensitivity table does")
        out[grp.name] = members
    return out


def _rewire(model: onnx.ModelProto, old: str, new: str, skip: Iterable[int] = ()) -> None:
    skip = set(skip)
    for idx, node in enumerate(model.graph.node):
        if idx in skip:
            continue
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new


def switchable_model(model: onnx.ModelProto, groups: list[QuantizerGroup],
                     fp32: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """A copy of ``model`` in which group ``i`` is quantized only when the boolean scalar input
    ``SWITCH_PREFIX + str(i)`` is true (else its tensors pass through in float)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    members = _by_group(m, groups)
    where_nodes = []
    for i, grp in enumerate(groups):
        flag = f"{SWITCH_PREFIX}{i}"
        m.graph.input.append(helper.make_tensor_value_info(flag, TensorProto.BOOL, []))
        for q in members[grp.name]:
            x = _float_weight(m, fp32, q) if q.weight else q.source
            switched = f"{q.output}_switched"
            _rewire(m, q.output, switched)
            where_nodes.append(helper.make_node("Where", [flag, q.output, x], [switched], name=f"{switched}_Where"))
    # a Where goes right after its DQ, which keeps the graph topologically sorted
    nodes, after = [], {n.input[1]: n for n in where_nodes}
    for node in m.graph.node:
        nodes.append(node)
        for o in node.output:
            if o in after:
                nodes.append(after[o])
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def strip_groups(int8_path: Path, out_path: Path, names: Iterable[str], *, fp32_path: Path | None = None) -> list[str]:
    """Write ``int8_path`` with the Q/DQ of the named groups removed (those layers run in float).
    Returns the layers that changed. The file is checked (ONNX checker, ONNX Runtime) before it is kept."""
    model = load_onnx(int8_path)
    fp32 = load_onnx(fp32_path) if fp32_path is not None else None
    wanted = list(dict.fromkeys(names))
    known = {grp.name: grp for grp in find_groups(model)}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise InputError(f"no quantizer group {', '.join(unknown)} in {int8_path}",
                         "name groups as the sensitivity table does")
    members = _by_group(model, [known[n] for n in wanted])
    dead: set[int] = set()
    for name in wanted:
        for q in members[name]:
            _rewire(model, q.output, _float_weight(model, fp32, q) if q.weight else q.source, skip=q.nodes)
            dead.update(q.nodes)
    g = model.graph
    kept = [n for i, n in enumerate(g.node) if i not in dead]
    del g.node[:]
    g.node.extend(kept)
    used = {x for n in g.node for x in n.input}
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    live = used | {o for n in g.node for o in n.output}
    infos = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(infos)
    write_checked(model, out_path)
    return list(dict.fromkeys(c for n in wanted for c in known[n].consumers))


def layer_names(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> a readable layer name: for a weighted layer, its weight's name less ``.weight``
    (the PyTorch module, e.g. ``layer2.0.conv2``); else the node name."""
    inits = {i.name for i in model.graph.initializer}
    return {node_id(n): (n.input[1].removesuffix(".weight") if n.op_type in _WEIGHTED_OPS and len(n.input) > 1
                         and n.input[1] in inits else node_id(n)) for n in model.graph.node}
