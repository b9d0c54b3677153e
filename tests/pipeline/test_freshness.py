"""Stage reuse is decided by content: an unchanged export is reused, a moved run directory is still
fresh, a new checkpoint redoes the export and makes everything downstream of it go away, and the
reference refuses a changed checkpoint. (The one test of export reuse: each export costs seconds.)"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.models.resnet import resnet18
from rexport.pipeline.build import build_engines
from rexport.pipeline.export import ExportSettings, run_export
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.quantize import QuantizeSettings, run_quantize
from rexport.pipeline.variants import load_reference

SPEC = PreprocessSpec(input_size=32, resize=32)


def save_weights(path, seed):
    torch.manual_seed(seed)
    torch.save(resnet18(num_classes=4).state_dict(), path)


def test_moved_run_is_fresh_and_new_weights_drop_everything_downstream(tmp_path):
    ckpt = tmp_path / "w.pth"
    save_weights(ckpt, 0)
    settings = ExportSettings(model="resnet18", weights=str(ckpt), preprocess=SPEC)
    run = RunDir(tmp_path / "a" / "run")
    first = run_export(run, settings)
    assert not first["reused"]
    assert run_export(run, settings)["reused"]  # unchanged, in place
    stage = json.loads((run.path / "manifest.json").read_text())["stages"]["export"]
    assert stage["outputs"]["onnx/model.fp32.onnx"] and stage["versions"]["torch"]
    run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
    build_engines(run, backend="openvino", precisions=["fp32"], progress=False)

    moved = RunDir(tmp_path / "b" / "run")
    shutil.copytree(run.path, moved.path)
    assert run_export(moved, settings)["reused"]
    assert run_quantize(moved, QuantizeSettings(precision="fp16"), progress=False)["reused"]
    assert all(r["reused"] for r in build_engines(moved, backend="openvino", precisions=["fp32"], progress=False))

    save_weights(ckpt, 1)  # a new checkpoint at the same path
    with pytest.raises(InputError, match="changed since it was exported"):
        load_reference(moved)
    rec = run_export(moved, settings)
    assert not rec["reused"]
    assert rec["inputs"]["weights"]["sha256"] != first["inputs"]["weights"]["sha256"]
    assert not moved.file("onnx/model.fp16.onnx").exists() and not moved.file("engines").exists()
    assert list(moved.manifest["stages"]) == ["export"]
    assert load_reference(moved).weights_sha256 == rec["inputs"]["weights"]["sha256"]
