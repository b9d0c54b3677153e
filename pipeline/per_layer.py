"""Where INT8 error shows: each quantized layer's output in the INT8 file against the FP32 file's, on the
validation inputs (it says where the error appears; the budget's sensitivity says which quantizer causes it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rexport.core.preprocess import PreprocessSpec


def per_layer_errors(fp32_path: Path, int8_path: Path, x: np.ndarray, limit: int = 8) -> list[dict]:
    """Error of each quantized layer's output (Conv/Gemm/Add outputs that exist, by name, in both
    models) in the INT8 model against the FP32 model, on the validation inputs."""
    import onnx
    import onnxruntime as ort

    def with_outputs(path: Path, names: list[str]) -> bytes:
        m = onnx.load(str(path))
        have = {o.name for o in m.graph.output}
        # each tensor's own type: an INT8 file with FP16 float parts has FP16 layer outputs
        types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(m).graph.value_info}
        for n in names:
            if n not in have:
                m.graph.output.append(onnx.helper.make_tensor_value_info(n, types.get(n) or onnx.TensorProto.FLOAT,
                                                                         None))
        return m.SerializeToString()

    int8 = onnx.load(str(int8_path), load_external_data=False)
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    fp32_outputs = {o for n in fp32.graph.node for o in n.output}
    dq_outputs = {o for n in int8.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    layers = [(n.name or n.output[0], n.output[0]) for n in int8.graph.node
              if n.op_type in ("Conv", "Gemm", "MatMul", "Add") and n.output[0] in fp32_outputs
              and any(i in dq_outputs for i in n.input)]
    if not layers:
        return []
    names = [t for _, t in layers]
    xs = PreprocessSpec.from_onnx(fp32_path).model_input(x[:limit])  # raw pixels for a folded model
    results = []
    outs = {}
    for key, path in (("fp32", fp32_path), ("int8", int8_path)):
        s = ort.InferenceSession(with_outputs(path, names), providers=["CPUExecutionProvider"])
        wanted = [o.name for o in s.get_outputs()]
        got = s.run(None, {s.get_inputs()[0].name: xs})
        outs[key] = dict(zip(wanted, got))
    for layer, tensor in layers:
        a = outs["fp32"][tensor].astype(np.float64).ravel()
        b = outs["int8"][tensor].astype(np.float64).ravel()
        rel = float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30))
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        results.append({"layer": layer, "tensor": tensor, "rel_error": rel, "cosine": cos})
    return results
