"""Labelled data for the accuracy stage: class folders map to the model's outputs by the model's
own labels, malformed data is refused before anything runs, and results are real measurements."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.evaluate import EvaluateSettings, LabelledSet, run_evaluate
from rexport.pipeline.manifest import RunDir

SPEC = PreprocessSpec(input_size=64, resize=73, labels=tuple(f"class{i}" for i in range(10)))


def image_folder(root, classes, per_class=2):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (70, 70, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folders_map_to_the_models_labels_by_name(tmp_path):
    # sorted folder order (class10 < class2) differs from the model's order: names decide
    root = image_folder(tmp_path / "val", ["class2", "class9", "class0"])
    data = LabelledSet(root, SPEC, 10, None, 0)
    by_class = dict(zip(data._items, data.labels))
    assert {p.parent.name: int(lbl) for p, lbl in by_class.items()} == {"class0": 0, "class2": 2, "class9": 9}


def test_unknown_class_and_too_many_classes_are_refused(tmp_path):
    root = image_folder(tmp_path / "val", ["class1", "zebra"])
    with pytest.raises(InputError, match="zebra"):
        LabelledSet(root, SPEC, 10, None, 0)
    plain = PreprocessSpec(input_size=64, resize=73)
    many = image_folder(tmp_path / "many", [f"c{i}" for i in range(4)], per_class=1)
    with pytest.raises(InputError, match="4 classes but the model predicts 3"):
        LabelledSet(many, plain, 3, None, 0)


def test_labels_txt_must_list_every_folder(tmp_path):
    plain = PreprocessSpec(input_size=64, resize=73)
    root = image_folder(tmp_path / "val", ["a", "b", "c"], per_class=1)
    (root / "labels.txt").write_text("c\na\n")
    with pytest.raises(InputError, match="'b' is not listed"):
        LabelledSet(root, plain, 3, None, 0)
    (root / "labels.txt").write_text("c\na\nb\n")
    data = LabelledSet(root, plain, 3, None, 0)
    assert {p.parent.name: int(lbl) for p, lbl in zip(data._items, data.labels)} == {"c": 0, "a": 1, "b": 2}


@pytest.mark.parametrize("case,match", [
    ("2d_y", "y"), ("float_y", "integer"), ("out_of_range", r"\[0, 10\)"), ("nan_x", "finite"),
    ("uint8_x", "finite floats"), ("shape", "shape"),
])
def test_bad_npz_is_refused(tmp_path, case, match):
    x = np.zeros((6, 3, 64, 64), np.float32)
    y = np.arange(6)
    if case == "2d_y":
        y = y.reshape(6, 1)
    elif case == "float_y":
        y = y.astype(np.float32)
    elif case == "out_of_range":
        y = y + 5
    elif case == "nan_x":
        x[2, 0, 0, 0] = np.nan
    elif case == "uint8_x":
        x = x.astype(np.uint8)
    elif case == "shape":
        x = np.zeros((6, 3, 32, 32), np.float32)
    np.savez(tmp_path / "v.npz", x=x, y=y)
    with pytest.raises(InputError, match=match):
        LabelledSet(tmp_path / "v.npz", SPEC, 10, None, 0)


def test_unreadable_images_are_left_out_with_a_count(tmp_path):
    root = image_folder(tmp_path / "val", ["class0", "class1"])
    (root / "class1" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="1 unreadable"):
        data = LabelledSet(root, SPEC, 10, None, 0)
    assert len(data) == 4 and data.unreadable == 1


def test_evaluate_npz_measures_every_variant(small_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(small_run.path, run.path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "v.npz", x=rng.standard_normal((10, 3, 64, 64)).astype(np.float32), y=np.arange(10))
    recs = run_evaluate(run, EvaluateSettings(val_data=str(tmp_path / "v.npz")))
    assert [r["variant"] for r in recs] == ["pytorch", "fp32"]
    ref = json.loads(run.file("eval/pytorch.json").read_text())
    fp32 = json.loads(run.file("eval/fp32.json").read_text())
    assert ref["n"] == fp32["n"] == 10 and fp32["agreement_top1_vs_fp32"] == 1.0
    assert fp32["top1"] == ref["top1"] and 0 <= ref["top1"] <= ref["top5"] <= 1
    with pytest.raises(InputError):
        EvaluateSettings(val_data="x", samples=0)
