"""The TensorRT form's float parts in FP16: what a strongly typed TensorRT 10/11 engine then runs in FP16,
as the INT8+FP16 builder flags make TensorRT 8.x do.

Written as NVIDIA ModelOpt writes ``high_precision_dtype="fp16"`` (opset 19, DequantizeLinear emitting
FP16 directly, QuantizeLinear reading FP16 with an FP16 scale, FP32 graph inputs/outputs with one Cast
each), with two differences, because a mixed INT8/FP16 file is not safe just because a reference tool
writes one (issue 9: ModelOpt's FP16 form of a trained ResNet-18 scored 61.9 % in ONNX Runtime against
85.1 % for its FP32 form):

* No FP16 scale that underflows. A scale is stored in FP16 only when every value is a normal FP16 number
  (>= 2**-14, relative rounding <= 2**-11); otherwise that Q/DQ keeps its FP32 scale with a Cast on each
  side (tiny weight channels, e.g. a dead channel's floor scale of 1e-8/127, which FP16 flushes to zero:
  a QuantizeLinear by zero is inf). Weights are quantized from FP32 with their FP32 scale and stored as
  INT8 (a quarter of the file; TensorRT >= 10 takes INT8 weights), and their DequantizeLinear carries the FP16
  scale; ModelOpt instead rounds the weights to FP16 before quantizing them.
* The activation Q/DQ pair feeding a Conv/Gemm that has a bias keeps its FP32 scale between Casts
  (FP16 -> FP32 -> Q -> DQ -> FP16): ONNX Runtime's CPU provider has no FP16 Conv on x86 and rewrites
  DQ -> Conv(bias) into an INT32 bias whose scale s_x * s_w it computes in FP16, where it underflows
  (see ``_bias_scale_inputs``; digits resnet18: logit cosine 0.87 -> 0.9995 against the FP32-float file
  with this); with the Cast it leaves the bias alone and runs the Conv in FP32 between
  its own inserted Casts, so the CPU check measures FP16 storage rounding. Ops that overflow in FP16
  (``keep_fp32_ops``: Softmax/LogSoftmax) are kept in FP32 between explicit Casts.

Whether the result is kept is decided by :mod:`rexport.pipeline.quantization.float_proof`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rexport.core.errors import InputError
from rexport.pipeline.quantization.fp16 import DEFAULT_FP32_OPS, FP16_MAX, FP16_MIN_SUBNORMAL
from rexport.pipeline.quantization.onnx_io import NameSource, default_opset, load_onnx, write_checked

FP16_MIN_NORMAL = 2.0 ** -14
#: QuantizeLinear/DequantizeLinear take an FP16 scale from this opset on
FP16_QDQ_OPSET = 19
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16


@dataclass(frozen=True)
class Int8FloatReport:
    path: Path
    size_bytes: int
    opset: int
    #: Q/DQ scales stored in FP16
    fp16_scales: int
    #: Q/DQ nodes left with an FP32 scale (a value FP16 would flush or round badly), with Casts around them
    fp32_scales: tuple[str, ...] = field(default_factory=tuple)
    #: float weight values clamped to FP16's range
    clamped_values: int = 0


def fp16_scale_safe(scale: np.ndarray) -> bool:
    """True when every scale value is a normal FP16 number: no underflow, rounding <= 2**-11 relative."""
    a = np.abs(scale.astype(np.float64))
    return bool(np.all(np.isfinite(a)) and np.all(a >= FP16_MIN_NORMAL) and np.all(a <= FP16_MAX))


def convert_int8_float_fp16(fp32_float_path: Path, out_path: Path, *,
                            keep_fp32_ops: Sequence[str] = DEFAULT_FP32_OPS) -> Int8FloatReport:
    """The same Q/DQ file with its float parts (every non-Q/DQ float tensor and weight) in FP16."""
    model = load_onnx(fp32_float_path)
    if default_opset(model) < FP16_QDQ_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, FP16_QDQ_OPSET)
        except Exception as e:  # an op the converter cannot carry to opset 19
            raise InputError(f"cannot convert {fp32_float_path.name} to opset {FP16_QDQ_OPSET} for FP16 scales: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                             "use --int8-float fp32") from None
    float_tensors = _float_tensors(model)
    pass_ = _Fp16Pass(model, float_tensors, set(keep_fp32_ops))
    pass_.run()
    path = write_checked(model, out_path)
    return Int8FloatReport(path=path, size_bytes=path.stat().st_size, opset=default_opset(model),
                           fp16_scales=pass_.fp16_scales, fp32_scales=tuple(pass_.fp32_scales),
                           clamped_values=pass_.clamped)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the FP32 tensors of the model (inferred types; initializers and graph I/O included)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    names = {v.name for v in (*g.input, *g.value_info, *g.output) if v.type.tensor_type.elem_type == _F32}
    return names | {i.name for i in g.initializer if i.data_type == _F32}


class _Fp16Pass:
    """Rewrites the graph in place; one pass in topological order, tracking each tensor's new type."""

    def __init__(self, model: onnx.ModelProto, float_tensors: set[str], keep_fp32: set[str]) -> None:
        self.model, self.g = model, model.graph
        self.float_tensors, self.keep_fp32 = float_tensors, keep_fp32
        self.inits = {i.name: i for i in self.g.initializer}
        self.names = NameSource(model)
        self.dtype: dict[str, int] = {i.name: i.data_type for i in self.g.initializer}
        self.dtype.update({v.name: v.type.tensor_type.elem_type for v in self.g.input})
        self.casts: dict[tuple[str, int], str] = {}   # (tensor, to) -> cast output
        self.fp16_inits: dict[str, str] = {}          # fp32 initializer -> its fp16 copy
        self.fp16_scales, self.fp32_scales, self.clamped = 0, [], 0
        self.out: list[onnx.NodeProto] = []
        self.fp32_scale_names = _bias_scale_inputs(self.g)

    def run(self) -> None:
        for node in list(self.g.node):
            if node.op_type == "QuantizeLinear":
                self._quantize(node)
            elif node.op_type == "DequantizeLinear":
                self._dequantize(node)
            else:
                self._float_node(node, _F32 if node.op_type in self.keep_fp32 else _F16)
        self._fp32_outputs()
        del self.g.node[:]
        self.g.node.extend(self.out)
        del self.g.value_info[:]  # stale FP32 types; the checker and ONNX Runtime infer them again
        used = {x for n in self.g.node for x in n.input}
        keep = [i for i in self.g.initializer if i.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)

    # -- the three kinds of node ------------------------------------------------------------------

    def _quantize(self, node: onnx.NodeProto) -> None:
        x, scale = node.input[0], node.input[1]
        safe = self._scale_safe(scale)
        if safe and x in self.inits:  # a weight: stored as INT8, quantized here with its exact FP32 scale
            self._int8_weight(node)
            return
        if safe:  # the graph input is cast to FP16 first, so Q and DQ share one FP16 scale (as ModelOpt)
            node.input[0] = self._as(x, _F16)
            node.input[1] = self._fp16_init(scale)
            self.fp16_scales += 1
        else:
            if self.dtype.get(x) == _F16:
                node.input[0] = self._cast(x, _F32)
            self.fp32_scales.append(node.name)
        self.out.append(node)
        self.dtype[node.output[0]] = TensorProto.INT8

    def _int8_weight(self, node: onnx.NodeProto) -> None:
        """Replace Q(FP32 weight) by the INT8 tensor it computes (ONNX rounding: half to even), named as
        the Q output, so its DequantizeLinear reads it unchanged. TensorRT >= 10 takes INT8 weights; the
        FP16-float file is for TensorRT 10/11 only (8.x builds the FP32-float form)."""
        w = numpy_helper.to_array(self.inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(self.inits[node.input[1]]).astype(np.float32)
        if scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        q = np.clip(np.rint(w / scale), -128, 127).astype(np.int8)
        self.g.initializer.append(numpy_helper.from_array(q, node.output[0]))
        self.dtype[node.output[0]] = TensorProto.INT8

    def _dequantize(self, node: onnx.NodeProto) -> None:
        scale, y = node.input[1], node.output[0]
        if self._scale_safe(scale):
            node.input[1] = self._fp16_init(scale)
            self.fp16_scales += 1
            self.out.append(node)
        else:
            self.fp32_scales.append(node.name)
            node.output[0] = self.names.tensor(f"{y}_fp32")
            self.out.append(node)
            self.out.append(helper.make_node("Cast", [node.output[0]], [y], to=_F16,
                                             name=self.names.node(f"{y}_to_fp16")))
        self.dtype[y] = _F16

    def _float_node(self, node: onnx.NodeProto, want: int) -> None:
        for i, x in enumerate(node.input):
            if x and x in self.float_tensors:
                node.input[i] = self._as(x, want)
        if node.op_type == "Cast":
            to = next(a for a in node.attribute if a.name == "to")
            if to.i == _F32:
                to.i = want
        if node.op_type == "Constant":
            self._constant_to_fp16(node)
        self.out.append(node)
        for y in node.output:
            if y in self.float_tensors:
                self.dtype[y] = want
        if want == _F32:  # a kept-FP32 node: its float outputs go on in FP16
            for i, y in enumerate(node.output):
                if y in self.float_tensors:
                    node.output[i] = self.names.tensor(f"{y}_fp32")
                    self.out.append(helper.make_node("Cast", [node.output[i]], [y], to=_F16,
                                                     name=self.names.node(f"{y}_to_fp16")))
                    self.dtype[y] = _F16

    # -- helpers ----------------------------------------------------------------------------------

    def _as(self, x: str, want: int) -> str:
        have = self.dtype.get(x, _F32)
        if have == want:
            return x
        if x in self.inits and want == _F16:
            return self._fp16_init(x, clamp=True)
        return self._cast(x, want)

    def _cast(self, x: str, to: int) -> str:
        key = (x, to)
        if key not in self.casts:
            y = self.names.tensor(f"{x}_{'fp16' if to == _F16 else 'fp32'}")
            self.out.append(helper.make_node("Cast", [x], [y], to=to, name=self.names.node(f"{y}_Cast")))
            self.casts[key] = y
            self.dtype[y] = to
        return self.casts[key]

    def _scale_safe(self, scale: str) -> bool:
        init = self.inits.get(scale)
        return (init is not None and scale not in self.fp32_scale_names
                and fp16_scale_safe(numpy_helper.to_array(init)))

    def _fp16_init(self, name: str, *, clamp: bool = False) -> str:
        if name not in self.fp16_inits:
            a = numpy_helper.to_array(self.inits[name]).astype(np.float64)
            if clamp:
                a, n = _clamp_fp16(a)
                self.clamped += n
            new = self.names.tensor(f"{name}_fp16")
            self.g.initializer.append(numpy_helper.from_array(a.astype(np.float16), new))
            self.fp16_inits[name] = new
            self.dtype[new] = _F16
        return self.fp16_inits[name]

    def _constant_to_fp16(self, node: onnx.NodeProto) -> None:
        for a in node.attribute:
            if a.name == "value" and a.t.data_type == _F32:
                arr, n = _clamp_fp16(numpy_helper.to_array(a.t).astype(np.float64))
                self.clamped += n
                a.t.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), a.t.name))

    def _fp32_outputs(self) -> None:
        """Graph outputs stay FP32: the node writing one writes an FP16 tensor that a Cast turns back."""
        for out in self.g.output:
            if out.type.tensor_type.elem_type != _F32 or self.dtype.get(out.name) != _F16:
                continue
            inner = self.names.tensor(f"{out.name}_fp16")
            for node in self.out:
                node.input[:] = [inner if x == out.name else x for x in node.input]
                node.output[:] = [inner if y == out.name else y for y in node.output]
            self.out.append(helper.make_node("Cast", [inner], [out.name], to=_F32,
                                             name=self.names.node(f"{out.name}_to_fp32")))


def _bias_scale_inputs(g: onnx.GraphProto) -> set[str]:
    """Scales of the activation DequantizeLinear nodes that feed input 0 of a Conv/Gemm with a bias: ONNX
    Runtime (WeightBiasQuantization, 1.2x) quantizes such a bias to INT32 with the scale s_x * s_w computed
    in the scales' own type, and in FP16 that product underflows (digits resnet18: logit cosine 0.87 against
    the FP32-float file, 0.9994 with that transformer off). An FP32 scale with Casts around the pair keeps
    ONNX Runtime exact and leaves the layer's math to the engine."""
    producer = {o: n for n in g.node for o in n.output}
    names = set()
    for n in g.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(n.input) > 2 and n.input[2]:
            dq = producer.get(n.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear":
                names.add(dq.input[1])
    return names


def _clamp_fp16(a: np.ndarray) -> tuple[np.ndarray, int]:
    """Clamp to FP16's range (|x| > 65504 -> +-65504, 0 < |x| < 2**-24 -> +-2**-24); and how many moved."""
    mag = np.abs(a)
    low = (mag > 0) & (mag < FP16_MIN_SUBNORMAL)
    high = mag > FP16_MAX
    out = np.where(low, np.sign(a) * FP16_MIN_SUBNORMAL, a)
    out = np.where(high, np.sign(a) * FP16_MAX, out)
    return out, int(np.count_nonzero(low) + np.count_nonzero(high))
