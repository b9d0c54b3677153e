"""trt_engine, the one TensorRT package: its version rules and decisions on the CPU (no TensorRT
here), that it imports without tensorrt or rexport, that the bundle's scripts are thin entry points
over it, and that the cache and layer intent written for a real Q/DQ file honour its placement."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from rexport.pipeline.backends import trt_engine as te
from rexport.pipeline.backends.sidecar import REQUIRED_KEYS, SIDECAR_SCHEMA, read_sidecar, verify_engine_files

PACKAGE = Path(te.__file__).resolve().parent             # pipeline/backends/trt_engine/
TEMPLATES = PACKAGE.parents[1] / "templates"
ORIN = {"name": "Orin", "compute_capability": "8.7", "integrated": True, "board": "NVIDIA Jetson AGX Orin Developer Kit",
        "jetpack": "7.2.2-b10", "platform": "linux-aarch64"}
H100 = {"name": "NVIDIA H100", "compute_capability": "9.0", "integrated": False}


def test_version_parse():
    assert te.version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert te.version_tuple("8.6.2.3-1+cuda12.2") == (8, 6, 2, 3)
    assert te.version_tuple("") == () and te.version_tuple(None) == () and te.version_tuple("R36") == ()
    assert te.major_minor("11") == (11, 0)
    with pytest.raises(te.TrtError, match="cannot read the TensorRT version"):
        te.major_minor("unknown")
    assert [te.version_tag(v) for v in ("8.5.2", "8.6.1", "10.3.0", "11.4.1")] == [8502, 8601, 100300, 110401]


def test_version_tag_matches_the_calibration_writer():
    from rexport.calibration import tensorrt_version_tag

    for v in ("8.5.2.2", "8.6.1", "10.3.0", "10.13.2.6", "11.4.1"):
        assert te.version_tag(v) == tensorrt_version_tag(v)


@pytest.mark.parametrize("version,legacy,expected", [
    ("8.5.2", False, te.WEAK_TYPED), ("8.6.1", True, te.WEAK_TYPED),        # JetPack 5.1 / 6.0: no strong typing
    ("10.3.0", False, te.STRONGLY_TYPED), ("10.3.0", True, te.WEAK_TYPED),  # JetPack 6.1/6.2
    ("11.4.1", False, te.STRONGLY_TYPED), ("11.0.0", True, None)])          # 11 removed weak typing
def test_build_path(version, legacy, expected):
    if expected is None:
        with pytest.raises(te.TrtError, match="TensorRT 11 removed") as e:
            te.choose_build_path(version, legacy)
        assert "drop --legacy" in e.value.hint
    else:
        assert te.choose_build_path(version, legacy) == expected


def test_flags_and_source_per_path():
    assert all(te.builder_flags_for(p, te.STRONGLY_TYPED) == [] for p in te.PRECISIONS)
    assert te.builder_flags_for("fp16", te.WEAK_TYPED) == ["FP16"]
    assert te.builder_flags_for("int8", te.WEAK_TYPED, "fp16") == ["INT8", "FP16"]
    assert te.builder_flags_for("int8", te.WEAK_TYPED, "fp32") == ["INT8"]     # FP32 float parts: no FP16 flag
    assert [te.source_variant_for(p, te.STRONGLY_TYPED) for p in te.PRECISIONS] == list(te.PRECISIONS)
    assert {te.source_variant_for(p, te.WEAK_TYPED) for p in te.PRECISIONS} == {"fp32"}
    assert te.source_mismatch({"qdq": False, "fp16": False}, "int8", te.STRONGLY_TYPED).startswith("a strongly typed int8")
    assert te.source_mismatch({"qdq": True, "fp16": False}, "fp32", te.STRONGLY_TYPED)
    assert te.source_mismatch({"qdq": False, "fp16": False}, "int8", te.WEAK_TYPED) is None


def test_build_spec_and_float_parts():
    with pytest.raises(te.TrtError, match="no precision"):
        te.BuildSpec(precision="bf16")
    with pytest.raises(te.TrtError, match="batch profile"):
        te.BuildSpec(min_batch=4, opt_batch=2)
    with pytest.raises(te.TrtError, match="int8_float"):
        te.BuildSpec(int8_float="bf16")
    assert te.float_parts(te.BuildSpec(), None) == "fp16"
    assert te.float_parts(te.BuildSpec(), {"int8_float": "fp32"}) == "fp32"         # the file's
    assert te.float_parts(te.BuildSpec(int8_float="fp16"), {"int8_float": "fp32"}) == "fp16"   # asked for


@pytest.mark.parametrize("version,device,refusal", [
    ("8.5.2", {**ORIN, "jetpack": "5.1.2"}, None),                 # JetPack 5.1
    ("10.3.0", {**ORIN, "jetpack": "6.2"}, None),                  # JetPack 6.1/6.2
    ("10.3.0", H100, "discrete GPU"),
    ("10.13.2", ORIN, "10.7 was the last 10.x"),
    ("11.2.1", ORIN, "11.0 through 11.3"),
    ("11.4.0", ORIN, "only on Windows on ARM"),
    ("11.4.0", {**ORIN, "platform": "windows-arm64"}, None),
    ("11.4.1", ORIN, None),
    ("11.4.1", {**ORIN, "jetpack": "7.1.0"}, "JetPack 7.2.2 or later; this is JetPack 7.1.0"),
    ("11.4.1", {**ORIN, "jetpack": None}, "cannot be read"),
    ("11.4.1", {**ORIN, "board": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"}, "only on Jetson AGX Orin"),
    ("11.5.0", H100, "discrete GPU"),
])
def test_dla_rules_per_version(version, device, refusal):
    problems = te.dla_problems(version, device, 0, "int8", te.choose_build_path(version, False))
    if refusal is None:
        assert problems == []
    else:
        assert problems and refusal in " ".join(problems)


def test_dla_refusals_reach_the_build_settings_check():
    assert "FP16 and INT8 only" in " ".join(te.dla_problems("8.6.2", ORIN, 0, "fp32", te.WEAK_TYPED))
    assert te.dla_problems("8.6.2", ORIN, -1, "int8", te.WEAK_TYPED) == ["DLA core -1 does not exist"]
    problems = te.unsupported_settings("11.2.1", te.BuildSpec(dla_core=0), ORIN)
    assert len(problems) == 1 and "11.0 through 11.3" in problems[0]


def test_settings_older_tensorrt_or_the_gpu_cannot_honour():
    spec = te.BuildSpec(version_compatible=True, hardware_compatible=True, builder_opt_level=3)
    assert len(te.unsupported_settings("8.5.2", spec)) == 3
    assert te.unsupported_settings("8.6.1", spec, H100) == []
    assert "outside TensorRT's 0..5" in te.unsupported_settings("10.3.0", te.BuildSpec(builder_opt_level=7))[0]
    assert "integrated" in te.unsupported_settings("10.3.0", te.BuildSpec(hardware_compatible=True), ORIN)[0]
    turing = {"name": "T4", "compute_capability": "7.5", "integrated": False}
    assert "Ampere" in te.unsupported_settings("10.3.0", te.BuildSpec(hardware_compatible=True), turing)[0]
    assert "too old" in te.unsupported_settings("8.4.3", te.BuildSpec())[0]


def _sidecar(trt="10.3.0", cc="8.9", vc=False, hc=False):
    return {"backend": "tensorrt", "precision": "int8", "runtime": {"tensorrt": trt},
            "device": {"name": "L4", "compute_capability": cc},
            "build_settings": {"version_compatible": vc, "hardware_compatible": hc}}


@pytest.mark.parametrize("built,here,vc,ok", [
    ("10.3.0", "10.3.0.30", False, True), ("8.6.2", "10.3.0", False, False), ("10.3.0", "10.8.0", True, True),
    ("10.8.0", "10.3.0", True, False), ("8.5.2", "8.5.2", False, True)])
def test_compat_tensorrt_versions(built, here, vc, ok):
    problems = te.compat_problems(_sidecar(trt=built, vc=vc), {"tensorrt": here, "compute_capability": "8.9"})
    assert (problems == []) == ok
    assert all("rebuild" in p for p in problems)


def test_compat_gpu_architecture():
    here = {"tensorrt": "10.3.0", "gpu": "A100", "compute_capability": "8.0"}
    assert "compute capability 8.9" in te.compat_problems(_sidecar(), here)[0]
    assert te.compat_problems(_sidecar(hc=True), here) == []                          # AMPERE_PLUS
    assert te.compat_problems(_sidecar(hc=True), {**here, "compute_capability": "7.5"})
    assert len(te.compat_problems(_sidecar(trt="8.5.2", cc="7.2"), {"tensorrt": "10.3.0", "compute_capability": "8.7"})) == 2
    assert te.compat_problems({"backend": "openvino"}, here)[0].startswith("this is a 'openvino'")


def test_profile_shapes():
    assert te.profile_shapes([-1, 3, 64, 64], te.BuildSpec(opt_batch=4, max_batch=16)) == {
        "min": [1, 3, 64, 64], "opt": [4, 3, 64, 64], "max": [16, 3, 64, 64]}
    assert te.profile_shapes([2, 3, 8, 8], te.BuildSpec())["opt"] == [2, 3, 8, 8]      # a fixed batch
    for bad in ([-1, 3, -1, 64], [-1, 64, 64]):
        with pytest.raises(te.TrtError, match="fixed C,H,W"):
            te.profile_shapes(bad, te.BuildSpec())
    with pytest.raises(te.TrtError, match="fixed batch of 64"):
        te.profile_shapes([64, 3, 8, 8], te.BuildSpec())


def test_cache_header_names_and_retag():
    cache = b"TRT-8601-EntropyCalibration2\ninput: 3c010204\n/layer1/Relu_output_0: 3d000000\n"
    assert te.parse_cache_header(cache) == ("8601", "EntropyCalibration2")
    assert te.cache_tensor_names(cache) == {"input", "/layer1/Relu_output_0"}
    out = te.retag_cache(cache, "10.3.0")
    assert out.splitlines()[0] == b"TRT-100300-EntropyCalibration2" and out.splitlines()[1:] == cache.splitlines()[1:]
    for bad in (b'{"input": 1.0}\n', b"TRT-8601-LegacyCalibration\ninput: 3c010204\n"):
        with pytest.raises(te.TrtError, match="not a TensorRT calibration cache"):
            te.parse_cache_header(bad)


def test_layer_intent_matching_and_fallback():
    layers = [("conv_a", "CONVOLUTION", "input"), ("relu", "ACTIVATION", "conv_a_out"), ("fc", "MATRIX_MULTIPLY", "view")]
    assert te.intent_from_cache(layers, {"input"}, "fp16") == {"conv_a": "int8", "fc": "fp16"}
    matched, unmatched = te.match_intent(["conv_a", "fc_1", "fc_2", "relu"], {"conv_a": "int8", "fc": "fp32", "gone": "fp32"})
    assert matched == {"conv_a": "int8", "fc_1": "fp32", "fc_2": "fp32"} and unmatched == ["gone"]


def test_board_facts_read_the_device_tree_and_dpkg(tmp_path):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text("Package: libfoo\nVersion: 1.0\n\nPackage: nvidia-jetpack\n"
                                                  "Status: install ok installed\nVersion: 7.2.2-b14\n\n")
    facts = te.board_facts(str(tmp_path))
    assert facts["board"] == "NVIDIA Jetson AGX Orin Developer Kit" and facts["jetpack"] == "7.2.2-b14"
    assert "jetpack" not in te.board_facts(str(tmp_path / "none"))


def test_sidecar_it_writes_is_one_rexport_reads(tmp_path):
    engine, onnx_file = tmp_path / "tensorrt-int8", tmp_path / "model.int8.onnx"
    engine.mkdir()
    (engine / te.PLAN_FILE).write_bytes(b"\x00plan")
    onnx_file.write_bytes(b"onnx")
    result = te.BuildResult(plan=b"\x00plan", version="10.3.0", path=te.STRONGLY_TYPED,
                            io={"inputs": [], "outputs": []}, profile={"input": "input"},
                            record={"precision": "int8", "dla_core": None, "version_compatible": False}, seconds=1.5)
    sc = te.make_sidecar(result, engine, ORIN, source_onnx=onnx_file, source_variant="int8", preprocess={},
                         built_by="test", cuda_graphs=True)
    assert te.SIDECAR_SCHEMA == SIDECAR_SCHEMA and set(REQUIRED_KEYS) <= set(sc)
    (engine / "sidecar.json").write_text(json.dumps(sc))
    back = read_sidecar(engine)
    verify_engine_files(engine, back)
    assert back["load_settings"]["cuda_graphs"] is True
    assert te.compat_problems(back, {"tensorrt": "10.3.0", "compute_capability": "8.7"}) == []


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_imports_with_neither_tensorrt_nor_rexport(tmp_path):
    """As shipped in a bundle: the folder alone, importing only numpy (and nothing heavy at import time)."""
    shutil.copytree(PACKAGE, tmp_path / "trt_engine", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys; sys.path.insert(0, '.'); import trt_engine; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'rexport', 'polygraphy', 'torch', 'onnx')]; "
            "assert not bad, bad; print(trt_engine.choose_build_path('8.6.1', False)); "
            "print(*sorted(m for m in sys.modules if m.startswith('trt_engine.')))")
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path, loaded = out.stdout.splitlines()
    assert path == "weak_typed" and loaded.split() == [f"trt_engine.{m}" for m in MODULES]   # every module, from the copy
    assert len(MODULES) >= 5 and set(te.__all__) <= set(dir(te))


def test_package_imports_nothing_of_rexport_and_tensorrt_only_lazily():
    """Inside the package: relative imports, the standard library and numpy at module level; tensorrt and
    polygraphy only inside functions; never rexport (nor its top-level folders), so a bundle copies it as is."""
    ours = {"rexport", "models", "pipeline", "calibration"}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue                                   # within the package
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in (n.split(".")[0] for n in names):
                assert name not in ours, f"{path.name}:{node.lineno} imports {name}"
                if id(node) in top:
                    assert name in sys.stdlib_module_names or name in ("__future__", "numpy"), \
                        f"{path.name}:{node.lineno} imports {name} at import time"
                else:
                    assert name in sys.stdlib_module_names or name in ("tensorrt", "polygraphy"), (path.name, name)
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 400, f"{path.name} is over 400 lines"


def test_runner_and_build_refuse_in_one_line_without_tensorrt(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(te.TrtError, match="tensorrt cannot be imported") as e:
        te.EngineRunner(b"plan").__enter__()
    assert "\n" not in str(e.value) and "python3-libnvinfer" in e.value.hint
    with pytest.raises(te.TrtError, match="tensorrt cannot be imported"):
        te.build_engine(tmp_path / "model.fp32.onnx", te.BuildSpec(), H100)


def _tensorrt_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [n for n in names if n and n.split(".")[0] == "tensorrt"]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("trt", "tensorrt"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("script", ["build_engine.py", "run_engine.py"])
def test_bundle_scripts_are_entry_points_over_the_shared_module(script):
    tree = ast.parse((TEMPLATES / script).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "trt_engine" in imported
    assert _tensorrt_uses(tree) == []
    uses = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "trt_engine"}
    assert uses <= set(dir(te)), uses - set(dir(te))       # every name it calls exists in the module
    assert len(list((TEMPLATES).glob("*.py"))) == 2         # no third copy hiding there


# -- the cache and layer intent written for a real Q/DQ file ---------------------------------------


def test_cache_for_a_file_leaves_out_what_the_file_does_not_quantize(small_run, tmp_path):
    from rexport.calibration.tensorrt_cache import LAYERS_SUFFIX, read_tensorrt_cache
    from rexport.pipeline.manifest import RunDir
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    run = RunDir(shutil.copytree(small_run.path, tmp_path / "run"))
    g = onnx.load(str(run.file("onnx/model.fp32.onnx"))).graph
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    convs = [n for n in g.node if n.op_type == "Conv"]
    first, classifier = convs[0], next(n for n in g.node if n.op_type == "Gemm")
    alone = next(n for n in convs[1:] if consumers[n.input[0]] == 1)           # its input feeds only it
    feeds_convs = {}
    for n in convs:
        feeds_convs.setdefault(n.input[0], []).append(n)
    shared = next(ns[0] for ns in feeds_convs.values() if len(ns) > 1)         # block conv1 + its downsample
    with run.locked():
        # min-max and 8 proof inputs: which tensors the cache keeps does not depend on how ranges are found
        rec = run_quantize(run, QuantizeSettings(precision="int8", calib_samples=8, calib_method="minmax",
                                                 int8_float_samples=8, skip_first_conv=True,
                                                 skip_classifier=True, exclude=(alone.name, shared.name)),
                           progress=False)
    cache_path = run.file(rec["summary"]["tensorrt_cache"])
    full = read_tensorrt_cache(cache_path.with_name(f"{rec['summary']['calibration']['key']}.tensorrt.cache"))
    cache = read_tensorrt_cache(cache_path)
    gone = {first.input[0], alone.input[0]}      # (the TensorRT form may still quantize the pool output the
    #                                              classifier reads; its Gemm is float by its float weights)
    assert gone <= set(full)                      # calibrated ...
    assert not gone & set(cache)                  # ... but not in the cache written for this file
    assert shared.input[0] in cache               # still quantized for its other consumer
    assert set(cache) < set(full) and rec["summary"]["tensorrt_cache_tensors"]["kept"] == len(cache)
    for name in cache:                            # every scale kept is the calibration's own
        assert cache[name] > 0

    intent = json.loads(Path(str(cache_path) + LAYERS_SUFFIX).read_text())
    floats = {name for name, p in intent["layers"].items() if p != "int8"}
    assert {first.name, alone.name, shared.name, classifier.name} <= floats
    assert set(intent["layers"]) == {n.name for n in g.node if n.op_type in ("Conv", "Gemm")}
    assert len(floats) < len(intent["layers"]) and intent["int8_float"] in te.FLOAT_PARTS
    doc = te.read_layer_intent(cache_path)        # what a weak-typed build pins the float layers by
    matched, unmatched = te.match_intent([n.name for n in g.node], doc["layers"])
    assert unmatched == [] and {k for k, v in matched.items() if v != "int8"} == floats


def test_gpu_check_says_so_in_one_line_on_a_cpu_machine(tmp_path):
    from rexport.pipeline.backends import get_backend

    if get_backend("tensorrt").unavailable_reason() is None:
        pytest.skip("a CUDA device and TensorRT are here: run scripts/gpu_check.sh itself")
    script = PACKAGE.parents[2] / "scripts" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: skipped: ") and len(proc.stdout.splitlines()) == 1
    assert not (tmp_path / "gpu_check.json").exists()
