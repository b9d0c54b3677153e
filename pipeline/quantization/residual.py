"""Turn a both-inputs ("OpenVINO") Add placement into TensorRT's residual-only one, without recalibrating.

Only Q/DQ pairs are removed (no scale changes), so the result is what
``insert_qdq(..., residual_add="residual")`` writes from the same ranges.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rexport.pipeline.quantization.onnx_io import load_onnx, node_id, write_checked
from rexport.pipeline.quantization.qdq_plan import conv_branch


def drop_residual_branch_qdq(int8_path: Path, out_path: Path) -> list[str]:
    """Remove the Q/DQ on the Conv-branch input of each residual Add (TensorRT's preferred placement).

    The INT8 file quantizes both Add inputs, which OpenVINO needs to fuse the Add into the Conv; TensorRT
    fuses Conv + Add + ReLU only when the Conv branch reaches the Add in float. Only Q/DQ pairs are removed
    (no scale changes), so the result is what ``insert_qdq(..., residual_add="residual")`` writes from the
    same ranges. Returns the names of the Adds changed.
    """
    model = load_onnx(int8_path)
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
        branch = conv_branch(is_conv, [depth[x] if x is not None else 0 for x in src])
        if branch is None:
            continue
        tensor, q, dq = sources[branch]
        if q is None:  # the Conv branch is float already
            continue
        dq_out = node.input[branch]
        node.input[branch] = tensor
        changed.append(node_id(node))
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
    write_checked(model, out_path)
    return changed
