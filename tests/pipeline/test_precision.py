"""FP16 and INT8 Q/DQ conversion on a real exported ResNet-18, checked in real ONNX Runtime and OpenVINO."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper

from rexport.core.errors import InputError
from rexport.core.preprocess import METADATA_KEY, PreprocessSpec
from rexport.models.resnet import resnet18
from rexport.pipeline.export import ExportSettings, export_onnx
from rexport.pipeline.quantization import (QdqSettings, convert_fp16, drop_residual_branch_qdq, insert_qdq,
                                           quantized_layer_outputs, tensors_to_calibrate)

SIZE = 64
NUM_CLASSES = 10
SPEC = PreprocessSpec(input_size=SIZE, resize=73)
PREPROCESS = SPEC.to_json()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("precision")


@pytest.fixture(scope="module")
def fp32_path(work: Path) -> Path:
    """ResNet-18 written by the export stage itself (BN folded into the Convs, opset 17, dynamic batch),
    from a checkpoint whose BN statistics come from data, so the folded Convs have real biases and scales."""
    torch.manual_seed(0)
    model = resnet18(num_classes=NUM_CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, SIZE, SIZE))
    torch.save(model.state_dict(), work / "bn.pth")
    path = work / "model.fp32.onnx"
    export_onnx(ExportSettings(model="resnet18", weights=str(work / "bn.pth"), preprocess=SPEC), path)
    return path


def _batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def ranges(fp32_path: Path) -> dict[str, float]:
    """Real min-max calibration: every float tensor's amax over a few batches."""
    m = onnx.load(str(fp32_path))
    names = ["input"] + [o for n in m.graph.node for o in n.output if o != "logits"]
    m.graph.output.extend([onnx.ValueInfoProto(name=t) for t in names])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    amax: dict[str, float] = {}
    for seed in range(4):
        for name, v in zip(outs, sess.run(None, {"input": _batch(4, seed)})):
            if v.dtype == np.float32:
                amax[name] = max(amax.get(name, 0.0), float(np.abs(v).max()))
    return amax


@pytest.fixture(scope="module")
def fp16(fp32_path: Path, work: Path):
    return convert_fp16(fp32_path, work / "model.fp16.onnx")


@pytest.fixture(scope="module")
def int8(fp32_path: Path, ranges: dict[str, float], work: Path):
    return insert_qdq(fp32_path, ranges, work / "model.int8.onnx")


class Graph:
    """Read-only views of an ONNX graph that the assertions need."""

    def __init__(self, path: Path) -> None:
        self.model = onnx.load(str(path))
        g = self.model.graph
        self.nodes = list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}

    def of_type(self, op: str) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type == op]

    def source(self, tensor: str) -> str:
        p = self.producer.get(tensor)
        return p.op_type if p is not None else ("initializer" if tensor in self.inits else "graph input")

    def quantized(self, tensor: str) -> bool:
        """Fed by a DequantizeLinear, or a MaxPool of one (TensorRT and OpenVINO carry the DQ across it)."""
        p = self.producer.get(tensor)
        if p is not None and p.op_type == "MaxPool":
            p = self.producer.get(p.input[0])
        return p is not None and p.op_type == "DequantizeLinear"

    def weight_dq(self, node: onnx.NodeProto) -> onnx.NodeProto:
        dq = self.producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear", f"{node.name} weight not dequantized"
        return dq

    def weight(self, node: onnx.NodeProto) -> np.ndarray:
        """The weight a layer reads, through its Q/DQ (float -> Q -> DQ, or int8 -> DQ)."""
        src = self.weight_dq(node).input[0]
        q = self.producer.get(src)
        return self.array(q.input[0] if q is not None else src)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])


# ------------------------------------------------------------------------------------------------- FP16


def test_fp16_has_fp16_weights_and_fp32_io(fp16, fp32_path: Path):
    g = Graph(fp16.path)
    for conv in g.of_type("Conv"):
        assert g.inits[conv.input[1]].data_type == TensorProto.FLOAT16, conv.name
    assert [i.type.tensor_type.elem_type for i in g.model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in g.model.graph.output] == [TensorProto.FLOAT]
    assert [(i.name, o.name) for i, o in zip(g.model.graph.input, g.model.graph.output)] == [("input", "logits")]
    assert fp16.fp32_nodes == ()
    assert fp16.size_bytes < 0.6 * fp32_path.stat().st_size


def test_fp16_keeps_metadata(fp16):
    meta = {p.key: p.value for p in onnx.load(str(fp16.path)).metadata_props}
    assert meta[METADATA_KEY] == PREPROCESS


@pytest.mark.parametrize("batch", [1, 3])
def test_fp16_runs_and_matches_fp32(fp16, fp32_path: Path, batch: int):
    x = _batch(batch, 10 + batch)
    y16, y32 = _run(fp16.path, x), _run(fp32_path, x)
    assert y16.dtype == np.float32 and y16.shape == (batch, NUM_CLASSES)
    assert _cosines(y16, y32).min() > 0.999


def test_fp16_keep_fp32_ops_leaves_those_nodes_in_fp32(fp32_path: Path, work: Path):
    rep = convert_fp16(fp32_path, work / "gemm32.fp16.onnx", keep_fp32_ops=("Gemm",))
    g = Graph(rep.path)
    (gemm,) = g.of_type("Gemm")
    assert rep.fp32_nodes == (gemm.name,)
    fc = Graph(fp32_path).inits
    for name in gemm.input[1:]:  # weights and bias: the FP32 tensors themselves, not an FP16 copy cast back
        np.testing.assert_array_equal(g.array(name), numpy_helper.to_array(fc[name]))
    assert g.source(gemm.input[0]) == "Cast"
    assert gemm.output[0] == "logits", "the FP32 classifier writes the graph output, no trip through FP16"
    assert g.inits[g.of_type("Conv")[0].input[1]].data_type == TensorProto.FLOAT16
    assert _cosines(_run(rep.path, _batch(2, 5)), _run(fp32_path, _batch(2, 5))).min() > 0.999


def test_fp16_missing_input_is_input_error(work: Path):
    with pytest.raises(InputError, match="not found"):
        convert_fp16(work / "nope.onnx", work / "nope.fp16.onnx")
    assert not (work / "nope.fp16.onnx").exists()


# ------------------------------------------------------------------------------------------------- INT8


def test_qdq_nodes_are_symmetric_int8(int8):
    g = Graph(int8.path)
    qs, dqs = g.of_type("QuantizeLinear"), g.of_type("DequantizeLinear")
    assert qs and len(qs) == len(dqs) == int8.qdq_pairs
    for node in qs + dqs:
        zp, scale = g.inits[node.input[2]], g.array(node.input[1])
        assert zp.data_type == TensorProto.INT8, node.name
        assert not g.array(node.input[2]).any(), f"{node.name}: zero point must be 0"
        assert scale.dtype == np.float32 and (scale > 0).all(), node.name
    for tensor, amax in int8.activation_amax.items():
        q = next(n for n in qs if n.input[0] == tensor)
        assert g.array(q.input[1]).shape == () and g.array(q.input[1]) == pytest.approx(amax / 127, rel=1e-6)


def test_every_conv_and_classifier_input_is_quantized(int8):
    g = Graph(int8.path)
    layers = g.of_type("Conv") + g.of_type("Gemm")
    assert len(layers) == 21 and len(int8.quantized_nodes) == 21
    for node in layers:
        assert g.quantized(node.input[0]), f"{node.name} activation input comes from {g.source(node.input[0])}"
        g.weight_dq(node)
        if len(node.input) > 2:  # bias stays float
            assert node.input[2] in g.inits and g.inits[node.input[2]].data_type == TensorProto.FLOAT


def test_both_inputs_of_every_add_are_quantized(int8):
    g = Graph(int8.path)
    adds = g.of_type("Add")
    assert len(adds) == 8
    for add in adds:
        assert all(g.quantized(x) for x in add.input), f"{add.name}: {[g.source(x) for x in add.input]}"


def test_pools_run_on_quantized_inputs_without_requantizing(int8):
    g = Graph(int8.path)
    (maxpool,), (gap,) = g.of_type("MaxPool"), g.of_type("GlobalAveragePool")
    for pool in (maxpool, gap):
        assert g.source(pool.input[0]) == "DequantizeLinear", pool.name
    # a max-pool of INT8 values is INT8 already: a second Q/DQ on its output would cost OpenVINO a
    # standalone requantization
    consumers = [n.op_type for n in g.nodes if maxpool.output[0] in n.input]
    assert consumers and "QuantizeLinear" not in consumers


def test_residual_mode_quantizes_only_the_residual_input(fp32_path, ranges, work: Path):
    rep = insert_qdq(fp32_path, ranges, work / "residual.onnx", QdqSettings(residual_add="residual"))
    g = Graph(rep.path)
    for add in g.of_type("Add"):
        kinds = sorted("quantized" if g.quantized(x) else g.source(x) for x in add.input)
        assert kinds == ["Conv", "quantized"], f"{add.name}: {kinds}"
    # the downsampling blocks' residual is the 1x1 downsample conv output
    downsample = [c for c in g.of_type("Conv") if g.weight(c).shape[-1] == 1]
    assert len(downsample) == 3
    assert all(c.output[0] in rep.activation_amax for c in downsample)


def test_drop_residual_branch_qdq_gives_the_residual_placement(int8, fp32_path, ranges, work: Path):
    residual = insert_qdq(fp32_path, ranges, work / "residual2.onnx", QdqSettings(residual_add="residual"))
    changed = drop_residual_branch_qdq(int8.path, work / "dropped.onnx")
    assert len(changed) == 8
    quantized = lambda p: sorted(n.input[0] for n in Graph(p).of_type("QuantizeLinear"))  # noqa: E731
    assert quantized(work / "dropped.onnx") == quantized(residual.path)
    x = _batch(2, 21)
    np.testing.assert_allclose(_run(work / "dropped.onnx", x), _run(residual.path, x), rtol=0, atol=1e-5)


def test_one_qdq_pair_per_tensor(int8):
    g = Graph(int8.path)
    sources = [q.input[0] for q in g.of_type("QuantizeLinear")]
    assert len(sources) == len(set(sources))
    dq_consumers = {dq.output[0]: 0 for dq in g.of_type("DequantizeLinear")}
    for node in g.nodes:
        for x in node.input:
            if x in dq_consumers:
                dq_consumers[x] += 1
    assert max(dq_consumers.values()) >= 2, "a block output feeds a conv and an add through one Q/DQ"


def test_weight_scales_are_per_output_channel(int8, fp32_path, ranges, work: Path):
    g = Graph(int8.path)
    for node in g.of_type("Conv") + g.of_type("Gemm"):
        dq = g.weight_dq(node)
        w = g.weight(node)
        assert g.source(dq.input[0]) == "QuantizeLinear"  # default: float weight -> Q -> DQ (TensorRT 8.x)
        scale = g.array(dq.input[1])
        assert scale.shape == (w.shape[0],), node.name
        assert {a.name: a.i for a in dq.attribute}.get("axis") == 0
        np.testing.assert_allclose(scale, np.abs(w).reshape(w.shape[0], -1).max(1) / 127, rtol=1e-6)
    per_tensor = insert_qdq(fp32_path, ranges, work / "per_tensor.onnx", QdqSettings(per_channel=False))
    g = Graph(per_tensor.path)
    assert all(g.array(g.weight_dq(c).input[1]).shape == () for c in g.of_type("Conv"))


def test_int8_weights_are_stored_as_int8_with_the_same_numerics(int8, fp32_path, ranges, work: Path):
    rep = insert_qdq(fp32_path, ranges, work / "int8w.onnx", QdqSettings(int8_weights=True))
    g = Graph(rep.path)
    for conv in g.of_type("Conv"):
        q = g.inits[g.weight_dq(conv).input[0]]
        assert q.data_type == TensorProto.INT8 and np.abs(numpy_helper.to_array(q)).max() <= 127
    assert not any(i.data_type == TensorProto.FLOAT and len(i.dims) == 4 for i in g.inits.values())
    assert rep.size_bytes < 0.35 * int8.size_bytes
    x = _batch(3, 7)
    np.testing.assert_allclose(_run(rep.path, x), _run(int8.path, x), rtol=0, atol=1e-4)


def test_first_conv_and_classifier_can_stay_float(fp32_path, ranges, work: Path):
    rep = insert_qdq(fp32_path, ranges, work / "ends_float.onnx",
                     QdqSettings(quantize_first_conv=False, quantize_classifier=False))
    g = Graph(rep.path)
    first, (gemm,) = g.of_type("Conv")[0], g.of_type("Gemm")
    for node in (first, gemm):
        assert node.name in rep.excluded_nodes and node.name not in rep.quantized_nodes
        assert not g.quantized(node.input[0]) and g.source(node.input[1]) == "initializer"
    assert first.input[0] == "input" and "input" not in rep.activation_amax
    assert len(rep.quantized_nodes) == 19


def test_exclude_nodes_by_name_or_output(fp32_path, ranges, work: Path):
    convs = Graph(fp32_path).of_type("Conv")
    by_name, by_output = convs[3].name, convs[5].output[0]
    rep = insert_qdq(fp32_path, ranges, work / "excluded.onnx", QdqSettings(exclude_nodes=(by_name, by_output)))
    g = Graph(rep.path)
    for conv in (g.of_type("Conv")[3], g.of_type("Conv")[5]):
        assert conv.name in rep.excluded_nodes
        assert g.source(conv.input[1]) == "initializer" and not g.quantized(conv.input[0])
    assert g.quantized(g.of_type("Conv")[4].input[0])
    with pytest.raises(InputError, match="no_such_layer"):
        insert_qdq(fp32_path, ranges, work / "bad.onnx", QdqSettings(exclude_nodes=("no_such_layer",)))


def test_missing_range_is_input_error_naming_the_tensor(fp32_path, ranges, work: Path):
    needed = tensors_to_calibrate(fp32_path)
    partial = {k: v for k, v in ranges.items() if k != needed[2]}
    out = work / "missing.onnx"
    with pytest.raises(InputError, match=needed[2]):
        insert_qdq(fp32_path, partial, out)
    assert not out.exists()
    with pytest.raises(InputError, match="finite"):
        insert_qdq(fp32_path, {**ranges, needed[0]: float("nan")}, out)


def test_tensors_to_calibrate_are_the_quantized_activations(int8, fp32_path):
    assert tensors_to_calibrate(fp32_path) == list(int8.activation_amax)


@pytest.mark.parametrize("batch", [1, 3])
def test_int8_runs_in_ort_at_batch_1_and_3(int8, fp32_path, batch: int):
    x = _batch(batch, 30 + batch)
    y8 = _run(int8.path, x)
    assert y8.shape == (batch, NUM_CLASSES) and np.isfinite(y8).all()
    np.testing.assert_allclose(y8, _run(int8.path, np.concatenate([x, x]))[:batch], rtol=0, atol=1e-5)


def test_int8_is_close_to_fp32(int8, fp32_path):
    # Random weights at 64x64 are harsher than a trained net at 224 (worst image ~0.98 here, 0.999 at 224
    # in benchmarks/bench_int8_placement.py); ONNX Runtime's own quantizer scores the same on this model.
    x = _batch(16, 50)
    cos = _cosines(_run(int8.path, x), _run(fp32_path, x))
    assert cos.mean() > 0.99 and cos.min() > 0.97


def test_int8_keeps_metadata_and_fp32_tensor_names(int8, fp32_path):
    meta = {p.key: p.value for p in onnx.load(str(int8.path)).metadata_props}
    assert meta[METADATA_KEY] == PREPROCESS
    layers = quantized_layer_outputs(int8.path)
    assert layers == list(int8.layer_outputs) and len(layers) == 21
    fp32 = Graph(fp32_path)
    fp32_outputs = {n.name: n.output[0] for n in fp32.nodes}
    assert all(fp32_outputs[name] == tensor for name, tensor in layers)
    int8_outputs = {o for n in Graph(int8.path).nodes for o in n.output}
    assert {o for n in fp32.nodes for o in n.output} <= int8_outputs


def test_openvino_compiles_and_runs_the_int8_file(int8, fp32_path):
    import openvino as ov

    from rexport.core.env import cpu_info
    from rexport.pipeline.backends.openvino import has_vnni, prepare_int8

    core = ov.Core()
    model = ov.convert_model(str(int8.path))  # through the ONNX frontend, as the engine build does
    if not has_vnni(cpu_info()["isa"]):
        # without VNNI the CPU plugin's u8 x s8 pairs saturate int16 on this file's signed activations:
        # compile it the way the engine build does (unsigned post-ReLU quantizers, 7-bit overflow fix)
        assert prepare_int8(model, cpu_info()["isa"])["weights_7bit_overflow_fix"] >= 1
    compiled = core.compile_model(model, "CPU")
    x = _batch(3, 40)
    y = compiled({0: x})[0]
    assert y.shape == (3, NUM_CLASSES)
    assert _cosines(y, _run(fp32_path, x)).min() > 0.99
