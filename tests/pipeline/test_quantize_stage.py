"""The quantize stage on a real exported model: FP16 and INT8 files land in the run, a repeat is
reused, and bad calibration input fails cleanly without writing anything."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from rexport.core.errors import InputError
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.quantize import QuantizeSettings, run_quantize
from rexport.pipeline.validate import ValidateSettings, run_validate


@pytest.fixture()
def run_copy(small_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(small_run.path, dst)
    return RunDir(dst)


def test_fp16_and_int8_variants_validate(run_copy):
    run = run_copy
    rec16 = run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
    rec8 = run_quantize(run, QuantizeSettings(precision="int8", calib_samples=16, calib_method="percentile"),
                        progress=False)
    assert rec16["status"] == rec8["status"] == "ok"
    assert run.variants() == ["fp32", "fp16", "int8", "int8-openvino"]
    s = rec8["summary"]
    cal = s["calibration"]
    assert cal["synthetic"] and cal["samples"] == 16
    assert run.file(s["tensorrt_cache"]).read_text().startswith("TRT-")
    # one calibration, two forms: TensorRT's placement (residual Add input only) and NNCF's (both inputs)
    assert s["forms"]["int8"]["qdq"]["settings"]["residual_add"] == "residual"
    assert s["forms"]["int8-openvino"]["qdq"]["settings"]["residual_add"] == "both"
    trt, ov = (s["forms"][f]["qdq"]["activation_amax"] for f in ("int8", "int8-openvino"))
    shared = set(trt) & set(ov)
    assert len(shared) >= 20 and all(trt[t] == ov[t] for t in shared)  # the same ranges, calibrated once
    # the float parts: FP16 kept (its proof recorded), or FP32 with the reason
    assert s["int8_float"] in ("fp16", "fp32") and s["int8_float_requested"] == "fp16"
    assert (s["int8_float"] == "fp32") == (s["int8_float_fallback_reason"] is not None)
    if s["int8_float"] == "fp16":
        assert s["int8_float_proof"]["kept"] and s["int8_float_proof"]["cosine_min"] >= 0.999
        assert run.file(s["int8_fp32_float_file"]).is_file()
    recs = run_validate(run, ValidateSettings(samples=8, batch_sizes=(1, 4)), ["fp16", "int8", "int8-openvino"])
    assert [r["status"] for r in recs] == ["ok", "ok", "ok"]
    again = run_quantize(run, QuantizeSettings(precision="int8", calib_samples=16, calib_method="percentile"),
                         progress=False)
    assert again["reused"]


def _bad_sources(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("not an image")
    (texts / "b.jpg").write_bytes(b"not a jpeg either")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 3, 32, 32), np.float32))
    return {"missing": tmp_path / "nope", "empty": empty, "non-images": texts, "wrong shape": wrong}


@pytest.mark.parametrize("case", ["missing", "empty", "non-images", "wrong shape"])
def test_bad_calibration_input_writes_nothing(run_copy, tmp_path, case):
    run = run_copy
    before = sorted(p.relative_to(run.path) for p in run.path.rglob("*") if p.name != "run.log")
    src = _bad_sources(tmp_path)[case]
    with pytest.raises(InputError) as e:
        run_quantize(run, QuantizeSettings(precision="int8", calib_data=str(src), calib_samples=8), progress=False)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    after = sorted(p.relative_to(run.path) for p in run.path.rglob("*") if p.name != "run.log")
    assert after == before


def test_image_folder_calibration(run_copy, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    rec = run_quantize(run_copy, QuantizeSettings(precision="int8", calib_data=str(folder), calib_samples=6,
                                                  calib_method="minmax"), progress=False)
    assert not rec["summary"]["calibration"]["synthetic"]
    assert rec["summary"]["calibration"]["samples"] == 6
