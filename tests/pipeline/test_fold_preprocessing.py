"""--fold-preprocessing: every variant and engine of the run takes raw uint8 NHWC pixels (BGR here),
with scaling, mean/std and layout inside the graph, ahead of the first Q/DQ in INT8; validated
against the float path (the PyTorch model on the normalised images) on the same decoded images."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.manifest import RunDir


@pytest.fixture(scope="module")
def folded(tmp_path_factory, folded_export):
    """A copy of the session's folded export (made by the export stage from folded_export_settings()),
    its export record, and real images."""
    import shutil

    root = tmp_path_factory.mktemp("fold")
    rng = np.random.default_rng(3)
    for split in ("calib", "images"):
        for c in range(4):  # smooth colour images of several sizes: resize and crop happen outside the graph
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                h, w = 40 + 3 * i, 48 - 2 * c
                base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
                img.save(root / split / f"c{c}" / f"{i}.png")
    images = root / "images"
    exported, rec = folded_export
    run = RunDir(shutil.copytree(exported.path, root / "run"))
    return run, rec, images


def test_the_fp32_file_takes_raw_pixels_and_matches_the_float_path(folded):
    from rexport.pipeline.variants import load_reference
    from rexport.core.preprocess import list_images
    import onnxruntime as ort
    import torch

    run, rec, images = folded
    path = run.file("onnx/model.fp32.onnx")
    m = onnx.load(str(path))
    t = m.graph.input[0].type.tensor_type
    assert t.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value or d.dim_param for d in t.shape.dim][1:] == [32, 32, 3]
    assert rec["summary"]["fold_max_abs_error"] <= 1e-5          # folded graph vs the float graph, same pixels
    spec = PreprocessSpec.from_onnx(path)
    assert spec.raw_pixels and run.manifest["preprocess"]["raw_pixels"] is True
    files = list_images(images)
    pixels = np.stack([spec.load_input(f) for f in files])        # decoded, resized, cropped, BGR: no scaling
    assert pixels.dtype == np.uint8 and pixels.shape == (len(files), 32, 32, 3)
    floats = np.stack([spec.load_image(f) for f in files])         # the float path on the same images
    assert np.array_equal(spec.to_pixels(floats), pixels)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": pixels})[0]
    with torch.inference_mode():
        ref = load_reference(run).model(torch.from_numpy(floats)).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_variants_and_engine_are_built_and_validated_on_raw_pixels(folded):
    from rexport.pipeline.backends import get_backend
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.infer import infer_images
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize
    from rexport.pipeline.validate import ValidateSettings, run_validate

    run, _, images = folded
    with run.locked():
        run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
        run_quantize(run, QuantizeSettings(precision="int8", calib_data=str(images.parent / "calib"),
                                           calib_samples=12), progress=False)
        engines = []
        if not get_backend("openvino").unavailable_reason():
            build_engines(run, backend="openvino", precisions=["fp32"], progress=False)
            engines = ["openvino-fp32"]
        checks = run_validate(run, ValidateSettings(data=str(images), samples=16, per_layer=False),
                              ["fp32", "fp16", "int8", *engines])
    assert {r["variant"]: r["status"] for r in checks} == {v: "ok" for v in ["fp32", "fp16", "int8", *engines]}, \
        [(r["variant"], r.get("reason")) for r in checks]
    for v in ("fp16", "int8"):
        m = onnx.load(str(run.file(f"onnx/model.{v}.onnx")))
        assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    int8 = onnx.load(str(run.file("onnx/model.int8.onnx")))
    ops = [n.op_type for n in int8.graph.node]
    first_q = ops.index("QuantizeLinear")
    assert ops[:first_q] == ["Cast", "Transpose", "Div", "Sub", "Div"]   # the preprocessing, ahead of any Q/DQ
    if engines:  # infer feeds the engine the raw pixels, and it agrees with the FP32 ONNX
        files = [str(p) for p in sorted(images.rglob("*.png"))[:3]]
        eng = infer_images(run.path / "engines" / engines[0], files, topk=1)
        ref = infer_images(run.file("onnx/model.fp32.onnx"), files, topk=1)
        assert [r["top"][0]["class"] for r in eng] == [r["top"][0]["class"] for r in ref]
        sidecar = json.loads((run.path / "engines" / engines[0] / "sidecar.json").read_text())
        assert sidecar["preprocess"]["raw_pixels"] is True


def test_bundle_runner_reads_raw_pixels_for_a_folded_model(folded):
    import importlib.util

    from rexport.pipeline import templates  # noqa: F401  (the standalone runner shipped in a bundle)

    run, _, images = folded
    path = next(p for p in __import__("pathlib").Path(templates.__path__[0]).glob("run_engine.py"))
    mod_spec = importlib.util.spec_from_file_location("run_engine_under_test", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    spec = PreprocessSpec.from_onnx(run.file("onnx/model.fp32.onnx"))
    f = sorted(images.rglob("*.png"))[0]
    assert np.array_equal(mod.load_image(str(f), spec.to_dict()), spec.load_input(f))
