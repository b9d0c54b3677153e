"""The deployment bundle, from a real tiny run (ResNet-18, 3 classes, 64x64): its contents and
hashes, atomic writing, and its standalone run_engine.py run in a clean interpreter that cannot
import rexport or torch, checked against ONNX Runtime / OpenVINO through rexport."""
from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.backends.sidecar import load_engine, read_sidecar, verify_engine_files
from rexport.pipeline.bundle import TEMPLATES, make_bundle
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.runners import OnnxRuntimeRunner

SPEC = PreprocessSpec(input_size=64, resize=73, labels=("cat", "dog", "fish"))

# Runs a script with rexport, torch and polygraphy made unimportable, and fails if any got loaded.
CLEAN_RUNNER = r'''
import importlib.abc, runpy, sys
class NoRexport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("rexport", "torch", "polygraphy"):
            raise ImportError(f"{name} is not available to a bundle")
sys.meta_path.insert(0, NoRexport())
script, *args = sys.argv[1:]
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("rexport", "torch", "polygraphy"))
assert not leaked, leaked
sys.exit(code)
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """A run with fp32/fp16/int8 ONNX, the TensorRT calibration cache and an OpenVINO fp32 engine."""
    import onnx
    import torch

    from rexport.models.resnet import resnet18
    from rexport.pipeline.backends import BuildSettings
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    run = RunDir(tmp_path_factory.mktemp("bundle") / "run")
    fp32 = run.file(VARIANT_FILES["fp32"])
    fp32.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = resnet18(num_classes=3).eval()
    with torch.no_grad():   # spread the logits apart so top-1 is not a coin toss between runtimes
        model.fc.weight.mul_(20.0)
    torch.onnx.export(model, torch.randn(1, 3, 64, 64), str(fp32), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    m = onnx.load(str(fp32))
    m.metadata_props.add(key="rexport.preprocess", value=SPEC.to_json())
    onnx.save(m, str(fp32))
    run.run_stage("export", inputs={}, settings={"model": "resnet18", "num_classes": 3},
                  action=lambda: StageOutcome(outputs=[VARIANT_FILES["fp32"]]))
    run_quantize(run, QuantizeSettings(precision="int8", calib_samples=16, calib_batch_size=8), progress=False)
    run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
    build_engines(run, backend="openvino", precisions=["fp32"], settings=BuildSettings(opt_batch=1, max_batch=4),
                  progress=False)
    return run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """One image per awkward mode, in several aspect ratios."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)
    out = {
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(rng.integers(0, 256, (90, 70, 4), dtype=np.uint8)),
        "grey16.png": Image.fromarray(rng.integers(0, 65536, (120, 50), dtype=np.uint16)),
        "palette.png": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "grey.png": Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)),
    }
    paths = []
    for name, img in out.items():
        img.save(d / name)
        paths.append(d / name)
    with Image.open(d / "grey16.png") as im:
        assert im.mode.startswith("I"), im.mode     # really a 16-bit file
    return paths


def _hashes_match(root: Path) -> dict:
    manifest = json.loads((root / "bundle.json").read_text())
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"bundle.json"}
    assert set(manifest["files"]) == on_disk
    for rel, sha in manifest["files"].items():
        assert sha256_file(root / rel) == sha, rel
    return manifest


def test_default_bundle_contents(run, tmp_path):
    dest = make_bundle(run, dest=tmp_path / "bundle")
    manifest = _hashes_match(dest)
    assert list(manifest["variants"]) == ["fp32", "int8", "openvino-fp32"]     # fp16 only on request
    assert (dest / "models/model.fp32.onnx").read_bytes() == run.file(VARIANT_FILES["fp32"]).read_bytes()
    assert (dest / "models/model.int8.onnx").is_file() and not (dest / "models/model.fp16.onnx").exists()
    assert (dest / "labels.txt").read_text() == "cat\ndog\nfish\n"
    assert json.loads((dest / "preprocess.json").read_text()) == SPEC.to_dict()
    assert (dest / "run_engine.py").read_bytes() == (TEMPLATES / "run_engine.py").read_bytes()
    package = TEMPLATES.parent / "backends/trt_engine"          # shipped verbatim, without __pycache__
    shipped = {p.relative_to(dest / "trt_engine").as_posix(): p.read_bytes() for p in (dest / "trt_engine").rglob("*")}
    assert shipped == {p.name: p.read_bytes() for p in package.glob("*.py")} and "__init__.py" in shipped
    assert not (dest / "build_engine.py").exists() and not (dest / "calibration").exists()
    engine = dest / "engines/openvino-fp32"
    verify_engine_files(engine, read_sidecar(engine))
    readme = (dest / "README.txt").read_text()
    for rel in ("models/model.fp32.onnx", "models/model.int8.onnx", "engines/openvino-fp32"):
        assert f"run_engine.py {rel}" in readme


def test_explicit_variants_and_default_destination(run):
    dest = make_bundle(run, variants=["int8"])
    assert dest == run.path / "bundle"
    manifest = _hashes_match(dest)
    assert list(manifest["variants"]) == ["int8"]
    assert sorted(p.name for p in (dest / "models").iterdir()) == ["model.int8.onnx"]


def test_unknown_variant_writes_nothing(run, tmp_path):
    dest = make_bundle(run, variants=["fp32"], dest=tmp_path / "b")
    before = (dest / "bundle.json").read_bytes()
    with pytest.raises(InputError) as e:
        make_bundle(run, variants=["fp32", "tensorrt-int8"], dest=tmp_path / "b")
    assert "tensorrt-int8" in e.value.message and "openvino-fp32" in (e.value.hint or "")
    assert (dest / "bundle.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]      # no temp folders left behind
    with pytest.raises(InputError, match="export"):
        make_bundle(RunDir(tmp_path / "empty"))


def test_archive(run, tmp_path):
    dest = make_bundle(run, variants=["int8", "openvino-fp32"], dest=tmp_path / "deploy.tar.gz", archive=True)
    assert dest == tmp_path / "deploy.tar.gz" and dest.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.tar.gz"]
    with tarfile.open(dest) as tar:
        names = tar.getnames()
        assert all(n == "deploy" or n.startswith("deploy/") for n in names)
        # extractall(filter=...) arrived in Python 3.11.4; Debian 12's python3 is 3.11.2: check by hand
        assert all(m.isfile() or m.isdir() for m in tar.getmembers()), "a bundle holds only files and folders"
        assert not any(Path(n).is_absolute() or ".." in Path(n).parts for n in names)
        tar.extractall(tmp_path / "x")
    manifest = _hashes_match(tmp_path / "x/deploy")
    assert list(manifest["variants"]) == ["int8", "openvino-fp32"]
    default = make_bundle(run, variants=["int8"], archive=True)
    assert default == run.path / "bundle.tar.gz" and tarfile.is_tarfile(default)


def test_build_on_device_bundle(run, tmp_path):
    dest = make_bundle(run, variants=["int8"], dest=tmp_path / "b", build_on_device=True)
    manifest = _hashes_match(dest)
    assert list(manifest["variants"]) == ["int8", "fp32", "fp16"]   # every ONNX: TensorRT 8.x needs fp32
    assert (dest / "build_engine.py").read_bytes() == (TEMPLATES / "build_engine.py").read_bytes()
    cache = run.stage("quantize:int8")["summary"]["tensorrt_cache"]
    assert manifest["calibration_cache"] == f"calibration/{Path(cache).name}"
    assert (dest / manifest["calibration_cache"]).read_bytes() == run.file(cache).read_bytes()
    assert "build_engine.py --precision int8" in (dest / "README.txt").read_text()
    # the file's per-layer intent travels with its cache (weak-typed builds pin the float layers by it)
    intent = json.loads((dest / (manifest["calibration_cache"] + ".layers.json")).read_text())
    assert intent["file"] == "model.int8.onnx" and set(intent["layers"].values()) <= {"int8", "fp16", "fp32"}
    # the on-device builder finds the bundled cache by itself
    tpl = runpy.run_path(str(dest / "build_engine.py"), run_name="build_engine_in_bundle")
    assert tpl["find_calibration_cache"](None) == dest / manifest["calibration_cache"]
    # ... and runs on the bundle's own trt_engine/, without rexport: here it stops at the missing TensorRT
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-I", "-c", CLEAN_RUNNER, "build_engine.py", "--precision", "int8"],
                          cwd=dest, env=env, capture_output=True, text=True, timeout=120)
    if importlib.util.find_spec("tensorrt") is None:
        assert proc.returncode == 2 and "tensorrt cannot be imported" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_template_preprocessing_is_rexports(images):
    """run_engine.py's copy of the preprocessing gives bit-identical arrays for every image mode."""
    tpl = runpy.run_path(str(TEMPLATES / "run_engine.py"), run_name="run_engine_template")
    spec = SPEC.to_dict()
    for path in images:
        np.testing.assert_array_equal(tpl["load_image"](str(path), spec), SPEC.load_image(path), err_msg=path.name)
    bgr = PreprocessSpec(input_size=32, resize=40, channel_order="BGR", interpolation="bicubic")
    np.testing.assert_array_equal(tpl["load_image"](str(images[0]), bgr.to_dict()), bgr.load_image(images[0]))


def _run_clean(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run([sys.executable, "-I", "-c", CLEAN_RUNNER, "run_engine.py", *args], cwd=bundle, env=env,
                          capture_output=True, text=True, timeout=120)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()


def test_bundle_runner_in_a_clean_interpreter(run, images, tmp_path):
    bundle = make_bundle(run, dest=tmp_path / "bundle")
    x = np.stack([SPEC.load_image(p) for p in images])
    with OnnxRuntimeRunner(run.file(VARIANT_FILES["fp32"])) as fp32, \
            OnnxRuntimeRunner(run.file(VARIANT_FILES["int8"])) as int8, \
            load_engine(run.path / "engines/openvino-fp32") as ov:
        expected = {"models/model.fp32.onnx": fp32.infer(x), "models/model.int8.onnx": int8.infer(x),
                    "engines/openvino-fp32": ov.infer(x)}

    for model, logits in expected.items():
        proc = _run_clean(bundle, model, *map(str, images), "--topk", "3", "--json")
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout)["results"]
        assert [r["image"] for r in results] == list(map(str, images))
        for r, ref in zip(results, logits):
            probs = _softmax(ref)
            assert r["top"][0]["index"] == int(np.argmax(ref)), (model, r["image"])
            assert [t["label"] for t in r["top"]] == [SPEC.labels[i] for i in np.argsort(-probs, kind="stable")]
            np.testing.assert_allclose([t["probability"] for t in r["top"]], np.sort(probs)[::-1], atol=1e-5)

    # human output, and a bad image: the others still print, exit code 2
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    proc = _run_clean(bundle, "models/model.fp32.onnx", str(images[0]), str(bad), "--topk", "2")
    assert proc.returncode == 2
    assert "cannot read image" in proc.stderr and str(bad) in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(images[0]) and lines[1].strip().startswith("1. ") and len(lines) == 3
    proc = _run_clean(bundle, "engines/tensorrt-fp16", str(images[0]))
    assert proc.returncode == 2 and "not found" in proc.stderr
