"""Export: every architecture, from torchvision-format checkpoints in every layout, gives ONNX
Runtime logits equal to PyTorch's; the graph is portable, simplified and carries its preprocessing."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import small_export_settings  # tests/ is on sys.path (pytest's prepend mode)
from rexport.core.errors import InputError
from rexport.core.preprocess import METADATA_KEY, PreprocessSpec
from rexport.models.resnet import MODELS
from rexport.pipeline.export import ExportSettings, export_onnx

# (architecture, head size, checkpoint layout): every block type and every layout in the CPU suite; the
# deeper and wider ones (same blocks, minutes of export) in `make test-slow`.
SLOW = pytest.mark.slow
MATRIX = [
    ("resnet18", 1000, "plain.safetensors"),
    ("resnet34", 7, "model"),
    ("resnet50", 1000, "module"),
    ("resnext50_32x4d", 100, "state_dict"),
    pytest.param("resnet18", 5, "plain", id="resnet18-5-plain"),
    pytest.param("resnet101", 5, "model", marks=SLOW),
    pytest.param("resnet152", 3, "plain.safetensors", marks=SLOW),
    pytest.param("wide_resnet50_2", 10, "module", marks=SLOW),
]


def write_checkpoint(model: torch.nn.Module, path, layout: str):
    sd = model.state_dict()
    if layout == "plain.safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    if layout == "state_dict":
        obj = {"state_dict": sd, "epoch": 3}
    elif layout == "model":
        obj = {"model": sd, "optimizer": None}
    elif layout == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:
        obj = sd
    torch.save(obj, path)
    return path


def trained_like(name: str, num_classes: int, seed: int) -> torch.nn.Module:
    """A model whose BatchNorm statistics are not the identity, so folding them is really tested."""
    torch.manual_seed(seed)
    m = MODELS[name](num_classes=num_classes)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.mark.parametrize("name,num_classes,layout", MATRIX)
def test_every_architecture_matches_pytorch(tmp_path, name, num_classes, layout):
    ref = trained_like(name, num_classes, seed=1)
    suffix = ".safetensors" if layout.endswith("safetensors") else ".pth"
    ckpt = write_checkpoint(ref, tmp_path / f"ckpt{suffix}", layout)
    out = tmp_path / "model.onnx"
    spec = PreprocessSpec(input_size=64, resize=73)
    summary = export_onnx(ExportSettings(model=name, weights=str(ckpt), preprocess=spec), out)
    assert summary["num_classes"] == num_classes and not summary["random_weights"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            want = ref(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, num_classes)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.fixture(scope="module")
def exported(small_run):
    """The session's export (random-init resnet18, 10 labelled classes, 64 px) and the spec it was given."""
    return small_run.file("onnx/model.fp32.onnx"), small_export_settings().preprocess


def test_graph_is_portable_simplified_and_checked(exported):
    path, _ = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops, "Conv+BN must be folded"
    assert "GlobalAveragePool" in ops and "ReduceMean" not in ops
    assert not any(n.op_type == "Reshape" for n in model.graph.node)
    # no dead nodes: every node output feeds another node or is a graph output
    consumed = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    assert all(any(o in consumed for o in n.output) for n in model.graph.node)
    assert not model.graph.initializer or all(not i.data_location for i in model.graph.initializer)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value, "the batch must be dynamic"


def test_preprocessing_is_in_the_metadata(exported):
    path, spec = exported
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(props[METADATA_KEY])["labels"] == [f"class{i}" for i in range(10)]
    assert PreprocessSpec.from_onnx(path) == spec
    assert props["rexport.weights_sha256"].startswith("random-init-seed-0")


def test_fixed_batch_and_newer_opset(tmp_path):
    out = tmp_path / "m.onnx"
    export_onnx(ExportSettings(model="resnet18", num_classes=4, batch="2", opset=18,
                               preprocess=PreprocessSpec(input_size=32, resize=32)), out)
    model = onnx.load(str(out))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 32, 32]
    assert {o.domain: o.version for o in model.opset_import}[""] == 18


@pytest.mark.parametrize("opset", [9, 16, 22])
def test_bad_opsets_are_refused(opset):
    with pytest.raises(InputError, match="opset"):
        ExportSettings(opset=opset)


# export reuse (unchanged -> reused, new checkpoint -> redone) is tested in test_freshness.py


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_full_size_matrix(tmp_path, name):
    ref = trained_like(name, 1000, seed=2)
    ckpt = write_checkpoint(ref, tmp_path / "c.pth", "module")
    out = tmp_path / "m.onnx"
    export_onnx(ExportSettings(model=name, weights=str(ckpt)), out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            want = ref(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
