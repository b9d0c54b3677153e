"""One calibration, one INT8 file per target: ``int8`` (TensorRT's placement) and ``int8-openvino``
(NNCF parity). Both come from the same calibration record: the record holds a range for every tensor,
so neither form calibrates again.

*The TensorRT form* (``int8``, onnx/model.int8.onnx) follows TensorRT's explicit-quantization rules as
NVIDIA ModelOpt 0.47 (``modelopt.onnx.quantization.quantize``, int8, the quantizer NVIDIA ships for
TensorRT) applies them: Q/DQ on the activation input and weights of every Conv; on the residual input
only of each Add (the shallower one where both come from Convs), so TensorRT fuses Conv + Add + ReLU;
on the input *and* every consumer of the output of MaxPool and of the global average pool, so each pool
runs between a DQ and a Q; the classifier Gemm stays in float (in FP16 with ``int8_float="fp16"``).
Measured against ModelOpt on our exported ResNet-18 and ResNet-50 (benchmarks/modelopt_reference.py,
run in ModelOpt's own venv; benchmarks/results/modelopt_consumers.json): the set of quantized consumers
(node, input) is *identical*, 51 on ResNet-18 (43 Q/DQ pairs: 23 activations + 20 weights) and 125 on
ResNet-50 (109 pairs), no extra and none missing, so no extra quantized input needs a justification.
tests/pipeline/test_int8_forms.py holds that structure as constants. Two placements differ from the
earlier single file and both follow ModelOpt: the MaxPool output is re-quantized for its consumers
(TensorRT runs the pool between DQ and Q), and the classifier stays float (issue 9's measurement on a
trained ResNet-18: 85.1 % for ModelOpt's FP32-float file vs 84.9 % for ours with the classifier in INT8).

*The OpenVINO form* (``int8-openvino``, onnx/model.int8-openvino.onnx) is the NNCF-parity file: both
Add inputs quantized (OpenVINO's in-place "sum" post-op), pool inputs quantized, a MaxPool output left on
the INT8 grid, and the classifier quantized (as NNCF does).

``exclude``/``skip_first_conv``/``skip_classifier`` apply to both forms alike.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from rexport.core.errors import CheckFailed, InputError
from rexport.pipeline.quantization.float_parts import Int8FloatReport, convert_int8_float_fp16
from rexport.pipeline.quantization.float_proof import FloatProof, prove_fp16_floats
from rexport.pipeline.quantization.qdq_graph import QdqReport, insert_qdq
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


@dataclass(frozen=True)
class Int8Forms:
    """What :func:`write_int8_forms` wrote: one Q/DQ report per form, and the TensorRT form's float parts."""

    reports: dict[str, QdqReport]
    #: the TensorRT form's float parts as written: "fp16" or "fp32"
    int8_float: str
    #: why FP16 float parts were asked for but FP32 written (None when not asked or kept)
    fallback_reason: str | None = None
    float_report: Int8FloatReport | None = None
    proof: FloatProof | None = None
    #: the FP32-float TensorRT form kept beside an FP16-float one (opset 17: TensorRT 8.x parses it)
    fp32_float_path: Path | None = None


def write_int8_forms(fp32_path: Path, ranges: Mapping[str, float], paths: Mapping[str, Path], base: QdqSettings, *,
                     int8_float: str = "fp16", fp32_float_path: Path | None = None,
                     proof_inputs: np.ndarray | None = None,
                     labelled: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None) -> Int8Forms:
    """Write every form in ``paths`` ({variant: out path}) from one set of ``ranges``.

    With ``int8_float="fp16"`` the TensorRT form's float parts go to FP16 and are kept only when
    :func:`prove_fp16_floats` holds on ``proof_inputs`` (and the ``labelled`` batches); the FP32-float form
    it is proved against stays at ``fp32_float_path``. Otherwise the TensorRT form has FP32 float parts
    and the reason is returned."""
    if int8_float not in INT8_FLOATS:
        raise InputError(f"int8_float must be fp16 or fp32, not {int8_float!r}", "use --int8-float fp16 or fp32")
    if fp32_float_path is None and TENSORRT_FORM in paths:
        trt = Path(paths[TENSORRT_FORM])
        fp32_float_path = trt.with_name(trt.name.removesuffix(".onnx") + ".fp32-float.onnx")
    reports = {form: insert_qdq(fp32_path, ranges, Path(p) if form != TENSORRT_FORM or int8_float == "fp32"
                                else Path(fp32_float_path), form_settings(base, form))
               for form, p in paths.items()}
    if TENSORRT_FORM not in paths or int8_float == "fp32":
        return Int8Forms(reports=reports, int8_float="fp32" if TENSORRT_FORM in paths else int8_float)
    ref, out = Path(fp32_float_path), Path(paths[TENSORRT_FORM])
    float_report = proof = None
    try:
        float_report = convert_int8_float_fp16(ref, out)
    except (InputError, CheckFailed) as e:
        reason = f"FP16 float parts could not be written: {e}"
    else:
        if proof_inputs is None:
            raise InputError("the FP16 float parts need validation inputs to be proved")
        proof = prove_fp16_floats(out, ref, proof_inputs, labelled=labelled() if labelled else None)
        reason = proof.reason
    if reason is None:
        reports[TENSORRT_FORM] = dataclasses.replace(reports[TENSORRT_FORM], path=out, size_bytes=out.stat().st_size)
        return Int8Forms(reports=reports, int8_float="fp16", float_report=float_report, proof=proof,
                         fp32_float_path=ref)
    os.replace(ref, out)  # the FP32-float form becomes the TensorRT form
    reports[TENSORRT_FORM] = dataclasses.replace(reports[TENSORRT_FORM], path=out)
    return Int8Forms(reports=reports, int8_float="fp32", fallback_reason=reason, float_report=float_report,
                     proof=proof)
