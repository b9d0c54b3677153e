"""Checkpoint loading: layouts, formats, and one-line errors (exit 2) for everything that goes wrong."""
from __future__ import annotations

import os
import pickle
import random
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file
from rexport.models.checkpoint import LoadedModel, load_model, load_state_dict
from rexport.models.resnet import MODELS


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """A 10-class resnet18 state dict with BN statistics that default init would never produce."""
    torch.manual_seed(1234)
    model = MODELS["resnet18"](num_classes=10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(42)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_loaded(loaded: LoadedModel, source: dict[str, torch.Tensor], path: Path | None = None) -> None:
    state = loaded.model.state_dict()
    assert list(state) == list(source)
    assert all(torch.equal(state[k], source[k]) for k in source)
    assert loaded.num_classes == 10
    assert loaded.model.training is False
    assert loaded.random_weights is False and loaded.seed is None
    if path is not None:
        assert loaded.weights_path == os.path.abspath(path)
        assert loaded.weights_sha256 == sha256_file(path)


def input_error(excinfo: pytest.ExceptionInfo) -> InputError:
    e = excinfo.value
    assert e.exit_code == 2
    assert "\n" not in e.message and e.hint and "\n" not in e.hint
    return e


# --- layouts and formats ----------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "module_prefix", "wrapped_and_prefixed"])
def test_torch_layouts_load(tmp_path, source, layout):
    prefixed = {f"module.{k}": v for k, v in source.items()}
    obj = {
        "plain": source,
        "state_dict": {"state_dict": source, "epoch": 7, "optimizer": {"lr": 0.1}},
        "model": {"model": source, "args": {"arch": "resnet18"}},
        "module_prefix": prefixed,
        "wrapped_and_prefixed": {"state_dict": prefixed, "best_acc1": torch.tensor(71.2)},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    assert_loaded(load_model("resnet18", path), source, path)


def test_load_state_dict_returns_plain_tensors(tmp_path, source):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}, "epoch": 3}, path)
    state = load_state_dict(path)
    assert type(state) is dict and list(state) == list(source)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_safetensors(tmp_path, source):
    path = tmp_path / "ckpt.safetensors"
    save_file(source, str(path))
    assert_loaded(load_model("resnet18", path), source, path)


def test_half_precision_checkpoint_loads_into_fp32_model(tmp_path, source):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in source.items()}, path)
    loaded = load_model("resnet18", path)
    assert loaded.model.fc.weight.dtype == torch.float32
    assert torch.equal(loaded.model.fc.weight, source["fc.weight"].half().float())


def test_old_checkpoint_without_num_batches_tracked_loads(tmp_path, source):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_model("resnet18", path)
    assert torch.equal(loaded.model.bn1.running_var, source["bn1.running_var"])


def test_num_classes_inferred_from_head(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save(source, path)
    loaded = load_model("resnet18", path)
    assert loaded.num_classes == 10 and loaded.model.fc.out_features == 10
    assert load_model("resnet18", path, num_classes=10).num_classes == 10
    with torch.inference_mode():
        assert loaded.model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# --- random init ------------------------------------------------------------------------------

def test_random_weights_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    a = load_model("resnet18", seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched

    torch.manual_seed(5)
    direct = MODELS["resnet18"]()
    b = load_model("resnet18", seed=5)
    c = load_model("resnet18", seed=6)
    for k, v in direct.state_dict().items():
        assert torch.equal(a.model.state_dict()[k], v) and torch.equal(b.model.state_dict()[k], v)
    assert not torch.equal(a.model.conv1.weight, c.model.conv1.weight)
    assert (a.random_weights, a.seed, a.weights_path, a.weights_sha256) == (True, 5, None, None)
    assert a.num_classes == 1000 and a.name == "resnet18" and a.model.training is False


def test_random_weights_with_num_classes():
    loaded = load_model("resnet18", num_classes=7)
    assert loaded.num_classes == 7 and loaded.model.fc.out_features == 7


# --- checkpoints that do not fit ---------------------------------------------------------------

def test_wrong_architecture(tmp_path):
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in MODELS["resnet50"]().state_dict().items()}
    path = tmp_path / "r50.pth"
    torch.save({k: torch.zeros(s, dtype=d) for k, (s, d) in shapes.items()}, path)
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    e = input_error(excinfo)
    assert e.message.startswith(f"checkpoint {path} does not fit resnet18: ")
    assert "layer1.0.conv3.weight unexpected" in e.message
    assert "layer1.0.conv1.weight has shape (64, 64, 1, 1), model wants (64, 64, 3, 3)" in e.message
    assert "fc.weight has shape (1000, 2048), model wants (1000, 512)" not in e.message  # only the first 3
    assert "more unexpected" in e.message
    assert "pick the --model" in e.hint and "resnet50" in e.hint


def test_missing_key_is_named(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save({k: v for k, v in source.items() if k != "layer4.1.bn2.running_var"}, path)
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    assert "layer4.1.bn2.running_var missing" in input_error(excinfo).message


def test_hint_names_the_architecture_that_fits(tmp_path, source):
    path = tmp_path / "r18.pth"
    torch.save({k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}, path)
    with pytest.raises(InputError) as excinfo:
        load_model("resnet34", path)
    e = input_error(excinfo)
    assert "layer1.2.conv1.weight missing" in e.message and "more missing" in e.message
    assert "num_batches_tracked" not in e.message
    assert "it looks like resnet18" in e.hint


def test_head_size_differs_from_num_classes(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save(source, path)
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path, num_classes=1000)
    e = input_error(excinfo)
    assert "10-class head" in e.message and "(10, 512)" in e.message and "num_classes=1000" in e.message
    assert "--num-classes" in e.hint


def test_head_bias_that_does_not_match_weight(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save({**source, "fc.bias": torch.zeros(1000)}, path)
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    assert "fc.bias has shape (1000,), model wants (10,)" in input_error(excinfo).message


def test_unknown_model_name(tmp_path):
    with pytest.raises(InputError) as excinfo:
        load_model("resnet19")
    e = input_error(excinfo)
    assert "unknown model 'resnet19'" in e.message
    assert all(name in e.message for name in MODELS)
    assert "resnet18" in e.hint


def test_bad_num_classes():
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", num_classes=0)
    assert "num_classes" in input_error(excinfo).message


def test_file_without_a_state_dict(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(InputError) as excinfo:
        load_state_dict(path)
    e = input_error(excinfo)
    assert "holds no state dict" in e.message and "epoch" in e.message


# --- files that are not checkpoints ------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", tmp_path / "nope.pth")
    assert "does not exist" in input_error(excinfo).message


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", tmp_path)
    assert "is not a file" in input_error(excinfo).message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    assert "is empty" in input_error(excinfo).message


@pytest.mark.parametrize("name,expected", [("junk.pth", "is not a PyTorch checkpoint"),
                                           ("junk.safetensors", "is not a valid safetensors file")])
def test_garbage_bytes(tmp_path, name, expected):
    path = tmp_path / name
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    assert expected in input_error(excinfo).message


def test_truncated_torch_file(tmp_path, source):
    path = tmp_path / "cut.pth"
    torch.save(source, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    e = input_error(excinfo)
    assert "truncated" in e.message and "fetch it again" in e.hint


def test_truncated_safetensors_file(tmp_path, source):
    path = tmp_path / "cut.safetensors"
    save_file(source, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    assert "is not a valid safetensors file" in input_error(excinfo).message


# --- pickles that would run code ---------------------------------------------------------------

class _Payload:
    """Runs a shell command when unpickled; here it only creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_malicious_pickle_is_refused_then_accepted_when_trusted(tmp_path, source):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": source, "extra": _Payload(marker)}, path)

    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    e = input_error(excinfo)
    assert "would run code" in e.message and "system" in e.message
    assert "--trust-checkpoint" in e.hint and "only if you trust" in e.hint
    assert not marker.exists()

    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded = load_model("resnet18", path, trust_checkpoint=True)
    assert marker.exists()
    assert_loaded(loaded, source, path)


def test_malicious_legacy_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_legacy.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}, protocol=2))
    with pytest.raises(InputError) as excinfo:
        load_state_dict(path)
    assert "would run code" in input_error(excinfo).message
    assert not marker.exists()


def test_pickled_module_needs_trust(tmp_path, source):
    model = MODELS["resnet18"](num_classes=10)
    model.load_state_dict(source)
    path = tmp_path / "full_model.pth"
    torch.save({"model": model}, path)
    with pytest.raises(InputError) as excinfo:
        load_model("resnet18", path)
    assert "would run code" in input_error(excinfo).message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_loaded(load_model("resnet18", path, trust_checkpoint=True), source, path)


def test_untrusted_load_does_not_warn(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save(source, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_state_dict(path)
