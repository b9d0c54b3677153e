"""The honest accuracy test: our resnet18, trained briefly on scikit-learn's real handwritten
digits, calibrated on the training split and evaluated on 797 held-out images. FP32 must be
accurate and INT8 must lose at most one point. No accuracy number is hard-coded."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rexport.pipeline.manifest import RunDir
from rexport.pipeline.quantize import QuantizeSettings, run_quantize

pytest.importorskip("sklearn")

# digits_run (session-scoped) is in tests/conftest.py; every test that uses it is in this file, so that
# `make test`'s workers (pytest-xdist --dist loadfile) make it once


def result(run, kind, variant):
    return json.loads(run.file(f"{kind}/{variant}.json").read_text())


def test_heldout_set_is_real_and_large_enough(digits_run):
    run, data = digits_run
    assert data.n_val >= 700
    assert result(run, "eval", "pytorch")["n"] == data.n_val


def test_fp32_is_accurate(digits_run):
    run, _ = digits_run
    ref = result(run, "eval", "pytorch")
    assert ref["top1"] >= 0.90, ref
    fp32 = result(run, "eval", "fp32")
    assert abs(fp32["top1"] - ref["top1"]) < 1e-9 and fp32["agreement_top1_vs_reference"] == 1.0


def test_int8_loses_at_most_one_point(digits_run):
    run, _ = digits_run
    ref, int8 = result(run, "eval", "pytorch"), result(run, "eval", "int8")
    assert int8["drop_top1_vs_reference"] == pytest.approx(ref["top1"] - int8["top1"])
    assert int8["drop_top1_vs_reference"] <= 0.01, (ref["top1"], int8["top1"])
    fp16 = result(run, "eval", "fp16")
    assert fp16["drop_top1_vs_reference"] <= 0.005


def test_int8_validates_on_real_images_with_per_layer_errors(digits_run):
    run, _ = digits_run
    v = result(run, "validate", "int8")
    assert v["inputs"]["kind"] == "images" and v["passed"], v["failures"]
    assert not v["random_weights"]
    layers = v["per_layer"]
    assert len(layers) >= 20 and all(0 <= l["rel_error"] < 1 for l in layers)


def test_calibration_was_real_data(digits_run):
    run, data = digits_run
    cal = run.stage("quantize:int8")["summary"]["calibration"]
    assert not cal["synthetic"] and cal["samples"] == data.n_train


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_both_forms_and_both_float_choices_on_the_digits(digits_run, tmp_path):
    """Trained resnet18 on real digits: both forms within a point of PyTorch; the FP16-float form proved
    against its FP32-float form (re-measured here); the FP32-float choice is that same file, no recalibration."""
    from rexport.demo import DIGITS_SPEC, load_folder

    run, data = digits_run
    s = run.stage("quantize:int8")["summary"]
    ev = {v: json.loads(run.file(f"eval/{v}.json").read_text()) for v in ("pytorch", "int8", "int8-openvino")}
    for v in ("int8", "int8-openvino"):
        assert ev[v]["n"] == data.n_val and ev[v]["drop_top1_vs_reference"] <= 0.01, (v, ev[v]["top1"])
        assert json.loads(run.file(f"validate/{v}.json").read_text())["passed"]
    assert s["int8_float"] == "fp16", s["int8_float_fallback_reason"]
    proof = s["int8_float_proof"]
    assert proof["kept"] and proof["labelled_samples"] == data.n_val
    assert proof["cosine_min"] >= 0.999 and proof["top1_agreement"] >= 0.995 and proof["accuracy_delta_pt"] <= 0.2
    x, y = load_folder(data.val, DIGITS_SPEC)
    acc = {}
    for name, rel in (("fp16", "onnx/model.int8.onnx"), ("fp32", s["int8_fp32_float_file"])):
        sess = ort.InferenceSession(str(run.file(rel)), providers=["CPUExecutionProvider"])
        acc[name] = float(np.mean(np.concatenate(
            [sess.run(None, {"input": x[i:i + 128]})[0].argmax(1) for i in range(0, len(x), 128)]) == y))
    assert acc["fp16"] == pytest.approx(proof["accuracy_fp16"]) and acc["fp32"] == pytest.approx(proof["accuracy_fp32"])
    assert acc["fp16"] == pytest.approx(ev["int8"]["top1"])

    copy = RunDir(shutil.copytree(run.path, tmp_path / "run"))
    with copy.locked():
        rec = run_quantize(copy, QuantizeSettings(precision="int8", calib_data=str(data.train),
                                                  calib_samples=data.n_train, calib_method="entropy",
                                                  int8_float="fp32"), progress=False)
    assert rec["summary"]["calibration"]["reused"] and rec["summary"]["int8_float"] == "fp32"
    assert rec["summary"]["int8_float_fallback_reason"] is None
    assert _sha(copy.file("onnx/model.int8.onnx")) == _sha(run.file(s["int8_fp32_float_file"]))
    assert _sha(copy.file("onnx/model.int8-openvino.onnx")) == _sha(run.file("onnx/model.int8-openvino.onnx"))

    from rexport.pipeline.report import write_report

    report = write_report(copy)  # the report says which file each form is and what its float parts are
    sec = next(x for x in report["sections"] if x["key"] == "int8_forms")
    assert [r[0] for r in sec["rows"]] == ["int8", "int8-openvino"] and sec["rows"][0][5] == "fp32"
    assert "INT8 files per target" in copy.file("report/report.md").read_text()
