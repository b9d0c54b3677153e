"""bench: real timings of a small real run (ResNet-18, 10 classes, 64x64) in PyTorch and ONNX Runtime.

``make_run`` builds the run directory with the real stages (export, int8 quantize, validate, evaluate,
and the TensorRT build that records its own skip reason), so a change of any stage's output schema
shows here and in test_report.py, which loads the same run from this file.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.bench import (RESULTS_FILE, BenchSettings, bench_outcome,
                                    run_bench, time_runner, variant_backend)
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.runners import Runner

NUM_CLASSES, SIZE, RESIZE, SEED = 10, 64, 73, 0
COMMAND = f"rexport run --model resnet18 --num-classes {NUM_CLASSES} --input-size {SIZE} --resize {RESIZE}"


def _labelled_npz(path: Path, n: int = 32) -> Path:
    """Seeded noise in the normalised pixel range with seeded labels: a real .npz the evaluate stage reads."""
    spec = PreprocessSpec(input_size=SIZE, resize=RESIZE)
    mean = np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)
    x = np.random.default_rng(5).uniform(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)
    np.savez(path, x=((x - mean) / std).astype(np.float32),
             y=np.random.default_rng(6).integers(0, NUM_CLASSES, n))
    return path


def make_run(root: Path, small_run: RunDir) -> RunDir:
    """A real run directory made by the real stages: export, INT8, validate, evaluate, TensorRT build.
    The export is the session's small_run (the same settings, which the export stage proves by reusing it)."""
    import shutil

    from conftest import small_export_settings
    from rexport.pipeline.backends import BuildSettings
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate
    from rexport.pipeline.export import run_export
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize
    from rexport.pipeline.validate import ValidateSettings, run_validate

    settings = small_export_settings()
    assert (settings.num_classes, settings.seed, settings.preprocess.input_size, settings.preprocess.resize) == (
        NUM_CLASSES, SEED, SIZE, RESIZE)
    shutil.copytree(small_run.path, root)
    run = RunDir(root)
    with run.locked():
        assert run_export(run, settings)["reused"]
        run_quantize(run, QuantizeSettings(precision="int8", calib_data="synthetic", calib_samples=16,
                                           calib_method="minmax"), progress=False)
        run_validate(run, ValidateSettings(samples=9, batch_sizes=(1, 8)))
        run_evaluate(run, EvaluateSettings(val_data=str(_labelled_npz(root.parent / "labelled.npz"))))
        # what 'rexport run' does on a machine without TensorRT: the backend records why it did not build
        build_engines(run, backend="tensorrt", settings=BuildSettings(), progress=False, skip_unavailable=True)
        run.manifest["command"] = f"{COMMAND} --out {root}"
        run.manifest["model"] = "resnet18"
        run.save()
    return run


def onnx_variants(run: RunDir) -> list[str]:
    """The ONNX variants the real quantize stage made (int8, and int8-openvino where it makes both forms)."""
    return run.variants()


def tensorrt_skip_reason() -> str:
    from rexport.pipeline.backends import get_backend

    return get_backend("tensorrt").unavailable_reason()


_RUNS: dict[str, RunDir] = {}


def shared_run(tmp_path_factory, small_run: RunDir) -> RunDir:
    """One run directory per test session (building it takes seconds): bench and report tests share it."""
    if "run" not in _RUNS:
        _RUNS["run"] = make_run(tmp_path_factory.mktemp("run") / "resnet18", small_run)
    return _RUNS["run"]


FAST = BenchSettings(batch_sizes=(1, 2), warmup=2, min_time=0.2, max_time=1.0, min_iters=5)


# --- tests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, small_run) -> RunDir:
    return shared_run(tmp_path_factory, small_run)


@pytest.fixture(scope="module")
def results(run) -> dict:
    return run_bench(run, FAST, progress=False)


def _by(results: dict) -> dict:
    return {(r["variant"], r["batch"]): r for r in results["rows"]}


def test_results_file_is_written_and_matches(run, results):
    on_disk = json.loads(run.file(RESULTS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert results["schema_version"] == 1
    assert "host arrays in and out" in results["latency_definition"]
    assert "excludes image decoding" in results["latency_definition"]
    assert results["settings"]["batch_sizes"] == [1, 2] and results["settings"]["min_time"] == 0.2
    assert results["environment"]["versions"]["onnxruntime"]
    assert results["input"]["shape_per_sample"] == [3, SIZE, SIZE]


def test_machine_and_share_of_measured_peak(run, results):
    from rexport.core.machine import cpu_identity
    from rexport.pipeline.model_ops import macs_per_image

    m = results["machine"]
    assert m["cpu"] == json.loads(json.dumps(cpu_identity())) and m["cpu"]["family"] is not None
    assert m["peaks"]["fp32_gflops"] > 0 and m["peaks"]["int8_gops"] > 0
    assert m["ops_per_image"] == 2 * macs_per_image(run.file("onnx/model.fp32.onnx"))
    for r in results["rows"]:
        if r["status"] != "ok":
            assert r["percent_of_probe"] is None
            continue
        peak = m["peaks"]["int8_gops"] if r["precision"] == "int8" else m["peaks"]["fp32_gflops"]
        assert r["percent_of_probe"] == pytest.approx(100 * m["ops_per_image"] * r["images_per_s"] / (peak * 1e9))


def test_rows_cover_every_variant_and_batch(run, results):
    rows = _by(results)
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert sorted(ok) == sorted((v, b) for v in ("pytorch", *onnx_variants(run)) for b in (1, 2))
    assert "int8" in onnx_variants(run) and "fp32" in onnx_variants(run)
    assert results["rows"][0]["variant"] == "pytorch"  # the baseline row first
    for v in ("pytorch", "fp32", "int8"):
        assert rows[(v, 1)]["backend"] == variant_backend(v)
    assert rows[("int8", 1)]["precision"] == "int8" and rows[("fp32", 1)]["backend"] == "onnxruntime"


@pytest.mark.parametrize("variant", ["pytorch", "fp32", "int8"])
@pytest.mark.parametrize("batch", [1, 2])
def test_statistics_are_consistent(results, variant, batch):
    r = _by(results)[(variant, batch)]
    assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert r["std_ms"] >= 0 and r["min_ms"] <= r["mean_ms"]
    assert r["images_per_s"] == pytest.approx(batch * 1000.0 / r["mean_ms"])
    assert r["iterations"] >= FAST.min_iters and r["timed_s"] >= FAST.min_time
    assert r["stop"] in ("stable", "max_time") and (r["stable"] or r["stop"] == "max_time")
    assert r["p99_ms"] <= r["max_ms"]
    # the loop stops after the call that crosses max_time, unless min_iters is not reached yet
    assert r["timed_s"] <= FAST.max_time + r["max_ms"] / 1000 + 0.05 or r["iterations"] == FAST.min_iters
    assert r["runner_settings"]["threads"]
    base = _by(results)[("pytorch", batch)]["p50_ms"]
    assert r["speedup_vs_pytorch"] == pytest.approx(base / r["p50_ms"])
    assert r["gpu_compute_ms"] is None  # CPU rows have no device time


def test_skipped_tensorrt_build_is_a_row(run, results):
    rows = [r for r in results["rows"] if r["variant"] == "tensorrt"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["status"] == "skipped" and r["reason"] == tensorrt_skip_reason() for r in rows)
    assert all(r["p50_ms"] is None and r["speedup_vs_pytorch"] is None for r in rows)
    outcome = bench_outcome(results)
    ok = 2 * (1 + len(onnx_variants(run)))
    assert outcome.outputs == [RESULTS_FILE] and outcome.summary["rows"] == {"ok": ok, "skipped": 2}


def test_a_broken_variant_keeps_its_reason_and_the_bench_goes_on(run, tmp_path):
    broken = RunDir(tmp_path / "run")
    shutil.copytree(run.path, broken.path, ignore=shutil.ignore_patterns("model.int8.onnx", "bench"))
    broken.file("onnx/model.fp16.onnx").write_bytes(b"not an onnx file")
    s = BenchSettings(variants=("fp16", "fp32", "openvino-int8", "pytorch"), batch_sizes=(1,), warmup=1,
                      min_time=0.05, max_time=0.5, min_iters=3)
    res = run_bench(broken, s, progress=False)
    rows = {r["variant"]: r for r in res["rows"]}
    assert [r["variant"] for r in res["rows"]] == ["pytorch", "fp16", "fp32", "openvino-int8"]
    assert rows["fp16"]["status"] == "error" and "cannot load" in rows["fp16"]["reason"]
    assert "ONNX Runtime cannot load" in rows["fp16"]["reason"] and rows["fp16"]["p50_ms"] is None
    assert rows["openvino-int8"]["status"] == "skipped" and "not in" in rows["openvino-int8"]["reason"]
    assert rows["pytorch"]["status"] == rows["fp32"]["status"] == "ok"
    assert rows["fp32"]["p50_ms"] > 0
    assert bench_outcome(res).summary["errors"] == [f"fp16: {rows['fp16']['reason']}"]


def test_filters_select_backend_and_precision(run, tmp_path):
    s = BenchSettings(backends=("onnxruntime",), precisions=("int8",), batch_sizes=(1,), warmup=1,
                      min_time=0.05, max_time=0.5, min_iters=3)
    res = run_bench(run, s, progress=False)
    int8_files = [v for v in onnx_variants(run) if v.startswith("int8")]
    assert [(r["variant"], r["status"]) for r in res["rows"]] == [(v, "ok") for v in int8_files]
    assert res["rows"][0]["speedup_vs_pytorch"] is None  # no baseline row in this selection
    s = BenchSettings(backends=("tensorrt",), batch_sizes=(1,))
    res = run_bench(run, s, progress=False)
    assert [(r["variant"], r["status"]) for r in res["rows"]] == [("tensorrt", "skipped")]


def test_inputs_are_seeded_and_shared(run):
    from rexport.pipeline.bench import _inputs as bench_inputs

    a, _ = bench_inputs(run, FAST)
    b, _ = bench_inputs(run, FAST)
    assert a.keys() == {1, 2} and a[2].shape == (2, 3, SIZE, SIZE) and a[2].dtype == np.float32
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs", [{"batch_sizes": ()}, {"batch_sizes": (0,)}, {"min_time": 2.0, "max_time": 1.0},
                                    {"min_iters": 0}, {"threads": 0}])
def test_bad_settings_are_input_errors(kwargs):
    with pytest.raises(InputError):
        BenchSettings(**kwargs)


class _SleepRunner(Runner):
    """Sleeps for a given time per call: a runner whose latency we know."""

    def __init__(self, seconds, growth: float = 0.0) -> None:
        super().__init__()
        self.seconds, self.growth, self.calls = seconds, growth, 0

    def _activate(self) -> None:
        self.settings = {"threads": 1}

    def infer(self, x):
        self.calls += 1
        time.sleep(self.seconds * (1 + self.growth) ** self.calls)
        return np.zeros((len(x), NUM_CLASSES), np.float32)


def test_timing_stops_when_stable_and_at_max_time():
    x = np.zeros((1, 3, 4, 4), np.float32)
    s = BenchSettings(warmup=2, min_time=0.1, max_time=3.0, min_iters=5)
    with _SleepRunner(0.004) as r:
        t = time_runner(r, x, s)
    assert t["stop"] == "stable" and t["stable"] and 0.1 <= t["timed_s"] < 3.0
    assert t["p50_ms"] >= 4.0 and r.calls == t["iterations"] + 2
    s = BenchSettings(warmup=0, min_time=0.1, max_time=0.6, min_iters=5)
    with _SleepRunner(0.002, growth=0.05) as r:  # ever slower: the p50 never settles
        t = time_runner(r, x, s)
    assert t["stop"] == "max_time" and not t["stable"] and t["timed_s"] >= 0.6
