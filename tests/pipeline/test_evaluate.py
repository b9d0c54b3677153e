"""Labelled data for the accuracy stage: class folders map to the model's outputs by the model's
own labels, malformed data is refused before anything runs, and results are real measurements."""
from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline import decode
from rexport.pipeline.evaluate import EvaluateSettings, LabelledSet, confusion_summary, run_evaluate
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


def test_evaluate_npz_measures_every_variant(small_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(small_run.path, run.path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "v.npz", x=rng.standard_normal((10, 3, 64, 64)).astype(np.float32), y=np.arange(10))
    recs = run_evaluate(run, EvaluateSettings(val_data=str(tmp_path / "v.npz")))
    assert [r["variant"] for r in recs] == ["pytorch", "fp32"]
    ref = json.loads(run.file("eval/pytorch.json").read_text())
    fp32 = json.loads(run.file("eval/fp32.json").read_text())
    assert ref["n"] == fp32["n"] == 10 and fp32["agreement_top1_vs_reference"] == 1.0
    assert fp32["top1"] == ref["top1"] and 0 <= ref["top1"] <= ref["top5"] <= 1
    with pytest.raises(InputError):
        EvaluateSettings(val_data="x", samples=0)


@pytest.fixture(scope="module")
def all_variants_run(small_run, tmp_path_factory) -> RunDir:
    """The exported resnet18 with every variant this machine makes: fp16, int8, OpenVINO engines."""
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    run = RunDir(tmp_path_factory.mktemp("eval") / "run")
    shutil.copytree(small_run.path, run.path)
    with run.locked():
        run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
        run_quantize(run, QuantizeSettings(precision="int8", calib_samples=8, calib_method="minmax"), progress=False)
        build_engines(run, backend="openvino", precisions=["fp32", "bf16", "int8"], progress=False,
                      skip_unavailable=True)
    return run


@pytest.fixture
def decode_counts():
    counts: collections.Counter = collections.Counter()
    decode.DECODE_HOOKS.append(lambda p: counts.update([str(p)]))
    yield counts
    decode.DECODE_HOOKS.clear()


def test_every_variant_in_one_pass_decodes_each_image_once(all_variants_run, tmp_path, decode_counts):
    from rexport.pipeline.variants import list_variants

    variants = list_variants(all_variants_run)
    assert {"pytorch", "fp32", "fp16", "int8", "openvino-fp32", "openvino-int8"} <= set(variants)  # 7 with bf16
    root = image_folder(tmp_path / "val", ["class0", "class3", "class7"], per_class=4)
    (root / "class3" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="1 unreadable"):
        recs = run_evaluate(all_variants_run, EvaluateSettings(val_data=str(root), batch_size=5, decode_workers=1))
    assert [r["variant"] for r in recs] == variants and all(r["status"] == "ok" for r in recs)
    files = sorted(str(p) for p in root.rglob("*.png"))
    assert sorted(decode_counts) == files and set(decode_counts.values()) == {1}  # 13 files, each decoded once
    for v in variants:
        res = json.loads(all_variants_run.file(f"eval/{v}.json").read_text())
        assert res["n"] == 12 and res["dataset"]["unreadable"] == 1 and len(res["predictions"]) == 12
        assert sorted(set(res["labels"])) == [0, 3, 7]
        assert [c["label"] for c in res["per_class"]] == [0, 3, 7] and sum(c["n"] for c in res["per_class"]) == 12
        assert res["per_class"][1]["name"] == "class3"
        assert np.isclose(np.mean(np.asarray(res["predictions"]) == np.asarray(res["labels"])), res["top1"])
    # unchanged: every stage reused, nothing decoded again
    decode_counts.clear()
    again = run_evaluate(all_variants_run, EvaluateSettings(val_data=str(root), batch_size=5, decode_workers=1))
    assert all(r["reused"] for r in again) and not decode_counts


def test_decoding_in_workers_or_in_process_gives_the_same_files(all_variants_run, tmp_path):
    root = image_folder(tmp_path / "val", ["class1", "class2"], per_class=5)
    written = []
    for workers in (0, 2):
        run_evaluate(all_variants_run, EvaluateSettings(val_data=str(root), batch_size=4, decode_workers=workers),
                     ["fp32", "int8"], force=True)
        written.append({v: all_variants_run.file(f"eval/{v}.json").read_bytes() for v in ("pytorch", "fp32", "int8")})
    assert written[0] == written[1]


def test_confusion_summary_counts_mistakes_per_true_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 2, 2, 1, 0, 2])
    rows = confusion_summary(labels, pred, ["cat", "dog", "fox"])
    assert rows[0] == {"label": 0, "n": 3, "top1": 1 / 3, "confused_with": [{"label": 2, "n": 2}], "name": "cat"}
    assert rows[1]["confused_with"] == [{"label": 0, "n": 1}] and rows[2]["top1"] == 1.0
