"""FP16 with FP32 inputs/outputs: ``onnxconverter_common.float16`` with ``keep_io_types=True``.

Nothing in a BN-folded ResNet needs FP32: Conv, Relu, Add, MaxPool, the global average pool and the
classifier all run in FP16 (activations stay far below 65504). Keeping the classifier in FP32 was measured
and bought nothing (random-weight ResNet-50 at 224, batch 8: logit cosine to FP32 0.99983 all-FP16 vs
0.99977 with an FP32 Gemm; the error comes from the backbone), so only ops that overflow in FP16
(``Softmax``/``LogSoftmax``: exp) are kept in FP32 by default, for models that end in one.
``max_finite_val`` is FP16's own maximum (the converter's default 1e4 would clip legitimate values between
1e4 and 65504); values below FP16's smallest subnormal are clamped to it and counted in the report. ONNX
Runtime's CPU provider lacks most FP16 kernels and runs them in FP32 between inserted Casts, so the ORT
check measures FP16 storage rounding.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from rexport.pipeline.quantization.onnx_io import (CHECK_BATCHES, NameSource, load_onnx, node_id, set_metadata,
                                                   write_checked)

#: op types kept in FP32 in the FP16 model (see the module docstring for why)
DEFAULT_FP32_OPS: tuple[str, ...] = ("Softmax", "LogSoftmax")
FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0 ** -24


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

    model = load_onnx(fp32_path)
    block = list(dict.fromkeys([*keep_fp32_ops, *float16.DEFAULT_OP_BLOCK_LIST]))
    fp32_nodes = tuple(node_id(n) for n in model.graph.node if n.op_type in block)
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
            model, min_positive_val=FP16_MIN_SUBNORMAL, max_finite_val=FP16_MAX, keep_io_types=True,
            op_block_list=block, node_block_list=folded_preprocessing_nodes(model))
    _unguard_blocked_outputs(fp16, guards)
    _restore_fp32_weights(fp16, kept_weights)
    set_metadata(fp16, metadata)
    path = write_checked(fp16, out_path)
    return FP16Report(path=path, size_bytes=path.stat().st_size, fp32_nodes=fp32_nodes, clamped_values=clamped)


def folded_preprocessing_nodes(model: onnx.ModelProto) -> list[str]:
    """The raw-pixel preprocessing in front of a folded model (pipeline/fold_preprocessing.py): kept in
    FP32, where it is exact, like the FP32 input it replaces."""
    return [n.name for n in model.graph.node if n.name.startswith("rexport_pre_")]


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
    names = NameSource(model)
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
            count += int(np.count_nonzero((a > 0) & (a < FP16_MIN_SUBNORMAL)) + np.count_nonzero(a > FP16_MAX))
    return count

