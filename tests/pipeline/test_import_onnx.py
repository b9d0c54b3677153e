"""`rexport import`: an ONNX classifier that is not a ResNet (depthwise convolutions, hardswish, a
squeeze-excite block, trained on real digits and exported at opset 13 with a fixed batch) goes
through import, fp16, int8, the OpenVINO engine, evaluate and report, with the imported FP32 ONNX
as the reference; and each kind of bad ONNX is refused with one line (exit 2)."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

pytest.importorskip("sklearn")

from rexport.core.errors import InputError  # noqa: E402
from rexport.demo import DIGITS_SPEC, load_folder, write_digits  # noqa: E402
from rexport.pipeline.import_onnx import ImportSettings, run_import  # noqa: E402
from rexport.pipeline.manifest import RunDir  # noqa: E402
from conftest import rexport_cli  # noqa: E402


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


def mobile_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish(),
        nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.Hardswish(), SqueezeExcite(16),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.Hardswish(),
        nn.Conv2d(32, 32, 3, 2, 1, groups=32), nn.BatchNorm2d(32), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    """The small net trained for a few steps on the digits, exported by torch at opset 13, batch 1."""
    root = tmp_path_factory.mktemp("byom")
    data = write_digits(root / "data")
    x, y = load_folder(data.train, DIGITS_SPEC)
    torch.manual_seed(0)
    net = mobile_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: one thread is several times cheaper on a shared machine
    try:
        for step in range(120):
            idx = torch.randint(0, len(xt), (32,), generator=torch.Generator().manual_seed(step))
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    path = root / "digits_mobile.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=13,
                      input_names=["pixels"], output_names=["scores"])
    return path, data


def test_non_resnet_onnx_goes_through_every_stage(digits_onnx, tmp_path):
    from rexport.pipeline.backends import get_backend
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize
    from rexport.pipeline.report import write_report
    from rexport.pipeline.validate import ValidateSettings, run_validate

    path, data = digits_onnx
    run = RunDir(tmp_path / "run")
    settings = ImportSettings(onnx=str(path), preprocess=DIGITS_SPEC)
    with run.locked():
        rec = run_import(run, settings)
        s = rec["summary"]
        assert (s["source_opset"], s["opset"], s["batch"], s["num_classes"]) == (13, 17, "dynamic", 10)
        assert s["smoke_max_abs_error"] <= 1e-5
        imported = onnx.load(str(run.file("onnx/model.fp32.onnx")))
        assert [i.name for i in imported.graph.input] == ["input"] and imported.graph.output[0].name == "logits"
        run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
        run_quantize(run, QuantizeSettings(precision="int8", calib_data=str(data.train), calib_samples=128),
                     progress=False)
        engines = []
        if not get_backend("openvino").unavailable_reason():
            build_engines(run, backend="openvino", precisions=["int8"], progress=False)
            engines = ["openvino-int8"]
        checks = run_validate(run, ValidateSettings(data=str(data.val), samples=32), ["fp32", "fp16", "int8", *engines])
        evals = run_evaluate(run, EvaluateSettings(val_data=str(data.val), samples=200))
        report = write_report(run)
    status = {r["variant"]: r["status"] for r in checks}
    assert [status[v] for v in ("fp32", "fp16", "int8")] == ["ok"] * 3, checks
    for e in engines:  # the engine is validated (its numerics are reported, pass or fail) and evaluated.
        # Not gated on its numerics: on this hardswish/squeeze-excite net OpenVINO's INT8 engine is far from
        # its source ONNX today (rel_to_range 0.66, top-1 0.455 vs 0.625 for the INT8 ONNX), reported to
        # the backend's owner; gate it here once that is fixed.
        assert status[e] in ("ok", "failed")
        ev = json.loads(run.file(f"eval/{e}.json").read_text())
        assert ev["n"] == 200 and 0.0 <= ev["top1"] <= 1.0
    val = json.loads(run.file("validate/int8.json").read_text())
    assert val["reference"] == "fp32"  # the imported ONNX in ONNX Runtime, not a PyTorch model
    assert [r["variant"] for r in evals][0] == "fp32" and "pytorch" not in [r["variant"] for r in evals]
    fp32 = json.loads(run.file("eval/fp32.json").read_text())
    int8 = json.loads(run.file("eval/int8.json").read_text())
    assert fp32["top1"] >= 0.6, fp32["top1"]      # it learned the digits: a real accuracy to lose
    assert fp32["top1"] - int8["top1"] <= 0.05
    rows = {r["variant"]: r for r in report["rows"]}
    assert rows["pytorch"]["reason"] == "not available: imported ONNX"
    assert rows["int8"]["validation"] == "pass" and rows["fp32"]["accuracy_top1"] == fp32["top1"]


def test_fixed_batch_is_kept_when_the_graph_needs_it(tmp_path):
    """A Reshape to a constant [1, C] runs only at batch 1: the batch stays fixed, and is recorded."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], np.ones(12, np.float32).tolist())
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                           helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                           helper.make_node("Reshape", ["p", "shape"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, shape])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    run = RunDir(tmp_path / "run")
    with run.locked():
        s = run_import(run, ImportSettings(onnx=str(path), preprocess=DIGITS_SPEC.__class__(input_size=16,
                                                                                            resize=16)))["summary"]
    assert s["batch"] == "1" and s["batch_note"].startswith("kept fixed batch 1")


def _model(inputs, outputs, nodes, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


BAD = {
    "several inputs": (_model([_vi("a", TensorProto.FLOAT, [1, 3, 8, 8]), _vi("b", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [_vi("y", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_node("Add", ["a", "b"], ["y"])]),
                       "has 2 inputs"),
    "rank 2 input": (_model([_vi("a", TensorProto.FLOAT, [1, 10])], [_vi("y", TensorProto.FLOAT, [1, 10])],
                            [helper.make_node("Relu", ["a"], ["y"])]), "rank 2"),
    "integer input": (_model([_vi("a", TensorProto.INT64, [1, 3, 8, 8])], [_vi("y", TensorProto.INT64, [1, 3, 8, 8])],
                             [helper.make_node("Identity", ["a"], ["y"])]), "is int64"),
    "output not [N, classes]": (_model([_vi("a", TensorProto.FLOAT, [1, 3, 8, 8])],
                                       [_vi("y", TensorProto.FLOAT, [1, 3, 8, 8])],
                                       [helper.make_node("Relu", ["a"], ["y"])]), "not [N, classes]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_onnx_is_refused_in_one_line(case, tmp_path):
    model, words = BAD[case]
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    run = RunDir(tmp_path / "run")
    with pytest.raises(InputError, match=re.escape(words)):
        with run.locked():
            run_import(run, ImportSettings(onnx=str(path), preprocess=DIGITS_SPEC.__class__(input_size=8, resize=8)))
    assert not run.file("onnx/model.fp32.onnx").exists()


@pytest.mark.parametrize("command", ["import", "run"])
def test_cli_refuses_a_file_that_is_not_onnx(command, tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("not a model\n")
    r = rexport_cli(command, "--onnx", path, "--out", tmp_path / "run")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert "is not a readable ONNX model" in r.stderr and "Traceback" not in r.stderr and len(lines) <= 2
    assert not (tmp_path / "run").exists()


def test_import_with_folded_preprocessing_matches_the_float_graph(digits_onnx, tmp_path):
    path, _ = digits_onnx
    run = RunDir(tmp_path / "run")
    with run.locked():
        s = run_import(run, ImportSettings(onnx=str(path), fold_preprocessing=True, preprocess=DIGITS_SPEC))["summary"]
    assert s["fold_max_abs_error"] <= 1e-5 and run.manifest["preprocess"]["raw_pixels"] is True
    m = onnx.load(str(run.file("onnx/model.fp32.onnx")))
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
