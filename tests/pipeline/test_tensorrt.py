"""The TensorRT backend: its version logic on CPU (no TensorRT needed), the refusal on a machine
without TensorRT/GPU, and, marked ``gpu``, a real build where TensorRT is installed."""
from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rexport.core.errors import InputError, MissingDependency
from rexport.pipeline.backends import BuildSettings
from rexport.pipeline.backends import tensorrt as trt_backend
from rexport.pipeline.backends.sidecar import read_sidecar, verify_engine_files
from rexport.pipeline.backends.tensorrt import (STRONGLY_TYPED, WEAK_TYPED, CacheOnlyCalibration, TensorRTBackend,
                                                builder_flags_for, choose_build_path, onnx_facts, profile_shapes,
                                                source_mismatch, source_variant_for, trt_compat_problems,
                                                unsupported_settings)

TEMPLATES = Path(trt_backend.__file__).resolve().parents[1] / "templates"
BUILD_PATHS = [  # (TensorRT version, --legacy, expected path or None for "refused")
    ("8.5.2", False, WEAK_TYPED), ("8.5.2", True, WEAK_TYPED),          # JetPack 5.1: no strong typing
    ("8.6.1", False, WEAK_TYPED), ("8.6.1", True, WEAK_TYPED),          # JetPack 6.0
    ("10.3.0", False, STRONGLY_TYPED), ("10.3.0", True, WEAK_TYPED),    # JetPack 6.1/6.2
    ("10.13.2.6", False, STRONGLY_TYPED), ("10.13.2.6", True, WEAK_TYPED),
    ("11.0.0", False, STRONGLY_TYPED), ("11.0.0", True, None),          # 11 removed the weak-typing flags
]


def test_profile_shapes_cover_the_batch_range():
    s = BuildSettings(min_batch=1, opt_batch=4, max_batch=16)
    assert profile_shapes((3, 64, 64), s) == {"min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [16, 3, 64, 64]}
    assert profile_shapes([3, 224, 224], BuildSettings())["max"] == [32, 3, 224, 224]
    with pytest.raises(InputError, match="fixed C,H,W"):
        profile_shapes((3, -1, 64), s)
    with pytest.raises(InputError):
        profile_shapes((64, 64), s)


@pytest.mark.parametrize("version,legacy,expected", BUILD_PATHS)
def test_choose_build_path(version, legacy, expected):
    settings = BuildSettings(legacy=legacy)
    if expected is None:
        with pytest.raises(InputError, match="TensorRT 11 removed") as e:
            choose_build_path(version, settings)
        assert "drop --legacy" in str(e.value)
    else:
        assert choose_build_path(version, settings) == expected


def test_choose_build_path_rejects_an_unreadable_version():
    with pytest.raises(InputError, match="TensorRT version"):
        choose_build_path("unknown", BuildSettings())


def test_builder_flags_and_source_variant_per_path():
    for p in ("fp32", "fp16", "int8"):
        assert builder_flags_for(p, STRONGLY_TYPED) == []          # precision comes from the ONNX tensor types
        assert source_variant_for(p, STRONGLY_TYPED) == p
        assert source_variant_for(p, WEAK_TYPED) == "fp32"        # flags + calibration cache on the FP32 graph
    assert builder_flags_for("fp32", WEAK_TYPED) == []
    assert builder_flags_for("fp16", WEAK_TYPED) == ["FP16"]
    assert builder_flags_for("int8", WEAK_TYPED) == ["INT8", "FP16"]
    with pytest.raises(InputError, match="bf16"):
        builder_flags_for("bf16", WEAK_TYPED)


def _tiny_onnx(path: Path, kind: str) -> Path:
    """A 1x1 conv classifier head: plain fp32, with Q/DQ on its input, or with fp16 weights and casts."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((3, 3, 1, 1), np.float32)
    nodes, inits, x = [], [], "input"
    if kind == "int8":
        inits += [numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.int8(0), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        x = "dq"
    if kind == "fp16":
        inits.append(numpy_helper.from_array(w.astype(np.float16), "w"))
        nodes += [helper.make_node("Cast", ["input"], ["x16"], to=TensorProto.FLOAT16),
                  helper.make_node("Conv", ["x16", "w"], ["y16"]),
                  helper.make_node("Cast", ["y16"], ["logits"], to=TensorProto.FLOAT)]
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("Conv", [x, "w"], ["logits"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="rexport.preprocess", value='{"input_size": 8, "resize": 9}')
    onnx.save(model, str(path))
    return path


def test_strongly_typed_builds_only_take_the_file_of_their_precision(tmp_path):
    files = {k: onnx_facts(_tiny_onnx(tmp_path / f"model.{k}.onnx", k)) for k in ("fp32", "fp16", "int8")}
    assert files["fp32"]["input"] == "input" and files["fp32"]["input_shape"] == [-1, 3, 8, 8]
    assert (files["int8"]["qdq"], files["fp16"]["fp16"], files["fp32"]["qdq"], files["fp32"]["fp16"]) == (
        True, True, False, False)
    for precision in ("fp32", "fp16", "int8"):
        for kind, facts in files.items():
            problem = source_mismatch(facts, precision, STRONGLY_TYPED)
            assert (problem is None) == (kind == precision), (precision, kind, problem)
            assert source_mismatch(facts, precision, WEAK_TYPED) is None    # flags decide there
    assert "Q/DQ" in source_mismatch(files["fp32"], "int8", STRONGLY_TYPED)


def test_settings_older_tensorrt_cannot_honour():
    vc = BuildSettings(version_compatible=True, hardware_compatible=True, builder_opt_level=5)
    problems = unsupported_settings("8.5.2", vc)
    assert len(problems) == 3 and all("8.6" in p for p in problems)
    assert unsupported_settings("8.6.1", vc) == []
    assert unsupported_settings("10.3.0", BuildSettings(builder_opt_level=7))[0].startswith("--builder-opt-level 7")
    hc = BuildSettings(hardware_compatible=True)
    turing = {"name": "Tesla T4", "compute_capability": "7.5", "integrated": False}
    orin = {"name": "Orin", "compute_capability": "8.7", "integrated": True}
    assert "Ampere" in unsupported_settings("10.3.0", hc, turing)[0]
    assert "Jetson" in unsupported_settings("10.3.0", hc, orin)[0]
    assert unsupported_settings("10.3.0", hc, {"name": "A100", "compute_capability": "8.0", "integrated": False}) == []


def _sidecar(trt="10.3.0", cc="8.7", name="Orin", vc=False, hc=False, precision="int8") -> dict:
    """A sidecar as the build writes it (only what the check reads differs between cases)."""
    return {"schema_version": 1, "backend": "tensorrt", "precision": precision,
            "engine_files": {"model.plan": "0" * 64},
            "source_onnx": {"file": f"model.{precision}.onnx", "sha256": "1" * 64, "variant": precision},
            "runtime": {"tensorrt": trt, "cuda": "12.6"},
            "device": {"kind": "gpu", "name": name, "compute_capability": cc, "integrated": True, "dla_core": None},
            "io": {"inputs": [{"name": "input", "shape": [-1, 3, 224, 224], "dtype": "float32"}],
                   "outputs": [{"name": "logits", "shape": [-1, 1000], "dtype": "float32"}]},
            "profile": {"input": "input", "min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]},
            "build_settings": {"version_compatible": vc, "hardware_compatible": hc, "build_path": STRONGLY_TYPED},
            "load_settings": {"cuda_graphs": False}, "build_seconds": 12.0, "preprocess": {}, "created": "x"}


def _facts(trt="10.3.0", cc="8.7", gpu="Orin"):
    return {"tensorrt": trt, "gpu": gpu, "compute_capability": cc}


def test_compat_same_machine_and_build_number():
    assert trt_compat_problems(_sidecar(), _facts()) == []
    assert trt_compat_problems(_sidecar(trt="10.3.0"), _facts(trt="10.3.0.30")) == []   # pip "10.3.0" vs trt.__version__


def test_compat_other_tensorrt_version():
    problems = trt_compat_problems(_sidecar(trt="8.6.2"), _facts(trt="10.3.0"))
    assert len(problems) == 1
    p = problems[0]
    assert "8.6.2" in p and "10.3.0" in p
    assert "rexport build --backend tensorrt --precision int8" in p and "on this machine" in p


def test_compat_version_compatible_plans_run_on_newer_tensorrt_only():
    assert trt_compat_problems(_sidecar(trt="10.3.0", vc=True), _facts(trt="10.8.0")) == []
    assert trt_compat_problems(_sidecar(trt="8.6.1", vc=True), _facts(trt="10.3.0")) == []
    older = trt_compat_problems(_sidecar(trt="10.8.0", vc=True), _facts(trt="10.3.0"))
    assert len(older) == 1 and "newer" in older[0] and "10.8.0" in older[0]


def test_compat_other_gpu_architecture():
    problems = trt_compat_problems(_sidecar(cc="8.7", name="Orin", precision="fp16"),
                                   _facts(cc="8.6", gpu="NVIDIA GeForce RTX 3090"))
    assert len(problems) == 1
    assert "8.7" in problems[0] and "8.6" in problems[0] and "RTX 3090" in problems[0]
    assert "--precision fp16" in problems[0]
    # Another GPU of the same compute capability is fine.
    assert trt_compat_problems(_sidecar(cc="8.6", name="RTX 3090"), _facts(cc="8.6", gpu="RTX A6000")) == []


def test_compat_hardware_compatible_plans_need_ampere_or_newer():
    assert trt_compat_problems(_sidecar(cc="8.6", hc=True), _facts(cc="9.0", gpu="H100")) == []
    turing = trt_compat_problems(_sidecar(cc="8.6", hc=True), _facts(cc="7.5", gpu="Tesla T4"))
    assert len(turing) == 1 and "Ampere" in turing[0] and "7.5" in turing[0]


def test_compat_reports_every_difference():
    problems = trt_compat_problems(_sidecar(trt="8.5.2", cc="7.2"), _facts(trt="10.3.0", cc="8.7"))
    assert len(problems) == 2
    assert trt_compat_problems({**_sidecar(), "backend": "openvino"}, _facts())[0].startswith("this is a 'openvino'")


@pytest.mark.parametrize("method,base", [("entropy", "IInt8EntropyCalibrator2"), ("minmax", "IInt8MinMaxCalibrator")])
def test_cache_only_calibration_reads_our_cache(tmp_path, method, base):
    from rexport.calibration.tensorrt_cache import algorithm_for, write_tensorrt_cache

    path = write_tensorrt_cache({"input": 2.64, "/conv1/Conv_output_0": 7.5}, tmp_path / "c.tensorrt.cache",
                                algorithm=algorithm_for(method), version=8601)
    data = path.read_bytes()
    cal = CacheOnlyCalibration(data)
    assert cal.base_class == base
    assert cal.read_calibration_cache() is data      # TensorRT gets our bytes, untouched
    assert cal.get_batch(["input"]) is None          # and no data: nothing is calibrated on the device
    assert cal.get_batch_size() == 1
    cal.write_calibration_cache(b"TRT-8601-EntropyCalibration2\nx: 00000000\n")
    assert path.read_bytes() == data                  # the run's cache is never overwritten


def test_cache_only_calibration_rejects_other_files():
    with pytest.raises(InputError, match="not a TensorRT calibration cache"):
        CacheOnlyCalibration(b'{"input": 1.0}\n')
    with pytest.raises(InputError):
        CacheOnlyCalibration(b"TRT-8601-LegacyCalibration\ninput: 3c010204\n")


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
    engine = tmp_path / "tensorrt-fp32"
    engine.mkdir()
    (engine / "model.plan").write_bytes(b"plan")
    from rexport.core.fsio import sha256_file

    sc = _sidecar(precision="fp32")
    sc["engine_files"] = {"model.plan": sha256_file(engine / "model.plan")}
    (engine / "sidecar.json").write_text(json.dumps(sc))
    with pytest.raises(MissingDependency):
        backend.load(engine)


def test_importing_the_backend_imports_no_runtime():
    code = ("import sys, rexport.pipeline.backends.tensorrt as t; t.TensorRTBackend().unavailable_reason(); "
            "bad = [m for m in ('tensorrt', 'torch', 'polygraphy.backend.trt') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_on_device_builder_follows_the_same_rules(tmp_path):
    """templates/build_engine.py (standalone copy of the logic) agrees with the backend, and the
    sidecar it writes is one rexport reads and verifies."""
    tpl = runpy.run_path(str(TEMPLATES / "build_engine.py"), run_name="build_engine_template")
    assert tpl["CALIBRATOR_FOR_ALGORITHM"] == trt_backend.CALIBRATOR_FOR_ALGORITHM
    for version, legacy, expected in BUILD_PATHS:
        if expected is None:
            with pytest.raises(tpl["BuildError"]):
                tpl["choose_build_path"](version, legacy)
            continue
        path = tpl["choose_build_path"](version, legacy)
        assert path == choose_build_path(version, BuildSettings(legacy=legacy))
        for p in ("fp32", "fp16", "int8"):
            assert tpl["builder_flags_for"](p, path) == builder_flags_for(p, path)
            assert tpl["source_variant_for"](p, path) == source_variant_for(p, path)

    engine = tmp_path / "tensorrt-int8"
    engine.mkdir()
    (engine / "model.plan").write_bytes(b"\x00plan bytes")
    onnx = tmp_path / "model.int8.onnx"
    onnx.write_bytes(b"onnx bytes")
    gpu = {"name": "Orin", "compute_capability": "8.7", "integrated": True, "cuda_driver": "12.6"}
    sc = tpl["make_sidecar"](precision="int8", engine_dir=engine, plan_name="model.plan", source_onnx=onnx,
                             source_variant="int8", trt_version="10.3.0", gpu=gpu,
                             io={"inputs": [{"name": "input", "shape": [-1, 3, 64, 64], "dtype": "float32"}],
                                 "outputs": [{"name": "logits", "shape": [-1, 3], "dtype": "float32"}]},
                             profile={"input": "input", "min": [1, 3, 64, 64], "opt": [1, 3, 64, 64],
                                      "max": [1, 3, 64, 64]},
                             build_settings={"version_compatible": False}, build_seconds=1.0, preprocess={})
    (engine / "sidecar.json").write_text(json.dumps(sc))
    back = read_sidecar(engine)
    verify_engine_files(engine, back)
    assert trt_compat_problems(back, _facts(trt="10.3.0", cc="8.7")) == []
    assert trt_compat_problems(back, _facts(trt="10.3.0", cc="8.6"))


def test_bundle_runner_checks_versions_like_the_backend():
    tpl = runpy.run_path(str(TEMPLATES / "run_engine.py"), run_name="run_engine_template")
    for built, here, vc in [("10.3.0", "10.3.0.30", False), ("8.6.2", "10.3.0", False), ("10.3.0", "10.8.0", True),
                            ("10.8.0", "10.3.0", True), ("8.5.2", "8.5.2", False)]:
        sc = _sidecar(trt=built, vc=vc)
        assert bool(tpl["tensorrt_mismatch"](sc, here)) == bool(trt_compat_problems(sc, _facts(trt=here)))


# -- real TensorRT (make test-gpu) -----------------------------------------------------------------


@pytest.mark.gpu
def test_real_build_matches_onnxruntime(tmp_path):
    pytest.importorskip("tensorrt")
    backend = TensorRTBackend()
    if backend.unavailable_reason():
        pytest.skip(backend.unavailable_reason())
    import torch

    from rexport.core.preprocess import PreprocessSpec
    from rexport.models.resnet import resnet18
    from rexport.pipeline.runners import OnnxRuntimeRunner

    torch.manual_seed(0)
    onnx_path = tmp_path / "model.fp32.onnx"
    torch.onnx.export(resnet18(num_classes=3).eval(), torch.randn(1, 3, 64, 64), str(onnx_path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    import onnx

    m = onnx.load(str(onnx_path))
    m.metadata_props.add(key="rexport.preprocess", value=PreprocessSpec(input_size=64, resize=73).to_json())
    onnx.save(m, str(onnx_path))
    dest = tmp_path / "tensorrt-fp32"
    dest.mkdir()
    settings = BuildSettings(min_batch=1, opt_batch=2, max_batch=4)
    sidecar = backend.build(onnx_path, dest, "fp32", settings, progress=False)
    from rexport.pipeline.backends.sidecar import write_sidecar

    write_sidecar(dest, sidecar)
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64), dtype=np.float32)
    with OnnxRuntimeRunner(onnx_path) as ref, backend.load(dest) as eng:
        np.testing.assert_allclose(eng.infer(x), ref.infer(x), atol=1e-3, rtol=1e-3)


def test_cache_header_is_retagged_for_the_running_tensorrt():
    from rexport.pipeline.backends.tensorrt import retag_cache

    cache = b"TRT-8601-EntropyCalibration2\ninput: 3c010204\nrelu_1: 3d000000\n"
    out = retag_cache(cache, "10.3.0")
    assert out.splitlines()[0] == b"TRT-100300-EntropyCalibration2"
    assert out.splitlines()[1:] == cache.splitlines()[1:]
    assert CacheOnlyCalibration(retag_cache(cache, "8.5.2")).cache.startswith(b"TRT-8502-")
