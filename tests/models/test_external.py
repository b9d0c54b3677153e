"""Models from outside our ResNets: a user's ``module:function`` factory and ``timm:<name>``, loaded
under the same checkpoint safety rules, exported, and matched against their own forward."""
from __future__ import annotations

import importlib.util
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.models.checkpoint import load_model
from rexport.pipeline.export import ExportSettings, export_onnx

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=7):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.Hardswish())
            self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Linear(8, num_classes)

        def forward(self, pixels):          # not called x: the exporter must not care
            return self.head(self.dw(self.stem(pixels)).mean((2, 3)))

    def small_net(num_classes=7):
        return Net(num_classes)

    def fixed_net():
        return Net()

    def not_a_model():
        return 42
''')


@pytest.fixture()
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "byom_factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)          # found as `python -m` would find it: in the working directory
    yield "byom_factory"
    sys.modules.pop("byom_factory", None)


def _ort(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_factory_model_exports_and_matches_its_forward(factory_module, tmp_path):
    loaded = load_model(f"{factory_module}:small_net", num_classes=5, seed=3)
    assert loaded.num_classes == 5 and loaded.random_weights
    ckpt = tmp_path / "net.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in loaded.model.state_dict().items()}}, ckpt)
    again = load_model(f"{factory_module}:small_net", ckpt)   # wrappers stripped, classes from the model
    assert again.num_classes == 5
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), loaded.model.state_dict().values()))
    out = tmp_path / "net.onnx"
    s = export_onnx(ExportSettings(model=f"{factory_module}:small_net", weights=str(ckpt),
                                   preprocess=PreprocessSpec(input_size=32, resize=32)), out)
    assert s["num_classes"] == 5 and s["smoke_max_abs_error"] <= 1e-5
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.inference_mode():
        ref = again.model(torch.from_numpy(x)).numpy()
    assert np.abs(_ort(out, x) - ref).max() <= 1e-5


def test_factory_refusals_are_one_line(factory_module, tmp_path):
    with pytest.raises(InputError, match="has no function 'nope'"):
        load_model(f"{factory_module}:nope")
    with pytest.raises(InputError, match="returned int, not a torch.nn.Module"):
        load_model(f"{factory_module}:not_a_model")
    with pytest.raises(InputError, match="takes no num_classes argument"):
        load_model(f"{factory_module}:fixed_net", num_classes=3)
    with pytest.raises(InputError, match="cannot import no_such_module_xyz"):
        load_model("no_such_module_xyz:f")
    with pytest.raises(InputError, match="bad --model"):
        ExportSettings(model="not a module:f")
    # the same safety rules as our ResNets: a pickle that would run code is refused
    evil = tmp_path / "evil.pth"
    evil.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.")
    with pytest.raises(InputError, match="would run code"):
        load_model(f"{factory_module}:small_net", evil)


def _timm_or_none():
    try:
        import timm  # noqa: F401  (imports torchvision)
    except ImportError:
        return None
    return timm


@pytest.mark.skipif(_timm_or_none() is not None, reason="timm is installed here")
def test_without_timm_the_error_says_how_to_install_it():
    with pytest.raises(InputError) as e:
        load_model("timm:resnet50d")
    assert e.value.hint == "pip install 'rexport[timm]'"
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(InputError, match="needs timm"):
            ExportSettings(model="timm:resnet50d")


TIMM_MODELS = ("resnet50d", "seresnet50", "resnet26t")


@pytest.mark.parametrize("arch", TIMM_MODELS)
def test_timm_resnets_match_timms_forward(arch, tmp_path):
    timm = _timm_or_none()
    if timm is None:
        pytest.skip("timm (and torchvision) not importable here: the CI's timm venv runs this")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                      # BN statistics that default init would never produce
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model.eval()
    ckpt = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / f"{arch}.onnx"
    s = export_onnx(ExportSettings(model=f"timm:{arch}", weights=str(ckpt),
                                   preprocess=PreprocessSpec(input_size=64, resize=64)), out)
    assert s["num_classes"] == 10 and not s["random_weights"]
    x = np.random.default_rng(2).standard_normal((3, 3, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    got = _ort(out, x)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max())), np.abs(got - ref).max()


def test_timm_preprocessing_comes_from_its_pretrained_config():
    if _timm_or_none() is None:
        pytest.skip("timm (and torchvision) not importable here: the CI's timm venv runs this")
    from rexport.pipeline.export_options import ExportOptions

    spec = ExportOptions(model="timm:resnet26t").to_settings().preprocess
    assert (spec.input_size, spec.interpolation) == (256, "bicubic") and spec.resize == int(256 / 0.94)
    given = ExportOptions(model="timm:resnet26t", input_size=128).to_settings().preprocess
    assert given.input_size == 128 and given.resize == round(128 * 256 / 224)
