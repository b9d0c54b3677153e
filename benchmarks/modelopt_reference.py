"""Which consumers NVIDIA ModelOpt's ONNX PTQ quantizes on our exported ResNets: the reference for the
TensorRT form's placement (tests/pipeline/test_int8_forms.py holds the result as constants).

ModelOpt is not a dependency of rexport: run this in its own venv, on FP32 ONNX files our export wrote:

    python3 -m venv /tmp/mo && /tmp/mo/bin/pip install torch==2.13.0 'nvidia-modelopt[onnx]' onnxruntime
    .venv/bin/python -c "..."   # export resnet18/resnet50 with rexport.pipeline.export.export_onnx
    /tmp/mo/bin/python benchmarks/modelopt_reference.py resnet18.fp32.onnx resnet50.fp32.onnx

Writes benchmarks/results/modelopt_consumers.json: per model and ``high_precision_dtype``, every
(node, op type, input index) whose input comes from a DequantizeLinear, and the Q/DQ counts.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

RESULTS = Path(__file__).resolve().parent / "results" / "modelopt_consumers.json"


def consumers(path: str) -> tuple[list[list], dict]:
    g = onnx.load(path).graph
    producer = {o: n for n in g.node for o in n.output}
    found = [[n.name, n.op_type, i] for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
             for i, t in enumerate(n.input) if t in producer and producer[t].op_type == "DequantizeLinear"]
    return found, dict(Counter(n.op_type for n in g.node))


def main(paths: list[str]) -> int:
    import modelopt
    import modelopt.onnx.quantization as moq

    out = {"modelopt": modelopt.__version__, "calibration": "max, 16 seeded normal batches", "models": {}}
    for src in paths:
        shape = [d.dim_value or 16 for d in onnx.load(src).graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(0).standard_normal([16, *shape[1:]]).astype(np.float32)
        for hp in ("fp32", "fp16"):
            dst = str(Path(src).with_suffix(f".modelopt-{hp}.onnx"))
            moq.quantize(src, quantize_mode="int8", calibration_data={"input": x}, calibration_method="max",
                         output_path=dst, high_precision_dtype=hp, log_level="ERROR", calibration_eps=["cpu"])
            found, ops = consumers(dst)
            out["models"][f"{Path(src).name}:{hp}"] = {"consumers": found, "ops": ops}
            print(src, hp, len(found), "quantized consumers,", ops.get("QuantizeLinear", 0), "Q/DQ pairs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
