"""Typed stage summaries: what the real stages write reads back through the accessors, unchanged on
disk; a record from an incompatible version is one InputError (exit 2 on the CLI), never a KeyError."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.summaries import (BenchSummary, BuildSummary, CalibrationSummary, EvaluateSummary,
                                        ExportSummary, Fp16Summary, FormSummary, ImportSummary, QuantizeSummary,
                                        ValidateSummary, summary_class)

SIZE, RESIZE, CLASSES = 32, 37, 10


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """resnet18 at 32 px with random weights: export, FP16, INT8 from 8 synthetic samples, FP32 validated."""
    from rexport.pipeline.export import ExportSettings, run_export
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize
    from rexport.pipeline.validate import ValidateSettings, run_validate

    run = RunDir(tmp_path_factory.mktemp("summaries") / "resnet18")
    with run.locked():
        run_export(run, ExportSettings(model="resnet18", num_classes=CLASSES,
                                       preprocess=PreprocessSpec(input_size=SIZE, resize=RESIZE)))
        run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
        run_quantize(run, QuantizeSettings(precision="int8", calib_samples=8, calib_method="minmax",
                                           int8_float_samples=8), progress=False)
        run_validate(run, ValidateSettings(samples=2, batch_sizes=(1,)), ["fp32"])
    return run


def test_real_stage_summaries_read_back_through_the_accessors(run):
    fresh = RunDir(run.path)  # what a later command reads: the manifest from disk
    ex = ExportSummary.of(fresh)
    assert isinstance(ex, ExportSummary) and ex.model == "resnet18" and ex.num_classes == CLASSES
    assert ex.random_weights is True and ex.weights_sha256 is None and ex.batch == "dynamic"
    assert ex.ops["Conv"] == 20 and ex.nodes == sum(ex.ops.values()) and ex.smoke_max_abs_error < 1e-3
    q = QuantizeSummary.of(fresh)
    cal = q.calibration
    assert isinstance(cal, CalibrationSummary) and cal.method == "minmax" and cal.samples == 8
    assert cal.synthetic and cal.sample_sha256 == [] and QuantizeSummary.calibration_samples(fresh) == frozenset()
    assert fresh.file(q.tensorrt_cache).read_text().startswith("TRT-") and fresh.file(q.calibration_file).is_file()
    assert set(q.forms) == {"int8", "int8-openvino"} and all(isinstance(f, FormSummary) for f in q.forms.values())
    assert {f: (s.file, s.target) for f, s in q.forms.items()} == {
        "int8": ("onnx/model.int8.onnx", "tensorrt"), "int8-openvino": ("onnx/model.int8-openvino.onnx", "openvino")}
    assert all(fresh.file(s.file).is_file() for s in q.forms.values())
    assert q.int8_float in ("fp16", "fp32") and (q.int8_float == "fp32") == (q.int8_float_fallback_reason is not None)
    assert q.budget is None and "budget" not in fresh.stage("quantize:int8")["summary"]  # no budget: no key
    f16 = Fp16Summary.from_stage(fresh.stage("quantize:fp16"))
    assert f16.path.endswith("model.fp16.onnx") and f16.size_bytes == fresh.file("onnx/model.fp16.onnx").stat().st_size
    val = ValidateSummary.of(fresh, "fp32")
    result = json.loads(fresh.file("validate/fp32.json").read_text())
    assert val.passed is result["passed"] is True and val.metrics == result["metrics"] and val.failures == []
    assert ValidateSummary.of(fresh, "int8") is None and BenchSummary.of(fresh) is None  # not run here


def test_on_disk_schema_is_unchanged_by_the_round_trip(run):
    """to_json of what was read is exactly what the stage wrote: same keys, same values, same order."""
    on_disk = json.loads(run.manifest_path.read_text())["stages"]
    for name in ("export", "quantize:fp16", "quantize:int8", "validate:fp32"):
        cls = summary_class(name)
        assert list(cls.from_stage(on_disk[name], stage=name).to_json().items()) == list(on_disk[name]["summary"].items())


def test_round_trip_of_every_summary():
    made = [
        ExportSummary(model="resnet18", num_classes=3, random_weights=False, ops={"Conv": 2}),
        ImportSummary(model="m", source="a.onnx", source_sha256="ab", num_classes=5, notes=["cast"]),
        Fp16Summary(path="onnx/model.fp16.onnx", size_bytes=10, fp32_nodes=["n"], checked_batches=[1, 3]),
        QuantizeSummary(calibration=CalibrationSummary(method="entropy", samples=4, sample_sha256=["x"]),
                        forms={"int8": FormSummary(file="onnx/model.int8.onnx", target="tensorrt")},
                        budget={"met": True, "message": "ok"}),
        ValidateSummary(passed=False, metrics={"max_abs": 0.5}, failures=["max_abs"]),
        EvaluateSummary(top1=0.5, top5=0.9, n=10, drop_top1_vs_reference=-0.01, one_pass_with=["fp32"],
                        ray={"shards": 2}),
        BuildSummary(backend="openvino", precision="int8", engine_dir="engines/openvino-int8", size_mib=1.5),
        BenchSummary(rows={"ok": 4, "skipped": 2}, errors=[]),
    ]
    for s in made:
        j = s.to_json()
        assert json.loads(json.dumps(j)) == j                       # plain JSON
        assert type(s).from_json(j) == s and type(s).from_json(j).to_json() == j
    # optional-only keys are absent when unset, as the stages always wrote them
    assert "ray" not in EvaluateSummary(top1=1.0, top5=1.0, n=1).to_json()
    assert "budget" not in QuantizeSummary(calibration=CalibrationSummary(method="minmax", samples=1)).to_json()


def test_older_records_missing_optional_fields_still_read():
    old = ExportSummary.from_json({"model": "resnet50", "num_classes": 1000, "legacy_key": 1})
    assert old.random_weights is None and old.ops == {} and old.fold_preprocessing is False
    q = QuantizeSummary.from_json({"calibration": {"method": "entropy", "samples": 512}})
    assert q.forms == {} and q.tensorrt_cache is None and q.calibration.sample_sha256 == []
    assert EvaluateSummary.from_json({"top1": 1, "top5": 1, "n": 3}).drop_top1_vs_reference is None
    assert BenchSummary.from_stage(None) is None
    assert BenchSummary.from_stage({"status": "skipped", "reason": "r", "summary": {}}) is None


@pytest.mark.parametrize("cls, data, what", [
    (ExportSummary, {"model": "resnet18"}, "has no 'num_classes'"),
    (ExportSummary, {"model": "resnet18", "num_classes": "10"}, "'num_classes' = '10'"),
    (QuantizeSummary, {"calibration": {"samples": 8}}, "has no 'method'"),
    (QuantizeSummary, {"calibration": {"method": "minmax", "samples": 8}, "forms": ["int8"]}, "mapping of"),
    (ValidateSummary, [1, 2], "a list where its summary should be"),
    (BenchSummary, {"rows": [3]}, "'rows' = [3]"),
])
def test_incompatible_records_are_one_input_error(cls, data, what):
    with pytest.raises(InputError, match="incompatible version of rexport") as e:
        cls.from_json(data)
    assert what in e.value.message and "\n" not in str(e.value)


def test_an_ok_stage_without_a_summary_is_incompatible():
    with pytest.raises(InputError, match="quantize --precision int8 --force"):
        QuantizeSummary.from_stage({"status": "ok", "summary": {}})


def _copy_without(run: RunDir, dest, stage: str, key: str) -> RunDir:
    """A copy of the run whose manifest's ``stage`` summary lacks ``key`` (a record from an older version)."""
    old = RunDir(dest)
    shutil.copytree(run.path, old.path)
    manifest = json.loads(old.manifest_path.read_text())
    del manifest["stages"][stage]["summary"][key]
    old.manifest_path.write_text(json.dumps(manifest))
    return old


def test_incompatible_run_dir_stops_the_cli_with_exit_2(run, tmp_path):
    """A run whose export summary lacks num_classes: evaluate says so in one line, writes nothing."""
    from conftest import rexport_cli

    old = _copy_without(run, tmp_path / "old", "export", "num_classes")
    npz = tmp_path / "val.npz"
    np.savez(npz, x=np.zeros((2, 3, SIZE, SIZE), np.float32), y=np.zeros(2, np.int64))
    proc = rexport_cli("evaluate", "--val-data", npz, "--out", old.path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "the export record in manifest.json has no 'num_classes'" in err and "Traceback" not in err
    assert not old.file("eval").exists()


def test_the_report_of_an_incompatible_run_says_so_and_still_builds(run, tmp_path):
    from rexport.pipeline.report import write_report

    old = _copy_without(run, tmp_path / "old", "quantize:int8", "calibration")
    report = write_report(old)
    problem = [w for w in report["warnings"] if "quantize:int8 record in manifest.json has no 'calibration'" in w]
    assert len(problem) == 1 and problem[0].endswith("its figures are left out")
    assert report["calibration"]["text"] == "no calibration recorded"
    assert not any(s["key"] == "int8_forms" for s in report["sections"])
    assert report["num_classes"] == CLASSES and report["weights"]["random_weights"] is True
