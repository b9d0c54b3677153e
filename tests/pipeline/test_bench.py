"""bench: real timings of a small real run (ResNet-18, 10 classes, 64x64) in PyTorch and ONNX Runtime.

``make_run`` builds the run directory without the other stages' code (export, quantize, validate
and evaluate are done here with torch/onnx/onnxruntime directly, in the contract's file formats);
test_report.py loads it from this file.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json
from rexport.core.preprocess import METADATA_KEY, PreprocessSpec
from rexport.pipeline.bench import (RESULTS_FILE, BenchSettings, bench_outcome,
                                    run_bench, time_runner, variant_backend)
from rexport.pipeline.manifest import RunDir, StageOutcome
from rexport.pipeline.runners import Runner

NUM_CLASSES, SIZE, RESIZE, SEED = 10, 64, 73, 0
COMMAND = f"rexport run --model resnet18 --num-classes {NUM_CLASSES} --input-size {SIZE} --resize {RESIZE}"


# --- the run directory (shared with test_report.py) ------------------------------------------

def _reference_model():
    import torch

    from rexport.models.resnet import resnet18

    with torch.random.fork_rng(devices=[]):  # the same init as load_model(..., seed=SEED)
        torch.manual_seed(SEED)
        model = resnet18(num_classes=NUM_CLASSES)
    return model.eval()


def _export(model, path: Path, spec: PreprocessSpec) -> None:
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.zeros(1, 3, SIZE, SIZE), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load(str(path))
    prop = m.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, spec.to_json()
    onnx.save(m, str(path))


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)


def _ort(path: Path, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"input": x})


def _metrics(ref: np.ndarray, out: np.ndarray) -> dict:
    diff = np.abs(out - ref)
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    top5 = np.argsort(-out, axis=1)[:, :5]
    return {"max_abs": float(diff.max()), "max_rel": float((diff / np.maximum(np.abs(ref), 1e-3)).max()),
            "rel_to_range": float(diff.max() / (ref.max() - ref.min())),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "top1_agreement": float((ref.argmax(1) == out.argmax(1)).mean()),
            "top5_agreement": float(np.mean([r in t for r, t in zip(ref.argmax(1), top5)]))}


def _worst(batches: dict) -> dict:
    keys = next(iter(batches.values())).keys()
    low = {"cosine_min", "cosine_mean", "top1_agreement", "top5_agreement"}
    return {k: (min if k in low else max)(b[k] for b in batches.values()) for k in keys}


def _per_layer(fp32: Path, int8: Path, x: np.ndarray) -> list[dict]:
    """Relative error of every Conv output of the INT8 model against the FP32 model."""
    import onnx

    m32 = onnx.load(str(fp32))
    convs = [(n.name, n.output[0]) for n in m32.graph.node if n.op_type == "Conv"]
    m8 = onnx.load(str(int8))
    produced8 = {o for n in m8.graph.node for o in n.output}
    convs = [(layer, t) for layer, t in convs if t in produced8]
    paths = {}
    for name, m, path in (("fp32", m32, fp32), ("int8", m8, int8)):
        for _, t in convs:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        paths[name] = path.with_name(f".per_layer.{name}.onnx")
        onnx.save(m, str(paths[name]))
    a = _ort(paths["fp32"], x, [t for _, t in convs])
    b = _ort(paths["int8"], x, [t for _, t in convs])
    for p in paths.values():
        p.unlink()
    out = []
    for (layer, t), ra, rb in zip(convs, a, b):
        ra, rb = ra.ravel().astype(np.float64), rb.ravel().astype(np.float64)
        out.append({"layer": layer, "tensor": t, "rel_error": float(np.linalg.norm(rb - ra) / np.linalg.norm(ra)),
                    "cosine": float(ra @ rb / (np.linalg.norm(ra) * np.linalg.norm(rb)))})
    return out


def _quantize_int8(fp32: Path, int8: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": _inputs(1, 100 + i)} for i in range(8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


TOLERANCES = {"fp32": {"rel_to_range": 1e-4, "cosine_min": 0.99999, "top1_agreement": 1.0},
              "int8": {"rel_to_range": 0.05, "cosine_min": 0.99, "top1_agreement": 0.9}}


def _validate(run: RunDir, variant: str, model) -> StageOutcome:
    import torch

    path = run.file(f"onnx/model.{variant}.onnx")
    batches = {}
    for b in (1, 8):
        x = _inputs(b, 1000 + b)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        batches[str(b)] = _metrics(ref, _ort(path, x)[0])
    worst, tol = _worst(batches), TOLERANCES[variant]
    failures = [f"{k} {worst[k]:.6g} (tolerance {v})" for k, v in tol.items()
                if (worst[k] > v if k == "rel_to_range" else worst[k] < v)]
    per_layer = _per_layer(run.file("onnx/model.fp32.onnx"), path, _inputs(2, 7)) if variant == "int8" else []
    rel = f"validate/{variant}.json"
    atomic_write_json(run.file(rel), {
        "variant": variant, "reference": "pytorch",
        "inputs": {"kind": "synthetic", "source": "standard normal (test fixture)", "samples": 9},
        "random_weights": True, "batches": batches, "metrics": worst, "tolerances": tol,
        "passed": not failures, "failures": failures, "against_source": None, "per_layer": per_layer})
    return StageOutcome(outputs=[rel], summary={"passed": not failures},
                        status="ok" if not failures else "failed", reason="; ".join(failures) or None)


def _evaluate(run: RunDir, variant: str, x: np.ndarray, labels: np.ndarray, fp32_pred: dict) -> StageOutcome:
    logits = _ort(run.file(f"onnx/model.{variant}.onnx"), x)[0]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    top1 = float((logits.argmax(1) == labels).mean())
    fp32_pred.setdefault("pred", logits.argmax(1))
    fp32_pred.setdefault("top1", top1)
    rel = f"eval/{variant}.json"
    atomic_write_json(run.file(rel), {
        "variant": variant, "top1": top1, "top5": float(np.mean([l in t for l, t in zip(labels, top5)])),
        "n": int(len(labels)), "drop_top1_vs_fp32": fp32_pred["top1"] - top1,
        "agreement_top1_vs_fp32": float((logits.argmax(1) == fp32_pred["pred"]).mean()),
        "dataset": {"source": "synthetic: standard normal images, random labels (test fixture)", "n": len(labels)}})
    return StageOutcome(outputs=[rel], summary={"top1": top1})


def make_run(root: Path) -> RunDir:
    """A real run directory: export, int8 quantization, validate, evaluate, a skipped TensorRT build."""
    run = RunDir(root)
    spec = PreprocessSpec(input_size=SIZE, resize=RESIZE)
    model = _reference_model()
    fp32 = run.file("onnx/model.fp32.onnx")
    settings = {"model": "resnet18", "weights": None, "num_classes": NUM_CLASSES, "seed": SEED, "opset": 17,
                "preprocess": spec.to_dict()}

    def export() -> StageOutcome:
        _export(model, fp32, spec)
        return StageOutcome(outputs=["onnx/model.fp32.onnx"],
                            summary={"random_weights": True, "size_mb": fp32.stat().st_size / 1e6})

    run.run_stage("export", inputs={"weights": None}, settings=settings, action=export)
    calibration = {"method": "minmax", "samples": 8, "data": "standard normal (test fixture)", "synthetic": True,
                   "key": "test-fixture", "reused": False}
    run.run_stage("quantize:int8", inputs={"onnx": fp32}, settings={"method": "minmax"},
                  action=lambda: (_quantize_int8(fp32, run.file("onnx/model.int8.onnx")), StageOutcome(
                      outputs=["onnx/model.int8.onnx"], summary={"calibration": calibration,
                                                                 "tensorrt_cache": None}))[1])
    for variant in ("fp32", "int8"):
        run.run_stage(f"validate:{variant}", inputs={"onnx": run.file(f"onnx/model.{variant}.onnx")},
                      settings={"samples": 9}, action=lambda v=variant: _validate(run, v, model))
    x, labels, fp32_pred = _inputs(32, 5), np.random.default_rng(6).integers(0, NUM_CLASSES, 32), {}
    for variant in ("fp32", "int8"):
        run.run_stage(f"evaluate:{variant}", inputs={"onnx": run.file(f"onnx/model.{variant}.onnx")},
                      settings={"n": 32}, action=lambda v=variant: _evaluate(run, v, x, labels, fp32_pred))
    run.record_skip("build:tensorrt", "no CUDA device")
    run.manifest["command"] = f"{COMMAND} --out {root}"
    run.manifest["model"] = "resnet18"
    run.save()
    return run


_RUNS: dict[str, RunDir] = {}


def shared_run(tmp_path_factory) -> RunDir:
    """One run directory per test session (building it takes seconds): bench and report tests share it."""
    if "run" not in _RUNS:
        _RUNS["run"] = make_run(tmp_path_factory.mktemp("run") / "resnet18")
    return _RUNS["run"]


FAST = BenchSettings(batch_sizes=(1, 2), warmup=2, min_time=0.2, max_time=1.0, min_iters=5)


# --- tests ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    return shared_run(tmp_path_factory)


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


def test_rows_cover_every_variant_and_batch(results):
    rows = _by(results)
    ok = [k for k, r in rows.items() if r["status"] == "ok"]
    assert sorted(ok) == sorted((v, b) for v in ("pytorch", "fp32", "int8") for b in (1, 2))
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


def test_skipped_tensorrt_build_is_a_row(results):
    rows = [r for r in results["rows"] if r["variant"] == "tensorrt"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["status"] == "skipped" and r["reason"] == "no CUDA device" for r in rows)
    assert all(r["p50_ms"] is None and r["speedup_vs_pytorch"] is None for r in rows)
    outcome = bench_outcome(results)
    assert outcome.outputs == [RESULTS_FILE] and outcome.summary["rows"] == {"ok": 6, "skipped": 2}


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
    assert [(r["variant"], r["status"]) for r in res["rows"]] == [("int8", "ok")]
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
