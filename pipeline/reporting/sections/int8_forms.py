"""Report section: the INT8 files per target, from one calibration (issue 9), with the float parts of the
TensorRT form and the proof (or the reason) behind them, and which engine was compiled from which file."""
from __future__ import annotations

from rexport.pipeline.reporting.formatting import fmt
from rexport.pipeline.reporting.sections import Section

ORDER = 30


def build_section(src, report):
    s = src.summary("quantize:int8")
    if s is None or not s.forms:
        return None
    built_from: dict[str, list[str]] = {}
    for name, st in src.stages.items():
        if not name.startswith("build:") or st.get("status") != "ok":
            continue
        built = src.summary(name)
        if built is not None and built.source_variant:
            built_from.setdefault(built.source_variant, []).append(name.split(":", 1)[1])
    rows = []
    for variant, info in s.forms.items():
        qdq = info.qdq or {}
        floats = s.int8_float if variant == "int8" else "fp32"
        rows.append([variant, info.file, info.target, str(qdq.get("qdq_pairs", "-")),
                     qdq.get("settings", {}).get("residual_add", "-"), floats or "-",
                     ", ".join(built_from.get(variant, [])) or "-"])
    proof = s.int8_float_proof
    text = ["One calibration, one INT8 file per target: `int8` follows TensorRT's explicit-quantization "
            "placement (the consumers NVIDIA ModelOpt quantizes), `int8-openvino` keeps NNCF parity."]
    if s.int8_float_fallback_reason:
        text.append(f"The TensorRT form has FP32 float parts: {s.int8_float_fallback_reason}.")
    elif proof and proof.get("kept"):
        acc = "" if proof.get("accuracy_fp16") is None else (
            f", top-1 {fmt('top1', proof['accuracy_fp16'])} vs {fmt('top1', proof['accuracy_fp32'])} with FP32 "
            f"floats on {proof['labelled_samples']} labelled images")
        text.append(f"FP16 float parts kept: against the FP32-float form in ONNX Runtime CPU, cosine_min "
                    f"{fmt('cosine_min', proof['cosine_min'])}, top-1 agreement "
                    f"{fmt('top1_agreement', proof['top1_agreement'])} on {proof['samples']} inputs{acc}.")
    elif s.int8_float == "fp32":
        text.append("The TensorRT form has FP32 float parts, as asked (--int8-float fp32).")
    return Section(key="int8_forms", title="INT8 files per target",
                   headers=["variant", "file", "target", "Q/DQ pairs", "Add inputs", "float parts", "engines"],
                   rows=rows, text=text,
                   data={"forms": {k: f.to_json() for k, f in s.forms.items()}, "int8_float": s.int8_float,
                         "int8_float_fallback_reason": s.int8_float_fallback_reason, "proof": proof,
                         "built_from": built_from})
