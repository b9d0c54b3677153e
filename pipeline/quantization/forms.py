"""One calibration, one INT8 file per target: ``int8`` (TensorRT's placement) and ``int8-openvino``
(NNCF parity). Both come from the same calibration record: the record holds a range for every tensor,
so neither form calibrates again.

*The TensorRT form* (``int8``, onnx/model.int8.onnx) follows TensorRT's explicit-quantization rules as
NVIDIA ModelOpt 0.47 (``modelopt.onnx.quantization.quantize``, int8, the quantizer NVIDIA ships for
TensorRT) applies them: Q/DQ on the activation input and weights of every Conv; on the residual input
only of each Add (the shallower one where both come from Convs), so TensorRT fuses Conv + Add + ReLU;
on the input *and* every consumer of the output of MaxPool and of the global average pool, so each pool
runs between a DQ and a Q; the classifier Gemm stays in float (in FP16 with ``int8_float="fp16"``).
Measured against ModelOpt on our exported ResNet-18 and ResNet-50 (benchmarks/bench_int8_forms.py
writes the same comparison): the set of quantized consumers (node, input) is *identical*, 51 on
ResNet-18 (43 Q/DQ pairs: 23 activations + 20 weights) and 125 on ResNet-50 (109 pairs), no extra and
none missing. tests/pipeline/test_int8_forms.py holds that structure as constants.

*The OpenVINO form* (``int8-openvino``, onnx/model.int8-openvino.onnx) is the NNCF-parity file: both
Add inputs quantized (OpenVINO's in-place "sum" post-op), pool inputs quantized, a MaxPool output left on
the INT8 grid, and the classifier quantized (as NNCF does).

``exclude``/``skip_first_conv``/``skip_classifier`` apply to both forms alike.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rexport.core.errors import InputError
from rexport.pipeline.quantization.qdq_plan import QdqSettings, tensors_to_calibrate

TENSORRT_FORM = "int8"
OPENVINO_FORM = "int8-openvino"
#: every INT8 variant, the TensorRT form first (the mission's target)
FORMS: tuple[str, ...] = (TENSORRT_FORM, OPENVINO_FORM)
#: the engine backend each form is shaped for
FORM_BACKEND = {TENSORRT_FORM: "tensorrt", OPENVINO_FORM: "openvino"}
#: the float parts of the TensorRT form
INT8_FLOATS = ("fp16", "fp32")


def form_settings(base: QdqSettings, form: str) -> QdqSettings:
    """The placement of ``form``, keeping the user's exclusions from ``base``."""
    if form == TENSORRT_FORM:
        return dataclasses.replace(base, residual_add="residual", quantize_classifier=False,
                                   quantize_pool_inputs=True, pool_output_qdq=True)
    if form == OPENVINO_FORM:
        return dataclasses.replace(base, residual_add="both", quantize_pool_inputs=True, pool_output_qdq=False)
    raise InputError(f"unknown INT8 form {form!r}", f"use one of {', '.join(FORMS)}")


def form_for_backend(backend: str) -> str:
    """The INT8 variant an engine backend compiles (the TensorRT form for anything not OpenVINO)."""
    return OPENVINO_FORM if backend == "openvino" else TENSORRT_FORM


def tensors_for_forms(fp32_path: Path, base: QdqSettings, forms: tuple[str, ...] = FORMS) -> list[str]:
    """Every activation tensor any of ``forms`` needs a range for (also checks ``base``'s names)."""
    names: list[str] = []
    for form in forms:
        names += tensors_to_calibrate(fp32_path, form_settings(base, form))
    return list(dict.fromkeys(names))
