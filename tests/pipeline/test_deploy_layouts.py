"""Triton and OVMS layouts from a real run (ResNet-18, 32 px: export, int8, OpenVINO engines, bench),
checked against each server's own schema and loaded back from the paths the configs name; the
refusals; and DeepStream's single-scale preprocessing error, measured on real images."""
from __future__ import annotations

import configparser
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from deploy_run import LABELS, digit_images, make_run, triton_schema

from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file
from rexport.pipeline.backends.sidecar import load_engine, read_sidecar
from rexport.pipeline.bundle import make_bundle
from rexport.pipeline.deploy.common import DeployModel, LayoutContext, Tensor, batching_for, sidecar_io
from rexport.pipeline.deploy.triton import config_text
from rexport.pipeline.infer import infer_images
from rexport.pipeline.manifest import VARIANT_FILES
from rexport.pipeline.runners import OnnxRuntimeRunner

pytest.importorskip("tritonclient")
from google.protobuf import text_format  # noqa: E402

DTYPES = {"float32": "TYPE_FP32", "uint8": "TYPE_UINT8"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("deploy") / "run")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return digit_images(tmp_path_factory.mktemp("digits"))


def _onnx_io(path: Path) -> tuple[list, list]:
    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer}

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]

    return [(v.name, dims(v)) for v in g.input if v.name not in inits], [(v.name, dims(v)) for v in g.output]


def _hashes_match(root: Path) -> dict:
    manifest = json.loads((root / "bundle.json").read_text())
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"bundle.json"}
    assert set(manifest["files"]) == on_disk
    assert all(sha256_file(root / rel) == sha for rel, sha in manifest["files"].items())
    return manifest


def test_triton_repository(run, images, tmp_path):
    """`bundle --format triton --variants fp32,int8,openvino-int8`: every config parses with Triton's schema
    and agrees with the file it serves: names, dims without the batch, dtypes, max batch."""
    schema = triton_schema()
    dest = make_bundle(run, variants=["fp32", "int8", "openvino-int8"], dest=tmp_path / "t", format="triton")
    manifest = _hashes_match(dest)
    assert manifest["format"] == "triton" and list(manifest["variants"]) == ["fp32", "int8", "openvino-int8"]
    repo = dest / "model_repository"
    assert sorted(p.name for p in repo.iterdir()) == ["resnet18_fp32", "resnet18_int8", "resnet18_openvino-int8"]
    for name in ("resnet18_fp32", "resnet18_int8"):
        cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), schema.ModelConfig())
        variant = name.split("_", 1)[1]
        served = repo / name / "1" / "model.onnx"
        assert served.read_bytes() == run.file(VARIANT_FILES[variant]).read_bytes()
        (iname, ishape), = _onnx_io(served)[0]
        (oname, oshape), = _onnx_io(served)[1]
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and not cfg.backend
        assert [(i.name, list(i.dims), schema.DataType.Name(i.data_type)) for i in cfg.input] == \
            [(iname, ishape[1:], "TYPE_FP32")]
        assert [(o.name, list(o.dims), o.label_filename) for o in cfg.output] == [(oname, oshape[1:], "labels.txt")]
        assert cfg.instance_group[0].kind == schema.ModelInstanceGroup.KIND_CPU
    fp32 = text_format.Parse((repo / "resnet18_fp32/config.pbtxt").read_text(), schema.ModelConfig())
    # the bench timed fp32 at 1 and 4: that is the batch the server may form
    assert fp32.max_batch_size == 4 and list(fp32.dynamic_batching.preferred_batch_size) == [4]
    assert fp32.dynamic_batching.max_queue_delay_microseconds == 100
    assert (repo / "resnet18_fp32/labels.txt").read_text().splitlines() == list(LABELS)

    import openvino as ov

    ov_cfg = text_format.Parse((repo / "resnet18_openvino-int8/config.pbtxt").read_text(), schema.ModelConfig())
    model = ov.Core().read_model(str(repo / "resnet18_openvino-int8/1/model.xml"))
    assert ov_cfg.backend == "openvino" and not ov_cfg.platform
    assert [(i.name, list(i.dims)) for i in ov_cfg.input] == \
        [(p.get_any_name(), [d.get_length() for d in list(p.get_partial_shape())[1:]]) for p in model.inputs]
    assert [o.name for o in ov_cfg.output] == [p.get_any_name() for p in model.outputs]
    assert [schema.DataType.Name(i.data_type) for i in ov_cfg.input] == \
        [DTYPES[str(np.dtype(p.get_element_type().to_dtype()))] for p in model.inputs]
    assert ov_cfg.max_batch_size == 8      # dynamic batch, not benched: the documented default
    sidecar = read_sidecar(run.path / "engines/openvino-int8")
    assert {p: ov_cfg.parameters[p].string_value for p in ov_cfg.parameters} == \
        {"PERFORMANCE_HINT": sidecar["load_settings"]["PERFORMANCE_HINT"]}
    assert json.loads((repo / "resnet18_openvino-int8/1/sidecar.json").read_text()) == sidecar
    readme = (dest / "README.txt").read_text()
    assert "tritonserver --model-repository=/models" in readme and "cannot force f32" in readme
    assert manifest["warnings"] and "bf16" in manifest["warnings"][0]

    # the smoke test loads each model from the files its config names, as Triton would
    with OnnxRuntimeRunner(run.file(VARIANT_FILES["int8"])) as ref_int8, load_engine(run.path / "engines/openvino-int8") as ref_ov:
        x = np.stack([run_spec(run).load_image(p) for p in images[:3]])
        expected = {"resnet18_int8": ref_int8.infer(x), "resnet18_openvino-int8": ref_ov.infer(x)}
    for name, logits in expected.items():
        results = infer_images(dest, [str(p) for p in images[:3]], topk=3, model=name)
        assert results[0]["model"] == name and "Triton" in results[0]["served"]
        for r, ref in zip(results, logits):
            p = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
            got = {t["class"]: t["probability"] for t in r["top"]}
            np.testing.assert_allclose([got[i] for i in range(3)], p, atol=1e-5)
            assert [t["label"] for t in r["top"]] == [LABELS[t["class"]] for t in r["top"]]
    # a config that no longer matches its model is refused, as Triton refuses it at load
    config = repo / "resnet18_int8/config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 3, 32, 32 ]", "dims: [ 3, 16, 16 ]"))
    with pytest.raises(InputError, match="dims"):
        infer_images(dest, [str(images[0])], model="resnet18_int8")


def run_spec(run):
    from rexport.core.preprocess import PreprocessSpec

    return PreprocessSpec.from_onnx(run.file(VARIANT_FILES["fp32"]))


def test_triton_config_for_a_plan(run):
    """No TensorRT plan can be built on this CPU machine: the plan's config is checked from a sidecar shaped
    as the TensorRT backend writes it (I/O from the source ONNX, the build's profile) against that ONNX."""
    schema = triton_schema()
    src = run.file(VARIANT_FILES["int8"])
    (iname, ishape), = _onnx_io(src)[0]
    (oname, oshape), = _onnx_io(src)[1]
    # the build's profile for --min-batch 1 --opt-batch 4 --max-batch 16, as trt_engine records it
    shapes = {k: [b, *ishape[1:]] for k, b in (("min", 1), ("opt", 4), ("max", 16))}
    sidecar = {"runtime": {"tensorrt": "10.13.0"}, "profile": {"input": iname, **shapes},
               "io": {"inputs": [{"name": iname, "shape": [-1, *ishape[1:]], "dtype": "float32"}],
                      "outputs": [{"name": oname, "shape": [-1, *oshape[1:]], "dtype": "float32"}]}}
    inputs, outputs = sidecar_io(sidecar)
    m = DeployModel("tensorrt-int8", "tensorrt", "int8", {}, inputs, outputs,
                    batching_for(run, "tensorrt-int8", inputs, sidecar["profile"]), sidecar=sidecar)
    ctx = LayoutContext(run=run, name="resnet18", spec=run_spec(run), labels=LABELS, folded=False, queue_delay_us=50)
    cfg = text_format.Parse(config_text(m, ctx), schema.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and cfg.name == "resnet18_tensorrt-int8"
    assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [4]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 50
    assert cfg.instance_group[0].kind == schema.ModelInstanceGroup.KIND_GPU
    assert [(i.name, list(i.dims), schema.DataType.Name(i.data_type)) for i in cfg.input] == \
        [(iname, ishape[1:], "TYPE_FP32")]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [(oname, oshape[1:])]
    # a model exported with a fixed batch: Triton must not batch it (max_batch_size 0, dims with the batch)
    fixed = [Tensor(iname, (1, *ishape[1:]), "float32")]
    m = DeployModel("fp32", "onnx", "fp32", {}, fixed, outputs, batching_for(run, "fp32", fixed, None))
    cfg = text_format.Parse(config_text(m, ctx), schema.ModelConfig())
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, *ishape[1:]]
    assert not cfg.HasField("dynamic_batching")


def test_ovms_layout_loads_from_the_paths_config_json_names(run, images, tmp_path):
    import openvino as ov

    dest = make_bundle(run, variants=["fp32", "int8", "openvino-int8"], dest=tmp_path / "o", format="ovms")
    _hashes_match(dest)
    config = json.loads((dest / "config.json").read_text())
    entries = [e["config"] for e in config["model_config_list"]]
    assert [e["name"] for e in entries] == ["resnet18_fp32", "resnet18_int8", "resnet18_openvino-int8"]
    sidecar = read_sidecar(run.path / "engines/openvino-int8")
    for e in entries:
        assert set(e) == {"name", "base_path", "target_device", "plugin_config"} and e["target_device"] == "CPU"
        assert e["plugin_config"]["INFERENCE_PRECISION_HINT"] == "f32"      # never a silent bf16
        base = dest / e["base_path"]                                          # relative to config.json
        versions = sorted(int(d.name) for d in base.iterdir() if d.is_dir())
        assert versions == [1]
        model_file = next(f for f in (base / "1" / "model.xml", base / "1" / "model.onnx") if f.is_file())
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(model_file)), "CPU", e["plugin_config"])
        assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
        assert [p.get_any_name() for p in compiled.inputs] == [t["name"] for t in sidecar["io"]["inputs"]]
    assert entries[2]["plugin_config"] == sidecar["load_settings"]
    assert (dest / "resnet18_openvino-int8/1/model.bin").read_bytes() == \
        (run.path / "engines/openvino-int8/model.bin").read_bytes()
    assert "--config_path /models/config.json" in (dest / "README.txt").read_text()

    with load_engine(run.path / "engines/openvino-int8") as ref:
        logits = ref.infer(np.stack([run_spec(run).load_image(p) for p in images[:2]]))
    results = infer_images(dest, [str(p) for p in images[:2]], model="resnet18_openvino-int8")
    for r, ref in zip(results, logits):
        assert r["top"][0]["class"] == int(np.argmax(ref)) and "plugin_config" in r["served"]


def test_refusals_write_nothing(run, tmp_path):
    with pytest.raises(InputError) as e:
        make_bundle(run, variants=["fp32", "openvino-int8"], dest=tmp_path / "d", format="deepstream")
    assert "openvino-int8" in e.value.message and "nvinfer" in e.value.message and "fp32" in e.value.hint
    with pytest.raises(InputError, match="tensorrt-int8"):
        make_bundle(run, variants=["tensorrt-int8"], dest=tmp_path / "d", format="ovms")
    with pytest.raises(InputError, match="unknown bundle format"):
        make_bundle(run, dest=tmp_path / "d", format="kserve")
    with pytest.raises(InputError, match="build-on-device"):
        make_bundle(run, dest=tmp_path / "d", format="triton", build_on_device=True)
    with pytest.raises(InputError, match="no images"):
        make_bundle(run, dest=tmp_path / "d", format="deepstream", check_images=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_deepstream_single_scale_error_is_measured(run, images, tmp_path):
    """ImageNet std differs per channel: the config's one scale is off, and the warning says by how much,
    measured on real images; the test recomputes it from the written config as nvinfer would apply it."""
    with pytest.warns(UserWarning, match="differs per channel"):
        dest = make_bundle(run, dest=tmp_path / "ds", format="deepstream", check_images=str(images[0].parent))
    manifest = _hashes_match(dest)
    assert list(manifest["variants"]) == ["fp32", "int8"]          # the defaults deepstream can hold
    err = manifest["variants"]["fp32"]["preprocessing_error"]
    assert err["images"] == len(images) and err["source"].startswith("images from")
    keys = configparser.ConfigParser()
    keys.read(dest / "resnet18_fp32/config_infer_primary.txt")
    scale = float(keys["property"]["net-scale-factor"])
    offsets = np.array([float(v) for v in keys["property"]["offsets"].split(";")], np.float32)
    spec = run_spec(run)
    from PIL import Image

    exact, approx = [], []
    for p in images:
        with Image.open(p) as img:
            exact.append(spec.preprocess(img))
            approx.append((np.float32(scale) * (spec.crop(img).astype(np.float32) - offsets)).transpose(2, 0, 1))
    with OnnxRuntimeRunner(dest / "resnet18_fp32/model.onnx") as r:
        diff = np.abs(r.infer(np.stack(exact)) - r.infer(np.stack(approx)))
    assert err["max_abs_logit_error"] == pytest.approx(float(diff.max()), rel=1e-5)
    assert err["max_abs_logit_error"] > 0
    assert f"{err['max_abs_logit_error']:.3g}" in (dest / "README.txt").read_text()


@pytest.mark.gpu
def test_tensorrt_plan_in_triton_and_deepstream(run, images, tmp_path):
    """With TensorRT and a GPU: a real plan, its Triton config checked against its sidecar, and both layouts
    loaded back by the smoke test and compared with the engine loaded from the run (runs last: adds an engine)."""
    from rexport.pipeline.backends import BuildSettings, get_backend
    from rexport.pipeline.build import build_engines

    reason = get_backend("tensorrt").unavailable_reason()
    if reason:
        pytest.skip(f"tensorrt: {reason}")
    build_engines(run, backend="tensorrt", precisions=["fp16"], settings=BuildSettings(opt_batch=2, max_batch=4),
                  progress=False)
    sidecar = read_sidecar(run.path / "engines/tensorrt-fp16")
    schema = triton_schema()
    dest = make_bundle(run, variants=["tensorrt-fp16"], dest=tmp_path / "t", format="triton")
    folder = dest / "model_repository/resnet18_tensorrt-fp16"
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), schema.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == sidecar["profile"]["max"][0] == 4
    assert [(i.name, list(i.dims)) for i in cfg.input] == \
        [(t["name"], t["shape"][1:]) for t in sidecar["io"]["inputs"]]
    assert cfg.instance_group[0].kind == schema.ModelInstanceGroup.KIND_GPU
    assert sidecar["runtime"]["tensorrt"] in (dest / "README.txt").read_text()
    ds = make_bundle(run, variants=["tensorrt-fp16"], dest=tmp_path / "d", format="deepstream")
    keys = configparser.ConfigParser()
    keys.read(ds / "resnet18_tensorrt-fp16/config_infer_primary.txt")
    assert (ds / "resnet18_tensorrt-fp16" / keys["property"]["model-engine-file"]).is_file()
    assert keys["property"]["network-mode"] == "2"
    with load_engine(run.path / "engines/tensorrt-fp16") as ref:
        logits = ref.infer(np.stack([run_spec(run).load_image(p) for p in images[:2]]))
    for r, ref in zip(infer_images(dest, [str(p) for p in images[:2]], model="resnet18_tensorrt-fp16"), logits):
        assert r["top"][0]["class"] == int(np.argmax(ref))
    assert infer_images(ds, [str(images[0])], model="resnet18_tensorrt-fp16")[0]["top"]
