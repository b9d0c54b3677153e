"""Validate stage: per-precision gates, .npz inputs, held-out images, unreadable files said aloud.

Every run here is made by the real export/quantize stages on a small resnet18 (the session's small_run,
64x64, copied), run in ONNX Runtime.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import small_export_settings  # tests/ is on sys.path (pytest's prepend mode)
from rexport.core.errors import InputError
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.quantize import QuantizeSettings, run_quantize
from rexport.pipeline.validate import (REAL_DATA_TOLERANCES, TOLERANCES, ValidateSettings, gates_on_real_data,
                                       run_validate, tolerances_for)

SPEC = small_export_settings().preprocess


@pytest.fixture(scope="module")
def run(small_run, tmp_path_factory):
    import shutil

    return RunDir(shutil.copytree(small_run.path, tmp_path_factory.mktemp("validate") / "r18"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Twelve real PNG files of different content (and sizes, so resize and crop do work)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(3)
    for i in range(12):
        a = rng.integers(0, 256, (40 + i, 44, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / f"img{i:02d}.png")
    return root


def test_prefixed_tolerance_applies_to_its_precision_only():
    overrides = {"cosine_min": 0.5, "int8.cosine_min": 0.97, "fp16.rel_to_range": 0.5}
    assert tolerances_for("int8", overrides)["cosine_min"] == (">=", 0.97)     # prefixed wins over bare
    assert tolerances_for("fp32", overrides)["cosine_min"] == (">=", 0.5)      # bare applies to all
    assert tolerances_for("fp32", overrides)["err_over_max"] == TOLERANCES["fp32"]["err_over_max"]
    assert tolerances_for("fp16", overrides)["rel_to_range"] == ("<=", 0.5)
    assert tolerances_for("int8", overrides)["rel_to_range"] == TOLERANCES["int8"]["rel_to_range"]


def test_int8_agreement_gated_only_on_real_data():
    assert "top1_agreement" not in tolerances_for("int8", {})
    assert tolerances_for("int8", {}, real_data=True)["top1_agreement"] == REAL_DATA_TOLERANCES["int8"]["top1_agreement"]
    assert tolerances_for("int8", {"int8.top1_agreement": 0.5}, real_data=True)["top1_agreement"] == (">=", 0.5)


@pytest.mark.parametrize("key", ["int9.cosine_min", "cosine", "fp16.cosine"])
def test_unknown_tolerance_refused(key):
    with pytest.raises(InputError, match="unknown tolerance"):
        ValidateSettings(tolerances={key: 0.9})


def test_random_weights_never_gate_agreement(run):
    assert gates_on_real_data(run, {"kind": "images"}) is False


def test_npz_inputs(run, tmp_path):
    x = np.stack([SPEC.preprocess(Image.fromarray(np.full((40, 40, 3), 30 * i, np.uint8))) for i in range(6)])
    np.savez(tmp_path / "val.npz", x=x, y=np.arange(6) % 4)
    with run.locked():
        rec = run_validate(run, ValidateSettings(data=str(tmp_path / "val.npz"), samples=4, batch_sizes=(1, 2)),
                           ["fp32"], force=True)
    res = json.loads(run.file("validate/fp32.json").read_text())
    assert rec[0]["status"] == "ok" and res["passed"]
    assert res["inputs"]["kind"] == "arrays" and res["inputs"]["samples"] == 4
    np.savez(tmp_path / "bad.npz", x=x[:, :, :16, :16])
    with run.locked(), pytest.raises(InputError, match="shape"):
        run_validate(run, ValidateSettings(data=str(tmp_path / "bad.npz")), ["fp32"], force=True)


def test_int8_validated_on_images_calibration_did_not_use(run, images):
    with run.locked():
        q = run_quantize(run, QuantizeSettings(precision="int8", calib_data=str(images), calib_samples=8,
                                               calib_method="minmax"), progress=False)
        assert q["status"] == "ok"
        run_validate(run, ValidateSettings(data=str(images), samples=16, batch_sizes=(1,)), ["int8"], force=True)
    res = json.loads(run.file("validate/int8.json").read_text())
    assert res["inputs"]["calibration_samples_left_out"] == 8
    assert res["inputs"]["samples"] == 4  # the 12 images less the 8 calibration used


def test_unreadable_images_warned(run, images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(images.iterdir())[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png at all")
    with run.locked(), pytest.warns(UserWarning, match="1 unreadable image"):
        run_validate(run, ValidateSettings(data=str(folder), samples=8, batch_sizes=(1,), exclude_calibration=False),
                     ["fp32"], force=True)
    res = json.loads(run.file("validate/fp32.json").read_text())
    assert res["inputs"]["unreadable"] == 1 and res["inputs"]["samples"] == 3
