"""The TensorRT backend (rexport's glue over the trt_engine package): settings conversion, ONNX checks, the clean
refusal on a machine without TensorRT/GPU, and, marked ``gpu``, real builds where TensorRT is installed.
The version rules themselves are tested in test_trt_engine.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rexport.core.errors import InputError, MissingDependency
from rexport.pipeline.backends import BuildSettings
from rexport.pipeline.backends import trt_engine as te
from rexport.pipeline.backends.tensorrt import TensorRTBackend, build_spec, onnx_facts


def test_build_settings_become_a_build_spec():
    spec = build_spec("int8", BuildSettings(min_batch=2, opt_batch=4, max_batch=8, legacy=True, threads=3,
                                            cuda_graphs=True, timing_cache="t.cache"))
    assert (spec.min_batch, spec.opt_batch, spec.max_batch, spec.legacy, spec.timing_cache) == (2, 4, 8, True, "t.cache")
    assert spec.int8_float is None          # the file's, from its layer intent
    assert not hasattr(spec, "threads") and not hasattr(spec, "cuda_graphs")
    with pytest.raises(InputError, match="no precision 'bf16'") as e:   # trt_engine's refusal, as rexport's error
        build_spec("bf16", BuildSettings())
    assert e.value.exit_code == 2


def test_onnx_facts_of_real_files(small_run, tmp_path):
    from rexport.pipeline.manifest import RunDir
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    run = RunDir(shutil.copytree(small_run.path, tmp_path / "run"))
    with run.locked():
        run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
    fp32, fp16 = onnx_facts(run.file("onnx/model.fp32.onnx")), onnx_facts(run.file("onnx/model.fp16.onnx"))
    assert fp32["input_shape"][1:] == [3, 64, 64] and not fp32["qdq"] and not fp32["fp16"]
    assert fp16["fp16"] and not fp16["qdq"]
    assert te.source_mismatch(fp32, "fp16", te.STRONGLY_TYPED) and te.source_mismatch(fp16, "fp16", te.STRONGLY_TYPED) is None
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(InputError, match="not a readable ONNX"):
        onnx_facts(bad)


def test_unavailable_here_says_what_is_missing_and_what_to_do():
    backend = TensorRTBackend()
    reason = backend.unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a CUDA device are present here")
    assert reason in ("no CUDA device", "tensorrt not installed", "no CUDA device, tensorrt not installed")
    err = backend.missing_dependency()
    assert isinstance(err, MissingDependency) and err.exit_code == 2
    assert reason in str(err) and "\n" not in str(err)
    assert err.hint and "--backend openvino" in err.hint and "rexport[tensorrt]" in err.hint


def test_build_and_load_refuse_cleanly_without_tensorrt(tmp_path):
    backend = TensorRTBackend()
    if backend.unavailable_reason() is None:
        pytest.skip("TensorRT and a CUDA device are present here")
    onnx = tmp_path / "model.fp32.onnx"
    onnx.write_bytes(b"not read: the refusal comes first")
    with pytest.raises(MissingDependency, match="TensorRT"):
        backend.build(onnx, tmp_path / "out", "fp32", BuildSettings())
    assert not (tmp_path / "out").exists()
    engine = tmp_path / "tensorrt-fp32"
    engine.mkdir()
    (engine / "model.plan").write_bytes(b"plan")
    result = te.BuildResult(plan=b"plan", version="10.3.0", path=te.STRONGLY_TYPED, io={"inputs": [], "outputs": []},
                            profile={}, record={"precision": "fp32"}, seconds=0.0)
    sc = te.make_sidecar(result, engine, {"name": "L4", "compute_capability": "8.9"}, source_onnx=onnx,
                         source_variant="fp32", preprocess={}, built_by="test")
    (engine / "sidecar.json").write_text(json.dumps(sc))
    with pytest.raises(MissingDependency):
        backend.load(engine)


def test_importing_the_backend_imports_no_runtime():
    code = ("import sys, rexport.pipeline.backends.tensorrt as t; t.TensorRTBackend().unavailable_reason(); "
            "bad = [m for m in ('tensorrt', 'torch', 'polygraphy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- real TensorRT (make test-gpu; scripts/gpu_check.sh covers both models and every INT8 form) -----


def _gpu_run(small_run, tmp_path):
    pytest.importorskip("tensorrt")
    backend = TensorRTBackend()
    if backend.unavailable_reason():
        pytest.skip(backend.unavailable_reason())
    from rexport.pipeline.manifest import RunDir

    return backend, RunDir(shutil.copytree(small_run.path, tmp_path / "run"))


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_real_fp32_build_matches_onnxruntime(small_run, tmp_path, cuda_graphs):
    backend, run = _gpu_run(small_run, tmp_path)
    from rexport.pipeline.backends.sidecar import write_sidecar
    from rexport.pipeline.runners import OnnxRuntimeRunner

    src, dest = run.file("onnx/model.fp32.onnx"), tmp_path / "tensorrt-fp32"
    dest.mkdir()
    sidecar = backend.build(src, dest, "fp32", BuildSettings(opt_batch=2, max_batch=4, cuda_graphs=cuda_graphs),
                            progress=False)
    write_sidecar(dest, sidecar)
    assert sidecar["build_settings"]["tf32"] in (False, None)     # what was applied, not what was asked
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64), dtype=np.float32)
    with OnnxRuntimeRunner(src) as ref, backend.load(dest) as eng:
        np.testing.assert_allclose(eng.infer(x), ref.infer(x), atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(eng.infer(x[:1]), ref.infer(x[:1]), atol=1e-3, rtol=1e-3)   # a new shape
        assert eng.last_device_ms is not None and eng.last_device_ms > 0
        assert eng.settings["cuda_graphs"] == "on" if cuda_graphs else eng.settings["cuda_graphs"] == "off"


@pytest.mark.gpu
def test_real_legacy_int8_build_records_the_file_intent(small_run, tmp_path):
    backend, run = _gpu_run(small_run, tmp_path)
    if te.major_minor(backend.tensorrt_version())[0] >= 11:
        pytest.skip("TensorRT 11 has no weak-typed INT8")
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    with run.locked():
        rec = run_quantize(run, QuantizeSettings(precision="int8", calib_samples=8, skip_first_conv=True), progress=False)
    dest = tmp_path / "tensorrt-int8"
    dest.mkdir()
    sc = backend.build(run.file("onnx/model.fp32.onnx"), dest, "int8", BuildSettings(legacy=True, max_batch=4),
                       calibration_cache=run.file(rec["summary"]["tensorrt_cache"]), progress=False)
    intent = sc["build_settings"]["layer_intent"]
    assert sc["build_settings"]["build_path"] == te.WEAK_TYPED and intent["unmatched"] == []
    assert intent["pinned"] >= 1 and intent["constraint"] == "OBEY_PRECISION_CONSTRAINTS"
