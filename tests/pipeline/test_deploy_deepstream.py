"""DeepStream layout from a real run whose std is uniform (ResNet-18, 32 px, export + int8): the nvinfer
config parses as an ini, uses only NVIDIA's documented keys, names files that exist, and its
net-scale-factor/offsets reproduce our preprocessing on real images within FP32 rounding; the
deepstream-app config references it; the CLI drives bundle and infer end to end."""
from __future__ import annotations

import configparser
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from deploy_run import LABELS, digit_images, make_run
from PIL import Image

from conftest import rexport_cli
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.bundle import make_bundle
from rexport.pipeline.infer import infer_images
from rexport.pipeline.manifest import VARIANT_FILES
from rexport.pipeline.runners import OnnxRuntimeRunner

# Gst-nvinfer [property] keys, from NVIDIA's DeepStream documentation (Gst-nvinfer "Configuration file
# properties" table, DS 6.x-8.x) and gstnvinfer_property_parser.h.
DOCUMENTED_KEYS = {
    "num-detected-classes", "net-scale-factor", "model-file", "proto-file", "int8-calib-file", "batch-size",
    "model-engine-file", "uff-file", "onnx-file", "enable-dbscan", "labelfile-path", "mean-file", "gie-unique-id",
    "operate-on-gie-id", "operate-on-class-ids", "interval", "input-object-min-width", "input-object-min-height",
    "input-object-max-width", "input-object-max-height", "uff-input-order", "network-mode", "offsets",
    "output-blob-names", "parse-bbox-func-name", "custom-lib-path", "model-color-format", "classifier-async-mode",
    "process-mode", "classifier-threshold", "uff-input-blob-name", "secondary-reinfer-interval",
    "output-tensor-meta", "output-instance-mask", "enable-dla", "use-dla-core", "network-type",
    "maintain-aspect-ratio", "symmetric-padding", "parse-classifier-func-name", "custom-network-config",
    "tlt-encoded-model", "tlt-model-key", "segmentation-threshold", "segmentation-output-order", "workspace-size",
    "force-implicit-batch-dim", "infer-dims", "engine-create-func-name", "cluster-mode", "filter-out-class-ids",
    "scaling-filter", "scaling-compute-hw", "output-io-formats", "layer-device-precision", "network-input-order",
    "classifier-type", "crop-objects-to-roi-boundary", "gpu-id", "is-classifier", "disable-output-host-copy",
}
# deepstream-app groups and the keys we use in them (DeepStream reference application configuration).
APP_KEYS = {
    "application": {"enable-perf-measurement", "perf-measurement-interval-sec"},
    "source0": {"enable", "type", "uri", "num-sources", "gpu-id"},
    "streammux": {"gpu-id", "batch-size", "batched-push-timeout", "width", "height", "live-source"},
    "primary-gie": {"enable", "gpu-id", "batch-size", "gie-unique-id", "config-file"},
    "sink0": {"enable", "type", "sync"},
    "osd": {"enable"},
    "tests": {"file-loop"},
}
UNIFORM = dict(mean=(0.5, 0.4, 0.3), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("ds") / "run", engines=False, bench=False, **UNIFORM)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return digit_images(tmp_path_factory.mktemp("digits"), count=6)


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory):
    return make_bundle(run, dest=tmp_path_factory.mktemp("b") / "deepstream", format="deepstream")


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    assert parser.read(path) == [str(path)]
    return parser


def test_nvinfer_configs(run, bundle):
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["format"] == "deepstream" and list(manifest["variants"]) == ["fp32", "int8"]
    assert manifest["warnings"] == []                       # uniform std: exact, nothing to warn about
    graph = onnx.load(str(run.file(VARIANT_FILES["fp32"]))).graph
    in_dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:]
    for variant, mode in (("fp32", "0"), ("int8", "1")):
        folder = bundle / f"resnet18_{variant}"
        configs = [folder / "config_infer_primary.txt"] + ([folder / "config_infer_primary_legacy.txt"]
                                                           if variant == "int8" else [])
        for path in configs:
            keys = _ini(path)["property"]
            assert set(keys) <= DOCUMENTED_KEYS, set(keys) - DOCUMENTED_KEYS
            assert keys["network-type"] == "1" and keys["process-mode"] == "1" and keys["network-mode"] == mode
            assert keys["infer-dims"] == ";".join(map(str, in_dims))
            assert keys["output-blob-names"] == graph.output[0].name
            assert keys["model-color-format"] == "0" and keys["batch-size"] == "1"
            assert (folder / keys["onnx-file"]).is_file()
            assert (folder / keys["labelfile-path"]).read_text().strip() == ";".join(LABELS)
        served = folder / _ini(configs[0])["property"]["onnx-file"]
        assert served.read_bytes() == run.file(VARIANT_FILES[variant]).read_bytes()
        app = _ini(folder / "deepstream_app_config.txt")
        assert {s: set(app[s]) for s in app.sections()} == APP_KEYS
        assert (folder / app["primary-gie"]["config-file"]).is_file() and app["source0"]["type"] == "3"
    legacy = _ini(bundle / "resnet18_int8/config_infer_primary_legacy.txt")["property"]
    cache = run.file(run.stage("quantize:int8")["summary"]["tensorrt_cache"])
    assert (bundle / "resnet18_int8" / legacy["int8-calib-file"]).read_bytes() == cache.read_bytes()
    assert (bundle / "resnet18_int8" / legacy["onnx-file"]).read_bytes() == \
        run.file(VARIANT_FILES["fp32"]).read_bytes()
    assert "deepstream-app -c deepstream_app_config.txt" in (bundle / "README.txt").read_text()


def test_scale_and_offsets_reproduce_our_preprocessing(run, bundle, images):
    """y = net-scale-factor * (x - offsets[c]) on the 0..255 pixels equals (x/255 - mean)/std within FP32 rounding."""
    keys = _ini(bundle / "resnet18_fp32/config_infer_primary.txt")["property"]
    scale = np.float32(float(keys["net-scale-factor"]))
    offsets = np.array([float(v) for v in keys["offsets"].split(";")], np.float32)
    spec = PreprocessSpec.from_onnx(run.file(VARIANT_FILES["fp32"]))
    assert spec.std == UNIFORM["std"]
    for p in images:
        with Image.open(p) as img:
            ours = spec.preprocess(img)
            nvinfer = (scale * (spec.crop(img).astype(np.float32) - offsets)).transpose(2, 0, 1)
        bound = 4 * np.finfo(np.float32).eps * max(1.0, float(np.abs(ours).max()))
        np.testing.assert_allclose(nvinfer, ours, rtol=0, atol=bound)


def test_infer_loads_what_nvinfer_would(run, bundle, images):
    """The smoke test runs the file the config names with nvinfer's preprocessing (the whole frame scaled
    to the input size, then the scale and offsets), here computed independently from the config."""
    keys = _ini(bundle / "resnet18_int8/config_infer_primary.txt")["property"]
    scale = np.float32(float(keys["net-scale-factor"]))
    offsets = np.array([float(v) for v in keys["offsets"].split(";")], np.float32)
    x = []
    for p in images:
        with Image.open(p) as img:
            frame = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32)
        x.append((scale * (frame - offsets)).transpose(2, 0, 1))
    with OnnxRuntimeRunner(run.file(VARIANT_FILES["int8"])) as r:
        logits = r.infer(np.stack(x).astype(np.float32))
    results = infer_images(bundle, [str(p) for p in images], topk=3, model="resnet18_int8")
    for res, ref in zip(results, logits):
        probs = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
        got = {t["class"]: t["probability"] for t in res["top"]}
        np.testing.assert_allclose([got[i] for i in range(3)], probs, atol=1e-5)
        assert "nvinfer" in res["served"] and res["model"] == "resnet18_int8"


def test_cli(run, images, tmp_path):
    pytest.importorskip("tritonclient")     # infer reads the Triton config with Triton's schema
    dest = tmp_path / "triton"
    proc = rexport_cli("--json", "bundle", "--out", run.path, "--format", "triton", "--variants", "fp32,int8",
                       "--dest", dest, "--queue-delay-us", "250")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"bundle": str(dest), "format": "triton"}
    assert "max_queue_delay_microseconds: 250" in (dest / "model_repository/resnet18_int8/config.pbtxt").read_text()
    proc = rexport_cli("--json", "infer", dest, images[0], "--model", "resnet18_int8")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out[0]["model"] == "resnet18_int8" and out[0]["top"][0]["label"] in LABELS
    # refusals: one line, exit 2, nothing written
    proc = rexport_cli("bundle", "--out", run.path, "--format", "ovms", "--variants", "tensorrt-fp16",
                       "--dest", tmp_path / "no")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "tensorrt-fp16" in proc.stderr and not (tmp_path / "no").exists()


def test_infer_on_a_folder_bundle(run, images, tmp_path):
    """The folder layout (our run_engine.py's) is a bundle folder too: infer opens the model bundle.json names."""
    dest = make_bundle(run, variants=["int8"], dest=tmp_path / "f")
    spec = PreprocessSpec.from_onnx(run.file(VARIANT_FILES["fp32"]))
    with OnnxRuntimeRunner(run.file(VARIANT_FILES["int8"])) as r:
        ref = r.infer(spec.load_image(images[0])[None])[0]
    res = infer_images(dest, [str(images[0])], topk=3, model="int8")[0]
    probs = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
    np.testing.assert_allclose([{t["class"]: t["probability"] for t in res["top"]}[i] for i in range(3)], probs,
                               atol=1e-6)
    assert res["served"].startswith("run_engine.py layout")


def test_folded_preprocessing_layouts(images, tmp_path, folded_export):
    """An export with --fold-preprocessing takes raw uint8 NHWC pixels: Triton declares exactly that (read
    from the file), nvinfer gets scale 1 / offsets 0 / NHWC, and the served model classifies as the ONNX does."""
    pytest.importorskip("tritonclient")
    from deploy_run import triton_schema
    from google.protobuf import text_format

    import shutil

    from rexport.pipeline.manifest import RunDir

    run = RunDir(shutil.copytree(folded_export[0].path, tmp_path / "fold"))  # the session's real folded export
    triton = make_bundle(run, variants=["fp32"], dest=tmp_path / "t", format="triton")
    cfg = text_format.Parse((triton / "model_repository/resnet18_fp32/config.pbtxt").read_text(),
                            triton_schema().ModelConfig())
    assert [(triton_schema().DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
        [("TYPE_UINT8", [32, 32, 3])]
    with pytest.warns(UserWarning, match="uint8"):
        ds = make_bundle(run, variants=["fp32"], dest=tmp_path / "d", format="deepstream")
    keys = _ini(ds / "resnet18_fp32/config_infer_primary.txt")["property"]
    assert (keys["net-scale-factor"], keys["offsets"], keys["network-input-order"], keys["infer-dims"]) == \
        ("1.0", "0.0;0.0;0.0", "1", "3;32;32")
    direct = infer_images(run.file(VARIANT_FILES["fp32"]), [str(images[0])], topk=3)[0]["top"]
    served = infer_images(triton, [str(images[0])], topk=3)[0]["top"]
    assert [t["class"] for t in served] == [t["class"] for t in direct]
    np.testing.assert_allclose([t["probability"] for t in served], [t["probability"] for t in direct], atol=1e-6)
