"""Run a Q/DQ model with any subset of its quantizer groups switched on, fast.

The switchable model (see :mod:`rexport.pipeline.qdq_groups`) is cut where a single tensor crosses
from one part of the graph to the next (a ResNet's block outputs), and each part gets two ONNX Runtime
sessions: the FP32 part and the switchable part. A run with only some groups on starts from the cached
FP32 input of the first part that holds one of them, runs the parts holding them switchable and every
other part in plain FP32 (prepacked weights, no fake-quant ops). Quantizing one group alone therefore
costs about the network after that group, in FP32 speed, instead of a whole fake-quantized pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from rexport.pipeline.qdq_groups import SWITCH_PREFIX, QuantizerGroup, find_groups, switchable_model


def _crossings(graph: onnx.GraphProto, ignore: set[str]) -> list[set[str]]:
    """For each node index i, the computed tensors produced at or before i and read after i."""
    inits = {x.name for x in graph.initializer}
    producer = {x.name: -1 for x in graph.input if x.name not in ignore and x.name not in inits}
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            producer[o] = i
        for x in node.input:
            if x in producer:
                last_use[x] = i
    for o in graph.output:
        last_use[o.name] = len(graph.node)
    live: set[str] = {t for t, p in producer.items() if p == -1 and last_use.get(t, -1) > -1}
    out = []
    for i, node in enumerate(graph.node):
        for o in node.output:
            if last_use.get(o, -1) > i:
                live.add(o)
        live = {t for t in live if last_use.get(t, -1) > i}
        out.append(set(live))
    return out


def _cut_tensors(graph: onnx.GraphProto, ignore: set[str]) -> list[str]:
    return [next(iter(c)) for c in _crossings(graph, ignore) if len(c) == 1]


def _merge_empty(cuts: list[str], model: onnx.ModelProto, flags: set[str]) -> list[str]:
    """Drop cuts that would start a part without a switch: such a part costs a session run and saves
    nothing (a ResNet keeps about one part per block)."""
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    switch_at = [i for i, n in enumerate(model.graph.node) if n.op_type == "Where" and n.input[0] in flags]
    kept = [cuts[0]]
    for k, t in enumerate(cuts[1:-1], 1):
        lo, hi = producer.get(kept[-1], -1), producer[t]
        if any(lo < i <= hi for i in switch_at):
            kept.append(t)
    return [*kept, cuts[-1]]


def _part(model: onnx.ModelProto, nodes: list[onnx.NodeProto], start: str, end: str) -> onnx.ModelProto:
    used = {x for n in nodes for x in n.input}
    inits = [i for i in model.graph.initializer if i.name in used]
    flags = [x for x in model.graph.input if x.name.startswith(SWITCH_PREFIX) and x.name in used]
    graph = helper.make_graph(nodes, "part", [helper.make_tensor_value_info(start, TensorProto.FLOAT, None), *flags],
                              [helper.make_tensor_value_info(end, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _split(model: onnx.ModelProto, cuts: list[str]) -> list[onnx.ModelProto]:
    """Parts of ``model`` between consecutive cut tensors (the first cut is the graph input)."""
    producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    bounds = [-1] + [producer[t] for t in cuts[1:]]
    return [_part(model, list(model.graph.node[bounds[k] + 1:bounds[k + 1] + 1]), cuts[k], cuts[k + 1])
            for k in range(len(cuts) - 1)]


@dataclass
class _Part:
    fp32: object          # ORT session
    switched: object      # ORT session
    flags: list[str]      # switch inputs this part reads
    groups: set[str]      # groups with a quantizer in this part


class SwitchSession:
    """Logits of a Q/DQ model with any subset of its groups quantized (the rest in float)."""

    def __init__(self, int8_path, fp32_path, *, threads: int | None = None,
                 groups: list[QuantizerGroup] | None = None) -> None:
        import onnxruntime as ort

        int8, fp32 = onnx.load(str(int8_path)), onnx.load(str(fp32_path))
        self.groups = groups if groups is not None else find_groups(int8)
        self.index = {g.name: i for i, g in enumerate(self.groups)}
        switched = switchable_model(int8, self.groups, fp32=fp32)
        flags = {f"{SWITCH_PREFIX}{i}" for i in range(len(self.groups))}
        self.input_name = fp32.graph.input[0].name
        out = fp32.graph.output[0].name
        in_fp32 = set(_cut_tensors(fp32.graph, set()))
        cuts = [t for t in _cut_tensors(switched.graph, flags) if t in in_fp32 and t != out]
        cuts = _merge_empty([self.input_name, *dict.fromkeys(cuts), out], switched, flags)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # many small sessions run one after another: idle threads must not spin against the busy one
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ... and must not each keep an arena of their peak: memory is one part's activations, not the sum
        opts.enable_cpu_mem_arena = False
        if threads:
            opts.intra_op_num_threads = threads

        def session(m: onnx.ModelProto):
            return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        self.parts = []
        for fm, sm in zip(_split(fp32, cuts), _split(switched, cuts)):
            part_flags = [x.name for x in sm.graph.input[1:]]
            self.parts.append(_Part(session(fm), session(sm), part_flags,
                                    {self.groups[int(f[len(SWITCH_PREFIX):])].name for f in part_flags}))
        self.cuts = cuts

    def fp32_cuts(self, x: np.ndarray) -> list[np.ndarray]:
        """The FP32 input of every part for one batch (the first is ``x`` itself)."""
        acts = [np.ascontiguousarray(x, dtype=np.float32)]
        for p in self.parts[:-1]:
            acts.append(p.fp32.run(None, {self.cuts[len(acts) - 1]: acts[-1]})[0])
        return acts

    def run_from(self, acts: list[np.ndarray], quantized: set[str]) -> np.ndarray:
        """Logits of one batch whose FP32 part inputs are ``acts``, with ``quantized`` groups on."""
        first = next((k for k, p in enumerate(self.parts) if p.groups & quantized), len(self.parts) - 1)
        y = acts[first]
        for k in range(first, len(self.parts)):
            p = self.parts[k]
            if p.groups & quantized:
                feed = {f: np.array(self.groups[int(f[len(SWITCH_PREFIX):])].name in quantized) for f in p.flags}
                y = p.switched.run(None, {self.cuts[k]: y, **feed})[0]
            else:
                y = p.fp32.run(None, {self.cuts[k]: y})[0]
        return y.astype(np.float32, copy=False)

    def logits(self, x: np.ndarray, quantized: set[str], batch_size: int) -> np.ndarray:
        out = []
        for s in range(0, len(x), batch_size):
            out.append(self.run_from(self.fp32_cuts(x[s:s + batch_size]), quantized))
        return np.concatenate(out)

    def logits_many(self, x: np.ndarray, subsets: list[set[str]], batch_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """FP32 logits and the logits of each subset, sharing one FP32 pass per batch."""
        ref, outs = [], [[] for _ in subsets]
        for s in range(0, len(x), batch_size):
            acts = self.fp32_cuts(x[s:s + batch_size])
            ref.append(self.parts[-1].fp32.run(None, {self.cuts[-2]: acts[-1]})[0])
            for i, q in enumerate(subsets):
                outs[i].append(self.run_from(acts, q))
        return np.concatenate(ref).astype(np.float32), [np.concatenate(o) for o in outs]
