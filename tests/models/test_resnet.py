"""Our ResNets against the torchvision layout frozen in models/torchvision_reference.json.

The fixture is written by scripts/crosscheck_torchvision.py, which also proves the logits match
torchvision's; these tests need no torchvision.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rexport.models
from rexport.models.resnet import MODELS, BasicBlock, Bottleneck, ResNet

FIXTURE = json.loads((Path(rexport.models.__file__).parent / "torchvision_reference.json").read_text())
REFERENCE = FIXTURE["models"]


@pytest.fixture(scope="module")
def r18() -> ResNet:
    torch.manual_seed(0)
    return MODELS["resnet18"]().eval()


@pytest.fixture(scope="module")
def r50() -> ResNet:
    torch.manual_seed(0)
    return MODELS["resnet50"]().eval()


def test_fixture_covers_every_model():
    assert set(REFERENCE) == set(MODELS)


@pytest.mark.parametrize("arch", list(MODELS))
def test_state_dict_layout_and_param_count_match_torchvision(arch):
    with torch.device("meta"):  # shapes without allocating or initialising weights
        model = MODELS[arch]()
    state = model.state_dict()
    assert list(state) == list(REFERENCE[arch]["keys"])  # same keys, same order
    assert {k: list(v.shape) for k, v in state.items()} == REFERENCE[arch]["keys"]
    assert sum(p.numel() for p in model.parameters()) == REFERENCE[arch]["num_params"]


def test_known_param_counts(r18, r50):
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032


@pytest.mark.parametrize("arch", list(MODELS))
def test_classifier_width_is_512_times_expansion(arch):
    with torch.device("meta"):
        model = MODELS[arch]()
    block = type(model.layer1[0])
    assert model.fc.in_features == 512 * block.expansion
    assert model.fc.in_features == (512 if arch in ("resnet18", "resnet34") else 2048)


def test_stem_and_blocks_end_in_relu(r18):
    seen: dict[str, torch.Tensor] = {}
    hooks = [r18.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("bn1", o.clone())),
             r18.maxpool.register_forward_pre_hook(lambda m, i: seen.__setitem__("stem", i[0].clone()))]
    hooks += [getattr(r18, f"layer{n}").register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(f"layer{n}", o.clone())) for n in range(1, 5)]
    try:
        with torch.inference_mode():
            r18(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
    # BatchNorm alone gives negatives; what maxpool sees must have gone through the ReLU.
    assert seen["bn1"].min() < 0
    assert seen["stem"].min() >= 0 and seen["stem"].max() > 0
    for n in range(1, 5):
        assert seen[f"layer{n}"].min() >= 0


@pytest.mark.parametrize("block,layers", [(BasicBlock, [1, 1, 1, 1]), (Bottleneck, [1, 2, 3, 1])])
def test_layers_are_honoured(block, layers):
    with torch.device("meta"):
        model = ResNet(block, layers, num_classes=3)
    assert [len(getattr(model, f"layer{n}")) for n in range(1, 5)] == layers
    assert all(isinstance(b, block) for n in range(1, 5) for b in getattr(model, f"layer{n}"))


@pytest.mark.parametrize("layers", [[2, 2, 2], [2, 0, 2, 2]])
def test_bad_layers_are_rejected(layers):
    with pytest.raises(ValueError, match="four positive block counts"):
        ResNet(BasicBlock, layers)


@pytest.mark.parametrize("size", [32, 64, 97])
def test_input_size_other_than_224_works(r18, size):
    with torch.inference_mode():
        out = r18(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_bottleneck_model_runs_on_small_input(r50):
    with torch.inference_mode():
        out = r50(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 1000)


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    r18z = MODELS["resnet18"](zero_init_residual=True)
    blocks = [b for n in range(1, 5) for b in getattr(r18z, f"layer{n}")]
    assert all(not b.bn2.weight.any() for b in blocks)
    assert all((b.bn1.weight == 1).all() for b in blocks)
    # With F(x) == 0 a block is relu(x + downsample(x)) -> for a non-downsampling block, relu(x).
    x = torch.randn(1, 64, 8, 8)
    with torch.inference_mode():
        assert torch.equal(r18z.eval().layer1[0](x), torch.relu(x))


def test_zero_init_residual_in_bottleneck_zeroes_bn3_only():
    model = ResNet(Bottleneck, [1, 1, 1, 1], zero_init_residual=True)
    blocks = [getattr(model, f"layer{n}")[0] for n in range(1, 5)]
    assert all(not b.bn3.weight.any() for b in blocks)
    assert all((b.bn2.weight == 1).all() for b in blocks)


def test_default_init_does_not_zero_residual(r18, r50):
    assert all(b.bn2.weight.all() for n in range(1, 5) for b in getattr(r18, f"layer{n}"))
    assert all(b.bn3.weight.all() for n in range(1, 5) for b in getattr(r50, f"layer{n}"))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_num_classes_is_respected(arch):
    model = MODELS[arch](num_classes=10).eval()
    assert model.fc.out_features == 10
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_builders_take_keyword_only_arguments():
    with pytest.raises(TypeError):
        MODELS["resnet18"](10)
