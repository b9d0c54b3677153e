"""How much arithmetic one image costs a model: multiply-accumulates of its Conv, Gemm and MatMul nodes,
read from the ONNX graph with shape inference. With the machine's probe (rexport.core.machine) it turns a
throughput figure into a percent of what this CPU measured, comparable across machines of one kind."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def macs_per_image(onnx_path: str | Path, input_size: int | None = None) -> int:
    """Multiply-accumulates of one image through the FP32 graph (Conv, ConvTranspose, Gemm, MatMul)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    # fix batch 1 (and the spatial size where it is symbolic) so every shape is known
    for i, d in enumerate(dims):
        if i == 0:
            d.ClearField("dim_param")
            d.dim_value = 1
        elif not d.dim_value and input_size:
            d.ClearField("dim_param")
            d.dim_value = input_size if i >= 2 else 3
    model = shape_inference.infer_shapes(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        ds = vi.type.tensor_type.shape.dim
        if ds and all(d.dim_value > 0 for d in ds):
            shapes[vi.name] = tuple(d.dim_value for d in ds)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type in ("Conv", "ConvTranspose") and out and node.input[1] in inits:
            w = inits[node.input[1]]          # (M, C/group, kH, kW)
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and out:
            b = inits.get(node.input[1]) or shapes.get(node.input[1])
            if b:
                trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                k = b[-1] if trans_b else b[-2] if len(b) >= 2 else b[0]
                total += int(np.prod(out)) * int(k)
    return total
