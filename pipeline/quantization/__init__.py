"""Precision is decided in ONNX: an FP16 model with FP32 inputs/outputs, and INT8 models with explicit
Q/DQ nodes, one per target, all from one calibration. TensorRT 10/11 (strongly typed) and OpenVINO take
precision from these files only.

Pure functions, ONNX in and ONNX out; the quantize stage calls them and records what they made. Every
file written here has passed ``onnx.checker`` and run in ONNX Runtime (CPU) at batch 1 and 3, and carries
the FP32 model's ``metadata_props`` (the preprocessing spec among them).

Modules, one concern each:
  onnx_io       load, fresh names, write-with-proof (checker + ORT run)
  fp16          the FP16 variant (onnxconverter-common, FP32 I/O)
  qdq_plan      where Q/DQ goes (QdqSettings -> QdqPlan)
  qdq_graph     the Q/DQ writer (insert_qdq) and what it reports
  residual      both-inputs Add placement -> residual-only, without recalibrating
  forms         the INT8 file per target (TensorRT ``int8``, OpenVINO ``int8-openvino``)
  float_parts   the TensorRT form's float parts in FP16, and the CPU proof that keeps them

Design memo: the residual Add is where the two engines disagree. OpenVINO fuses Conv + Add + ReLU
(+ the next Q) into one INT8 convolution only when both Add inputs are quantized (its in-place "sum"
post-op needs the branch in INT8); with the residual input alone quantized, each identity block keeps a
separate Add/ReLU/FakeQuantize subgraph (12 in ResNet-50; 0 to 2.5 % slower, measured). NNCF's own
placement is also "both". TensorRT's placement guide recommends the opposite: quantize only the residual
input, because a Q/DQ on the Conv branch "forces the separation of the convolution operator from the
element-wise addition" (TensorRT developer guide, "suboptimal quantization fusions"; NVIDIA ModelOpt's
ONNX PTQ removes that Q/DQ, ``remove_partial_input_qdq``). Hence two files from one calibration record.

What the file cannot carry: OpenVINO imports a signed INT8 Q/DQ pair as a signed activation, but x86
VNNI multiplies unsigned activations by signed weights; a signed input costs oneDNN a
shift-and-compensate pass, 5-12 % of the INT8 speed against NNCF, which picks unsigned ranges for
post-ReLU tensors. TensorRT only takes signed INT8 with zero point 0, so the fix belongs in the OpenVINO
builder: re-express each FakeQuantize whose input is >= 0 by construction as unsigned with the same step
(measured at NNCF parity; ``ov_unsigned_after_relu`` in benchmarks/bench_int8_placement.py).
"""
from __future__ import annotations

from rexport.pipeline.quantization.fp16 import DEFAULT_FP32_OPS, FP16Report, convert_fp16
from rexport.pipeline.quantization.onnx_io import CHECK_BATCHES
from rexport.pipeline.quantization.qdq_graph import QdqReport, insert_qdq, quantized_layer_outputs
from rexport.pipeline.quantization.qdq_plan import QdqSettings, tensors_to_calibrate
from rexport.pipeline.quantization.residual import drop_residual_branch_qdq

__all__ = ["CHECK_BATCHES", "DEFAULT_FP32_OPS", "FP16Report", "QdqReport", "QdqSettings", "convert_fp16",
           "drop_residual_branch_qdq", "insert_qdq", "quantized_layer_outputs", "tensors_to_calibrate"]
