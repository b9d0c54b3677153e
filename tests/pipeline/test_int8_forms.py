"""The two INT8 forms from one calibration, on real exported ResNets in real ONNX Runtime.

The TensorRT form's structure is held against NVIDIA ModelOpt 0.47 (``modelopt.onnx.quantization.quantize``,
int8, max calibration) run on the same exported ResNet-18 and ResNet-50: the constants below are the
quantized consumers ModelOpt chose (recorded once, in a separate venv; no runtime dependency on modelopt).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.export import ExportSettings, export_onnx, run_export
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.quantization import QdqSettings
from rexport.pipeline.quantization.float_parts import FP16_MIN_NORMAL, convert_int8_float_fp16
from rexport.pipeline.quantization.forms import tensors_for_forms, write_int8_forms
from rexport.pipeline.quantize import QuantizeSettings, run_quantize

SIZE = 32
SPEC = PreprocessSpec(input_size=SIZE, resize=SIZE)

#: ModelOpt 0.47's quantized consumers besides the Convs (every Conv: activation input 0 and weight input 1)
MODELOPT = {
    "resnet18": {"convs": 20, "qdq_pairs": 43, "adds": 8, "others": {
        ("MaxPool", "node_max_pool2d", 0), ("GlobalAveragePool", "node_mean", 0), ("Flatten", "node_Reshape_353", 0),
        *(("Add", f"node_add_{i}", 1) for i in (55, 101, 157, 203, 259, 305, 361, 407))}},
    "resnet50": {"convs": 53, "qdq_pairs": 109, "adds": 16, "others": {
        ("MaxPool", "node_max_pool2d", 0), ("GlobalAveragePool", "node_mean", 0), ("Flatten", "node_Reshape_914", 0),
        *(("Add", f"node_add_{i}", 1) for i in (85, 151, 217, 293, 359, 425, 491, 567, 633, 699, 765, 831, 897,
                                                973, 1039, 1105))}},
}


def _export(model: str, path: Path, weights: Path | None = None, num_classes: int | None = None) -> Path:
    export_onnx(ExportSettings(model=model, preprocess=SPEC, weights=str(weights) if weights else None,
                               num_classes=num_classes), path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("int8_forms")


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def forms(request, work):
    """Both forms of one exported model, written from one set of ranges (FP32 floats: structure only)."""
    model = request.param
    fp32 = _export(model, work / f"{model}.fp32.onnx")
    ranges = {t: 1.0 + 0.01 * i for i, t in enumerate(tensors_for_forms(fp32, QdqSettings()))}
    paths = {"int8": work / f"{model}.int8.onnx", "int8-openvino": work / f"{model}.int8-openvino.onnx"}
    out = write_int8_forms(fp32, ranges, paths, QdqSettings(), int8_float="fp32")
    return model, fp32, out


def _graph(path: Path):
    g = onnx.load(str(path)).graph
    return g, {o: n for n in g.node for o in n.output}


def _quantized_consumers(path: Path) -> set[tuple[str, str, int]]:
    g, producer = _graph(path)
    return {(n.op_type, n.name, i) for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            for i, x in enumerate(n.input) if x in producer and producer[x].op_type == "DequantizeLinear"}


def test_tensorrt_form_quantizes_exactly_what_modelopt_does(forms):
    model, _, out = forms
    ref = MODELOPT[model]
    got = _quantized_consumers(out.reports["int8"].path)
    convs = {name for op, name, _ in got if op == "Conv"}
    assert len(convs) == ref["convs"]
    assert got == {("Conv", c, i) for c in convs for i in (0, 1)} | ref["others"]
    ops = Counter(n.op_type for n in _graph(out.reports["int8"].path)[0].node)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == ref["qdq_pairs"] == out.reports["int8"].qdq_pairs
    adds = [c for c in got if c[0] == "Add"]
    assert len(adds) == ops["Add"] == ref["adds"]  # every Add: one quantized input (the residual)
    assert not any(op == "Gemm" for op, _, _ in got)  # the classifier stays in float


def test_openvino_form_is_the_nncf_parity_file(forms):
    model, _, out = forms
    got = _quantized_consumers(out.reports["int8-openvino"].path)
    g, producer = _graph(out.reports["int8-openvino"].path)

    def int8_grid(x: str) -> bool:  # dequantized, or a MaxPool of a dequantized tensor
        p = producer.get(x)
        return p is not None and (p.op_type == "DequantizeLinear" or (p.op_type == "MaxPool" and int8_grid(p.input[0])))
    adds = [n for n in g.node if n.op_type == "Add"]
    assert len(adds) == MODELOPT[model]["adds"] and all(int8_grid(x) for n in adds for x in n.input)  # both inputs
    assert {("Gemm", "node_linear", 0), ("Gemm", "node_linear", 1)} <= got  # classifier quantized
    # the MaxPool output stays on the INT8 grid without a Q/DQ of its own
    after_pool = [n for n in g.node if any(x in producer and producer[x].op_type == "MaxPool" for x in n.input)]
    assert after_pool and all(n.op_type != "QuantizeLinear" for n in after_pool)
    # same ranges in both files: every tensor quantized in both has the same amax
    trt, ov = out.reports["int8"].activation_amax, out.reports["int8-openvino"].activation_amax
    assert len(set(trt) & set(ov)) >= 20 and all(trt[t] == ov[t] for t in set(trt) & set(ov))


def test_fp16_float_parts_never_store_an_underflowing_scale(work):
    """A dead output channel gets the floor scale 1e-8/127, which FP16 flushes to zero: that DequantizeLinear
    keeps its FP32 scale (with a Cast to FP16 after it); every other scale is a normal FP16 number."""
    fp32 = work / "resnet18.fp32.onnx"
    if not fp32.exists():
        _export("resnet18", fp32)
    m = onnx.load(str(fp32))
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    w_init = next(i for i in m.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(w_init).copy()
    w[0] = 0.0
    w_init.CopyFrom(numpy_helper.from_array(w, w_init.name))
    rng = np.random.default_rng(0)  # random weights fold BN into zero biases, which the export drops: add some
    for n in m.graph.node:
        if n.op_type == "Conv" and len(n.input) == 2:
            out_ch = next(i for i in m.graph.initializer if i.name == n.input[1]).dims[0]
            m.graph.initializer.append(numpy_helper.from_array(
                rng.normal(0, 0.1, out_ch).astype(np.float32), f"{n.name}_bias"))
            n.input.append(f"{n.name}_bias")
    dead = work / "dead.fp32.onnx"
    onnx.save(m, str(dead))
    ranges = {t: 2.0 for t in tensors_for_forms(dead, QdqSettings())}
    ref = write_int8_forms(dead, ranges, {"int8": work / "dead.int8.fp32.onnx"}, QdqSettings(), int8_float="fp32")
    rep = convert_int8_float_fp16(ref.reports["int8"].path, work / "dead.int8.fp16.onnx")
    g = onnx.load(str(rep.path))
    assert next(o.version for o in g.opset_import if o.domain in ("", "ai.onnx")) == 19
    inits = {i.name: i for i in g.graph.initializer}
    scales = [inits[n.input[1]] for n in g.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    fp16_scales = [numpy_helper.to_array(s) for s in scales if s.data_type == TensorProto.FLOAT16]
    assert len(fp16_scales) == rep.fp16_scales
    assert all(np.abs(s.astype(np.float64)).min() >= FP16_MIN_NORMAL for s in fp16_scales)
    # INT8 weights, each DequantizeLinear with an FP16 scale, but the dead channel's (FP32 weight, Q and DQ)
    weight_dq = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == 19 and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in weight_dq)
    assert all(inits[n.input[1]].data_type == TensorProto.FLOAT16 for n in weight_dq)
    # the activation pairs feeding a Conv keep FP32 scales between Casts (ONNX Runtime derives the bias
    # scale s_x * s_w from them, which FP16 would underflow)
    producer = {o: n for n in g.graph.node for o in n.output}
    with_bias = [n for n in g.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert with_bias
    for conv in with_bias:
        cast = producer[conv.input[0]]
        assert cast.op_type == "Cast" and producer[cast.input[0]].op_type == "DequantizeLinear"
        assert inits[producer[cast.input[0]].input[1]].data_type == TensorProto.FLOAT
    dq = next(n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.name in rep.fp32_scales)
    assert inits[dq.input[1]].data_type == TensorProto.FLOAT
    assert next(n for n in g.graph.node if dq.output[0] in n.input).op_type == "Cast"
    x = np.random.default_rng(3).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    y16 = ort.InferenceSession(str(rep.path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    y32 = ort.InferenceSession(str(ref.reports["int8"].path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    assert y16.dtype == np.float32 and np.all(np.isfinite(y16))
    cos = (y16 * y32).sum(1) / np.linalg.norm(y16, axis=1) / np.linalg.norm(y32, axis=1)
    assert cos.min() >= 0.999


def test_fp16_float_parts_fall_back_with_the_reason(tmp_path):
    """Logits beyond FP16's range (65504) make the FP16-float file non-finite: the stage writes FP32 float
    parts and records why, in the manifest summary."""
    torch.manual_seed(0)
    from rexport.models.resnet import resnet18

    model = resnet18(num_classes=10)
    with torch.no_grad():
        model.fc.weight.mul_(1e6)
    torch.save(model.state_dict(), tmp_path / "big.pth")
    run = RunDir(tmp_path / "run")
    with run.locked():
        run_export(run, ExportSettings(model="resnet18", weights=str(tmp_path / "big.pth"), num_classes=10,
                                       preprocess=SPEC))
        rec = run_quantize(run, QuantizeSettings(precision="int8", calib_samples=8, calib_method="minmax",
                                                 int8_float_samples=8), progress=False)
    s = rec["summary"]
    assert s["int8_float_requested"] == "fp16" and s["int8_float"] == "fp32"
    reason, proof = s["int8_float_fallback_reason"], s["int8_float_proof"]
    if proof is None:  # the FP16 file itself gave non-finite logits in its ONNX Runtime check
        assert "non-finite" in reason
    else:  # it ran, and the proof names the check that failed
        assert not proof["kept"] and reason == proof["reason"]
        assert (proof["cosine_min"] < 0.999) == ("cosine_min" in reason)
        assert (proof["top1_agreement"] < 0.995) == ("top-1 agreement" in reason)
    assert s["int8_fp32_float_file"] is None and not run.file("onnx/model.int8.fp32-float.onnx").exists()
    g = onnx.load(str(run.file("onnx/model.int8.onnx"))).graph
    assert not any(i.data_type == TensorProto.FLOAT16 for i in g.initializer)
    assert run.stage("quantize:int8")["summary"]["int8_float_fallback_reason"] == s["int8_float_fallback_reason"]
