"""The honest accuracy test: our resnet18, trained briefly on scikit-learn's real handwritten
digits, calibrated on the training split and evaluated on 797 held-out images. FP32 must be
accurate and INT8 must lose at most one point. No accuracy number is hard-coded."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")

# digits_run (session-scoped, shared with test_int8_forms.py) is in tests/conftest.py


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
