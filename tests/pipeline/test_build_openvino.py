"""The build stage with real OpenVINO CPU engines from a real (tiny) ResNet-18 export."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from rexport.core.env import cpu_info, package_version
from rexport.core.errors import InputError, MissingDependency
from rexport.core.fsio import sha256_file
from rexport.pipeline.backends import backends, get_backend
from rexport.pipeline.backends.sidecar import load_engine, read_sidecar, write_sidecar
from rexport.pipeline.build import build_engines
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.runners import OnnxRuntimeRunner

SIZE = 64
HAS_BF16 = any(f in cpu_info()["isa"] for f in ("avx512_bf16", "amx_bf16"))
ov_backend = pytest.importorskip("rexport.pipeline.backends.openvino")


def _export(path, seed: int = 0) -> int:
    """Write a seeded ResNet-18 (10 classes) to ``path``; return its parameter count."""
    import torch

    from rexport.models.resnet import resnet18

    torch.manual_seed(seed)
    model = resnet18(num_classes=10).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.randn(1, 3, SIZE, SIZE), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return sum(p.numel() for p in model.parameters())


def _quantize(src, dst) -> None:
    """A symmetric per-channel INT8 Q/DQ model, calibrated (MinMax) on a few synthetic batches."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._it = iter([{"input": rng.standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(src), str(dst), Batches(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


def _new_run(path, fp32_src=None) -> tuple[RunDir, int]:
    run = RunDir(path)
    dst = run.file(VARIANT_FILES["fp32"])
    if fp32_src is None:
        n_params = _export(dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fp32_src, dst)
        n_params = 0
    run.run_stage("export", inputs={}, settings={"model": "resnet18", "num_classes": 10, "input_size": SIZE},
                  action=lambda: StageOutcome(outputs=[VARIANT_FILES["fp32"]]))
    return run, n_params


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run, n_params = _new_run(tmp_path_factory.mktemp("run"))
    # the OpenVINO engine compiles the OpenVINO form of the INT8 file (int8-openvino)
    _quantize(run.file(VARIANT_FILES["fp32"]), run.file(VARIANT_FILES["int8-openvino"]))
    return run, n_params


@pytest.fixture(scope="module")
def built(exported):
    run, n_params = exported
    with run.locked():
        records = build_engines(run, backend="openvino", progress=False)
    return run, n_params, {r["name"]: r for r in records}


def _batch(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)


def test_builds_every_precision_the_cpu_offers(built):
    run, _, recs = built
    assert list(recs) == ["build:openvino-fp32", "build:openvino-bf16", "build:openvino-int8"]
    assert recs["build:openvino-fp32"]["status"] == "ok" and recs["build:openvino-int8"]["status"] == "ok"
    bf16 = recs["build:openvino-bf16"]
    if HAS_BF16:
        assert bf16["status"] == "ok"
    else:
        assert bf16["status"] == "skipped" and "native BF16" in bf16["reason"]
        assert run.stage("build:openvino-bf16")["status"] == "skipped"
    for name, rec in recs.items():
        if rec["status"] != "ok":
            continue
        folder = name.split(":", 1)[1]
        assert set(rec["outputs"]) == {f"engines/{folder}/{f}" for f in ("model.xml", "model.bin", "sidecar.json")}
        assert rec["summary"]["engine_dir"] == f"engines/{folder}" and rec["summary"]["size_mib"] > 0
        assert run.stage(name)["status"] == "ok"
    # nothing half-written is left beside the engine folders
    assert sorted(p.name for p in (run.path / "engines").iterdir()) == sorted(
        n.split(":", 1)[1] for n, r in recs.items() if r["status"] == "ok")


def test_fp32_sidecar(built):
    run, _, _ = built
    d = run.path / "engines" / "openvino-fp32"
    sc = read_sidecar(d)
    assert sc["backend"] == "openvino" and sc["precision"] == "fp32"
    assert sc["load_settings"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert sc["load_settings"]["PERFORMANCE_HINT"] == "LATENCY"
    assert sc["engine_files"] == {f: sha256_file(d / f) for f in ("model.xml", "model.bin")}
    assert sc["source_onnx"] == {"file": "model.fp32.onnx", "variant": "fp32",
                                 "sha256": sha256_file(run.file(VARIANT_FILES["fp32"]))}
    assert sc["io"]["inputs"] == [{"name": "input", "shape": [-1, 3, SIZE, SIZE], "dtype": "float32"}]
    assert sc["io"]["outputs"] == [{"name": "logits", "shape": [-1, 10], "dtype": "float32"}]
    assert sc["device"]["kind"] == "cpu" and sc["device"]["isa"] == cpu_info()["isa"]
    assert sc["runtime"]["openvino"] == package_version("openvino")
    assert sc["build_settings"]["compress_to_fp16"] is False
    int8 = read_sidecar(run.path / "engines" / "openvino-int8")
    assert int8["source_onnx"]["variant"] == "int8-openvino" and int8["load_settings"]["INFERENCE_PRECISION_HINT"] == "f32"


def test_fp32_engine_is_fp32(built):
    """Uncompressed weights and f32 compute: the engine matches ONNX Runtime at batch 1 and 3."""
    run, n_params, _ = built
    d = run.path / "engines" / "openvino-fp32"
    weight_bytes = (d / "model.bin").stat().st_size
    assert 0.95 * 4 * n_params <= weight_bytes <= 1.05 * 4 * n_params  # fp16-compressed would be about half
    with load_engine(d) as ov_run, OnnxRuntimeRunner(run.file(VARIANT_FILES["fp32"])) as ort_run:
        assert ov_run.settings["inference_precision"] == "f32"
        assert ov_run.settings["performance_hint"] == "LATENCY" and ov_run.settings["streams"] == 1
        for n in (1, 3):
            x = _batch(n)
            got, ref = ov_run.infer(x), ort_run.infer(x)
            assert got.shape == ref.shape == (n, 10) and got.dtype == np.float32
            assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_threads_are_passed_to_openvino(built):
    run, _, _ = built
    with load_engine(run.path / "engines" / "openvino-fp32", threads=1) as r:
        assert r.settings["threads"] == 1 and r.settings["load_settings"]["INFERENCE_NUM_THREADS"] == 1


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native BF16")
def test_bf16_engine_computes_in_bf16_and_agrees_with_fp32(built):
    run, _, _ = built
    x = _batch(8)
    with load_engine(run.path / "engines" / "openvino-fp32") as fp32, \
            load_engine(run.path / "engines" / "openvino-bf16") as bf16:
        assert bf16.settings["inference_precision"] == "bf16"
        ref, got = fp32.infer(x), bf16.infer(x)
    assert not np.array_equal(got, ref)  # bf16 really ran
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999 and (got.argmax(1) == ref.argmax(1)).mean() >= 7 / 8


def _qdq_emulated(path, x: np.ndarray) -> np.ndarray:
    """The Q/DQ file's exact meaning: ONNX Runtime with its graph optimizations off runs each
    DequantizeLinear -> float op -> QuantizeLinear as written, with no integer kernel that could saturate."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_engine_agrees_with_the_int8_onnx(built):
    run, _, _ = built
    x = _batch(4)
    src = run.file(VARIANT_FILES["int8-openvino"])
    with load_engine(run.path / "engines" / "openvino-int8") as ov_run, OnnxRuntimeRunner(src) as ort_run:
        assert ov_run.settings["inference_precision"] == "f32"
        got, ort_int8 = ov_run.infer(x), ort_run.infer(x)
    assert _cosines(got, _qdq_emulated(src, x)).min() > 0.99
    settings = read_sidecar(run.path / "engines" / "openvino-int8")["build_settings"]
    if ov_backend.has_vnni(cpu_info()["isa"]):
        # VNNI: no weight is touched, and ONNX Runtime's own INT8 kernels are exact too
        assert "weights_7bit_overflow_fix" not in settings
        assert _cosines(got, ort_int8).min() > 0.99
    else:
        # no VNNI: the layer fed by the signed input quantizer gets NNCF's 7-bit overflow fix, and says so
        # (ONNX Runtime's own u8 x s8 kernels saturate here too, so they are no reference on this CPU)
        assert settings["weights_7bit_overflow_fix"] >= 1 and "VNNI" in settings["overflow_fix_reason"]


def test_second_build_is_reused(built):
    run, _, first = built
    again = build_engines(run, backend="openvino", progress=False)
    for rec in again:
        if rec["status"] == "ok":
            assert rec["reused"] is True, rec["name"]
    assert [r["name"] for r in again] == list(first)


def _copy_engine(run, tmp_path, name="openvino-fp32"):
    dst = tmp_path / name
    shutil.copytree(run.path / "engines" / name, dst)
    return dst


def test_tampered_engine_is_refused(built, tmp_path):
    d = _copy_engine(built[0], tmp_path)
    with open(d / "model.bin", "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0x01]))
    message = (r"engine file model.bin was modified after build \(sha256 mismatch\); "
               r"rebuild with 'rexport build --backend openvino --precision fp32'")
    with pytest.raises(InputError, match=message):
        load_engine(d)
    with pytest.raises(InputError, match=message):  # the backend checks too, for callers that skip load_engine
        get_backend("openvino").load(d)


def test_engine_from_a_newer_openvino_is_refused(built, tmp_path):
    d = _copy_engine(built[0], tmp_path)
    sc = read_sidecar(d)
    write_sidecar(d, {**sc, "runtime": {**sc["runtime"], "openvino": "2099.1.0"}})
    with pytest.raises(InputError, match=f"engine built with OpenVINO 2099.1.0, this machine has "
                                         f"{package_version('openvino')}.*rebuild with 'rexport build --backend openvino"):
        load_engine(d)
    write_sidecar(d, {**sc, "runtime": {**sc["runtime"], "openvino": "2024.0.0"}})  # older is fine
    with load_engine(d) as r:
        assert r.infer(_batch(1)).shape == (1, 10)


def test_compatibility_check_on_recorded_metadata(built):
    sc = read_sidecar(built[0].path / "engines" / "openvino-fp32")
    bf16 = {**sc, "precision": "bf16", "load_settings": {**sc["load_settings"], "INFERENCE_PRECISION_HINT": "bf16"}}
    with_bf16 = {"openvino": sc["runtime"]["openvino"], "isa": ["avx2", "avx512f", "avx512_bf16"], "model": "x"}
    without = {**with_bf16, "isa": ["avx2", "avx512f"], "model": "Old Xeon"}
    assert ov_backend.compatibility_problems(bf16, with_bf16) == []
    assert ov_backend.compatibility_problems(sc, without) == []
    problems = ov_backend.compatibility_problems(bf16, without)
    assert len(problems) == 1 and "native BF16" in problems[0] and "Old Xeon" in problems[0]
    # a sidecar whose load settings would silently change the precision is refused too
    wrong = {**sc, "load_settings": {"PERFORMANCE_HINT": "LATENCY"}}
    assert any("INFERENCE_PRECISION_HINT f32" in p for p in ov_backend.compatibility_problems(wrong, with_bf16))
    assert ov_backend.compatibility_problems({**sc, "backend": "tensorrt"}, with_bf16)


def test_auto_is_openvino_without_tensorrt():
    # every built-in backend is registered, even after one of them was imported directly (as this module did)
    regs = backends()
    assert {"openvino", "tensorrt"} <= set(regs)
    expected = "tensorrt" if regs["tensorrt"].unavailable_reason() is None else "openvino"
    assert get_backend("auto").name == expected


def test_unavailable_backend_raises_or_is_recorded_skipped(exported, tmp_path):
    trt = get_backend("tensorrt")
    if trt.unavailable_reason() is None:
        pytest.skip("TensorRT can run here")
    run, _ = _new_run(tmp_path / "run", fp32_src=exported[0].file(VARIANT_FILES["fp32"]))
    before = run.manifest_path.read_bytes()
    with pytest.raises(MissingDependency) as e:
        build_engines(run, backend="tensorrt", progress=False)
    assert e.value.exit_code == 2 and "TensorRT" in str(e.value)
    assert run.manifest_path.read_bytes() == before and not (run.path / "engines").exists()
    recs = build_engines(run, backend="tensorrt", progress=False, skip_unavailable=True)
    assert [r["name"] for r in recs] == ["build:tensorrt"] and recs[0]["status"] == "skipped"
    assert RunDir(run.path).stage("build:tensorrt")["reason"] == trt.unavailable_reason()


def test_explicit_precisions_are_checked_before_building(exported, tmp_path):
    run, _ = _new_run(tmp_path / "run", fp32_src=exported[0].file(VARIANT_FILES["fp32"]))
    with pytest.raises(InputError) as e:
        build_engines(run, backend="openvino", precisions=["fp32", "int8"], progress=False)
    assert "model.int8-openvino.onnx not found" in str(e.value)
    assert "run 'rexport quantize --precision int8' first" in str(e.value)
    with pytest.raises(InputError, match="OpenVINO on x86 computes an fp16 model in f32 or bf16; use fp32, bf16 or int8"):
        build_engines(run, backend="openvino", precisions=["fp16"], progress=False)
    assert not (run.path / "engines").exists()  # nothing was built for a refused request
    assert set(run.manifest["stages"]) == {"export"}


def test_unquantized_int8_is_recorded_skipped_when_not_asked_for(exported, tmp_path):
    run, _ = _new_run(tmp_path / "run", fp32_src=exported[0].file(VARIANT_FILES["fp32"]))
    recs = {r["name"]: r for r in build_engines(run, backend="openvino", precisions=None, progress=False)}
    assert recs["build:openvino-fp32"]["status"] == "ok"
    assert recs["build:openvino-int8"]["status"] == "skipped"
    reason = run.stage("build:openvino-int8")["reason"]
    assert "rexport quantize --precision int8" in reason
    # `rexport run` asks explicitly but with skip_unavailable: a missing variant is recorded, not raised
    recs = {r["name"]: r for r in build_engines(run, backend="openvino", precisions=["fp32", "int8"],
                                                 progress=False, skip_unavailable=True)}
    assert recs["build:openvino-fp32"]["reused"] is True and recs["build:openvino-int8"]["status"] == "skipped"


def test_build_needs_an_export(tmp_path):
    with pytest.raises(InputError, match="run 'rexport export'"):
        build_engines(RunDir(tmp_path / "empty"), backend="openvino")
