"""Calibration end to end: a real exported ResNet-18 run in ONNX Runtime on real digit images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from rexport.calibration import (CalibrationSettings, calibrate, calibration_key, load_calibration, open_reader,
                                 open_reader_for, read_tensorrt_cache, read_tensorrt_cache_header,
                                 read_tensorrt_scales, write_tensorrt_cache)
from rexport.calibration.statistics import activation_tensors
from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file
from rexport.core.preprocess import PreprocessSpec

sys.path.insert(0, str(Path(__file__).parent))
from reference_case import export_model  # noqa: E402

SPEC = PreprocessSpec(input_size=64, resize=73)
SAMPLES = 24


def _export(path: Path, seed: int) -> Path:
    return export_model(path, seed)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("calibrate")


@pytest.fixture(scope="module")
def fp32(work: Path) -> Path:
    return _export(work / "model.fp32.onnx", seed=0)


@pytest.fixture(scope="module")
def digits(work: Path) -> Path:
    """Real handwritten digits (scikit-learn's 8x8 set), upscaled and tinted into RGB images."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    root = work / "digits"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2 * SAMPLES):
        grey = (images[i] / 16.0 * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(grey).resize((80, 80), Image.Resampling.BILINEAR), np.float32) / 255
        tint = rng.uniform(0.3, 1.0, 3)
        rgb = (big[..., None] * tint * 255 + rng.uniform(0, 40, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / f"digit_{i:03d}.png")
    return root


def _settings(**kw) -> CalibrationSettings:
    return CalibrationSettings(**{"samples": SAMPLES, "batch_size": 8, **kw})


def _reader(source, settings: CalibrationSettings, spec: PreprocessSpec = SPEC):
    return open_reader_for(source, spec, settings)


@pytest.fixture(scope="module")
def by_method(fp32: Path, digits: Path, work: Path) -> dict:
    out = {}
    for method in ("minmax", "percentile", "entropy"):
        settings = _settings(method=method)
        out[method] = calibrate(fp32, _reader(digits, settings), settings, work / "cache", progress=False)
    return out


def test_every_activation_and_the_input_get_a_range(fp32: Path, by_method: dict) -> None:
    model = onnx.load(str(fp32))
    expected = ["input"] + [o for n in model.graph.node if n.op_type not in ("Identity", "Constant") for o in n.output]
    _, activations = activation_tensors(model)
    assert ["input", *activations] == expected
    for result in by_method.values():
        assert list(result.ranges) == expected
        assert all(np.isfinite(v) and v > 0 for v in result.ranges.values())
        assert result.samples == SAMPLES and not result.synthetic and not result.reused
        assert f"{SAMPLES} images from" in result.data_description


def test_minmax_is_the_true_absmax(fp32: Path, digits: Path, by_method: dict) -> None:
    reader = _reader(digits, _settings())
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    xs, logits = [], []
    while (feed := reader.get_next()) is not None:
        xs.append(feed["input"])
        logits.append(session.run(["logits"], feed)[0])
    ranges = by_method["minmax"].ranges
    assert ranges["input"] == pytest.approx(np.abs(np.concatenate(xs)).max(), rel=1e-6)
    assert ranges["logits"] == pytest.approx(np.abs(np.concatenate(logits)).max(), rel=1e-5)
    minmax = by_method["minmax"].minmax
    assert minmax["logits"][0] == pytest.approx(np.concatenate(logits).min(), rel=1e-5)


def test_entropy_and_percentile_are_not_minmax(by_method: dict) -> None:
    mm, pc, en = (by_method[m].ranges for m in ("minmax", "percentile", "entropy"))
    for other in (pc, en):
        assert all(other[k] <= mm[k] * (1 + 1e-6) for k in mm)
        clipped = [k for k in mm if other[k] < 0.99 * mm[k]]
        assert len(clipped) > len(mm) // 2, (len(clipped), len(mm))
    assert pc != en
    assert len({r.key for r in by_method.values()}) == 3


def test_same_inputs_reuse_the_cache(fp32: Path, digits: Path, work: Path, by_method: dict) -> None:
    first = by_method["entropy"]
    mtime = first.json_path.stat().st_mtime_ns
    settings = _settings(method="entropy")
    start = time.perf_counter()
    again = calibrate(fp32, _reader(digits, settings), settings, work / "cache", progress=False)
    assert again.reused and again.key == first.key and again.ranges == first.ranges
    assert time.perf_counter() - start < 2.0
    assert again.json_path.stat().st_mtime_ns == mtime
    doc = json.loads(first.json_path.read_text())
    assert {"key", "fp32_onnx_sha256", "data_fingerprint", "data_description", "synthetic", "settings", "ranges",
            "minmax", "samples", "created", "seconds"} <= set(doc)
    assert doc["fp32_onnx_sha256"] == sha256_file(fp32)
    assert doc["key"] == calibration_key(doc["fp32_onnx_sha256"], doc["data_fingerprint"], settings)


def test_any_change_recomputes(fp32: Path, digits: Path, work: Path, by_method: dict) -> None:
    base = _settings(method="entropy")
    cache = work / "cache"
    keys = {by_method["entropy"].key}
    for settings in (_settings(method="percentile", percentile=99.9), _settings(method="entropy", samples=16),
                     _settings(method="entropy", num_bins=1024)):
        r = calibrate(fp32, _reader(digits, settings), settings, cache, progress=False)
        assert not r.reused and r.key not in keys and r.json_path.exists()
        keys.add(r.key)
    other_data = work / "digits_other"
    other_data.mkdir()
    for p in sorted(digits.iterdir())[SAMPLES:]:
        (other_data / p.name).write_bytes(p.read_bytes())
    r = calibrate(fp32, _reader(other_data, base), base, cache, progress=False)
    assert not r.reused and r.key not in keys
    keys.add(r.key)
    other_model = _export(work / "other.fp32.onnx", seed=1)
    r = calibrate(other_model, _reader(digits, base), base, cache, progress=False)
    assert not r.reused and r.key not in keys
    assert r.ranges != by_method["entropy"].ranges


def test_tampered_cache_is_never_used(fp32: Path, digits: Path, work: Path, by_method: dict) -> None:
    settings = _settings(method="minmax")
    good = by_method["minmax"]
    doc = json.loads(good.json_path.read_text())
    doc["ranges"]["logits"] *= 2
    good.json_path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="modified"):
        load_calibration(good.json_path)
    with pytest.warns(UserWarning, match="not reusing cached calibration"):
        again = calibrate(fp32, _reader(digits, settings), settings, work / "cache", progress=False)
    assert not again.reused and again.ranges == good.ranges
    assert load_calibration(good.json_path)["ranges"] == good.ranges
    good.json_path.write_text(good.json_path.read_text()[:100])  # cut short
    with pytest.warns(UserWarning, match="unreadable"):
        again = calibrate(fp32, _reader(digits, settings), settings, work / "cache", progress=False)
    assert not again.reused and load_calibration(good.json_path)["ranges"] == good.ranges


def test_tensorrt_cache_has_every_activation(by_method: dict) -> None:
    for method, result in by_method.items():
        lines = result.tensorrt_cache_path.read_text().splitlines()
        algorithm = "MinMaxCalibration" if method == "minmax" else "EntropyCalibration2"
        assert lines[0] == f"TRT-8601-{algorithm}"
        assert read_tensorrt_cache_header(result.tensorrt_cache_path) == (8601, algorithm)
        assert len(lines) == 1 + len(result.ranges)
        assert lines[1].startswith("input: ")
        scales = read_tensorrt_scales(result.tensorrt_cache_path)
        assert list(scales) == list(result.ranges)
        for name, amax in result.ranges.items():
            assert np.float32(scales[name]) == np.float32(amax / 127.0)
        amaxes = read_tensorrt_cache(result.tensorrt_cache_path)
        assert all(np.float32(amaxes[k] / 127.0) == np.float32(result.ranges[k] / 127.0) for k in amaxes)


def test_tensorrt_cache_format_round_trips(tmp_path: Path) -> None:
    ranges = {"input": 127.0, "/conv1/Conv_output_0": 1.0, "logits": 3.3e-5}
    path = write_tensorrt_cache(ranges, tmp_path / "x.cache", version=100300)
    text = path.read_text().splitlines()
    assert text[0] == "TRT-100300-EntropyCalibration2"
    assert text[1] == "input: 3f800000"  # scale 1.0
    assert text[2] == "/conv1/Conv_output_0: 3c010204"  # 1/127 as big-endian float32
    scales = read_tensorrt_scales(path)
    assert scales["input"] == 1.0 and scales["logits"] == float(np.float32(3.3e-5 / 127))
    with pytest.raises(ValueError):
        write_tensorrt_cache({"x": 0.0}, tmp_path / "zero.cache")
    # TensorRT writes the hex without leading zeros; tensor names may hold spaces, brackets and colons
    (tmp_path / "trt.cache").write_text("TRT-8502-EntropyCalibration2\n(Unnamed Layer* 3) [Shuffle]_output: 3c010204\n"
                                        "a:b: 10000\n")
    parsed = read_tensorrt_scales(tmp_path / "trt.cache")
    assert parsed == {"(Unnamed Layer* 3) [Shuffle]_output": float(np.float32(1 / 127)),
                      "a:b": float(np.frombuffer(bytes.fromhex("00010000"), ">f4")[0])}
    (tmp_path / "bad.cache").write_text("not a cache\n")
    with pytest.raises(InputError, match="not a TensorRT calibration cache"):
        read_tensorrt_cache(tmp_path / "bad.cache")


def test_stale_tensorrt_cache_is_rewritten_on_reuse(fp32: Path, digits: Path, work: Path, by_method: dict) -> None:
    result = by_method["percentile"]
    result.tensorrt_cache_path.write_text("TRT-8601-EntropyCalibration2\ninput: 3f800000\n")
    settings = _settings(method="percentile")
    again = calibrate(fp32, _reader(digits, settings), settings, work / "cache", progress=False, tensorrt_version=8502)
    assert again.reused
    assert read_tensorrt_cache_header(again.tensorrt_cache_path) == (8502, "EntropyCalibration2")
    assert len(read_tensorrt_scales(again.tensorrt_cache_path)) == len(result.ranges)


def test_bad_inputs_write_nothing(fp32: Path, digits: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    settings = _settings(method="entropy")
    with pytest.raises(InputError, match="does not exist"):
        calibrate(tmp_path / "missing.onnx", _reader(digits, settings), settings, cache, progress=False)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        calibrate(tmp_path / "junk.onnx", _reader(digits, settings), settings, cache, progress=False)
    wrong_name = open_reader(digits, SPEC, input_name="images", samples=8)
    with pytest.raises(InputError, match="feeds input 'images'"):
        calibrate(fp32, wrong_name, settings, cache, progress=False)
    wrong_size = _reader("synthetic", settings, PreprocessSpec(input_size=32, resize=36))
    with pytest.raises(InputError, match="ONNX Runtime could not run"):
        calibrate(fp32, wrong_size, settings, cache, progress=False)
    nan = np.zeros((4, 3, 64, 64), np.float32)
    nan[3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(InputError, match="NaN"):
        calibrate(fp32, _reader(tmp_path / "nan.npy", settings), settings, cache, progress=False)
    assert not cache.exists()
    with pytest.raises(InputError, match="unknown calibration method"):
        CalibrationSettings(method="kl")
    with pytest.raises(InputError, match="percentile"):
        CalibrationSettings(percentile=0)
    with pytest.raises(InputError, match="bins"):
        CalibrationSettings(num_bins=128)


def test_synthetic_calibration_and_progress(fp32: Path, tmp_path: Path, capfd) -> None:
    settings = _settings(method="percentile", samples=10, batch_size=4)
    result = calibrate(fp32, _reader("synthetic", settings), settings, tmp_path / "c", progress=True)
    assert result.synthetic and result.samples == 10 and "synthetic" in result.data_description
    assert "calibrating" in capfd.readouterr().err
    again = calibrate(fp32, _reader("synthetic", settings), settings, tmp_path / "c", progress=False)
    assert again.reused and again.ranges == result.ranges
    assert capfd.readouterr().err == ""


def test_calibration_imports_neither_pipeline_nor_torch() -> None:
    code = ("import sys, rexport.calibration; "
            "print(sorted(m for m in sys.modules if m.startswith(('rexport.pipeline', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.strip() == "[]"


def test_split_runs_give_the_same_statistics(fp32: Path, digits: Path) -> None:
    """Reader batches split into one-sample runs (a tiny memory budget) see exactly the same values."""
    from rexport.calibration.statistics import collect

    reader = _reader(digits, _settings())
    whole = collect(fp32, reader, histograms=True, max_samples=12)
    split = collect(fp32, reader, histograms=True, max_samples=12, max_run_bytes=1)
    assert whole.samples == split.samples == 12
    for name, st in whole.tensors.items():
        other = split.tensors[name]
        assert (st.min, st.max) == (other.min, other.max), name
        assert st.histogram.counts.sum() == pytest.approx(other.histogram.counts.sum()), name
        assert st.histogram.top == other.histogram.top


def test_nan_inside_the_model_is_caught_in_every_method(fp32: Path, digits: Path, tmp_path: Path) -> None:
    """The last output channel of the first conv is NaN (ORT's ReduceMin/Max skip a NaN that is not
    first in a tensor): calibration must refuse it, not write NaN or garbage ranges."""
    from onnx import numpy_helper

    model = onnx.load(str(fp32))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w[-1] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    broken = tmp_path / "nan.onnx"
    onnx.save(model, str(broken))
    for method in ("minmax", "entropy"):
        settings = _settings(method=method, samples=8)
        with pytest.raises(InputError, match="NaN or infinite"):
            calibrate(broken, _reader(digits, settings), settings, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()
