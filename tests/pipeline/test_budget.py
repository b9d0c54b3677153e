"""INT8 within an accuracy budget, on a real resnet18 trained briefly on scikit-learn's real digits
(16x16 px): the plain INT8 file, the per-tensor method choice, the sensitivity ranking and the greedy
float fallback, each judged by real files in ONNX Runtime on seeded, disjoint splits."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("sklearn")

from rexport.core.errors import InputError  # noqa: E402
from rexport.core.preprocess import PreprocessSpec  # noqa: E402
from rexport.pipeline.export import ExportSettings, run_export  # noqa: E402
from rexport.pipeline.manifest import VARIANT_FILES, RunDir  # noqa: E402
from rexport.pipeline.quantize import QuantizeSettings, run_quantize  # noqa: E402

SPEC = PreprocessSpec(input_size=16, resize=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                      labels=tuple(str(d) for d in range(10)))
#: the channel rescaled after layer2.0's first BN+ReLU, and by how much (FP32 unchanged)
CHANNEL, FACTOR = 3, 200.0
SENSITIVE_LAYER = "layer2.0.conv2"


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    """Digits at 16 px, a resnet18 trained on them (3 epochs), and its FP32-equivalent outlier twin."""
    import rexport.demo as demo

    root = tmp_path_factory.mktemp("budget")
    data = demo.write_digits(root / "digits", size=16)
    ckpt = root / "plain.pth"
    # at the size exported below; tiny tensors: one thread is fastest, and the same weights everywhere
    demo.train_digits(data, ckpt, epochs=3, spec=SPEC, threads=1)
    # FP32-equivalent: relu(k x) = k relu(x) for k > 0, and the next conv undoes it
    assert demo.outlier_twin(ckpt, root / "sensitive.pth", block="layer2.0", channel=CHANNEL,
                             factor=FACTOR) == SENSITIVE_LAYER
    runs = {}
    for name in ("plain", "sensitive"):
        run = RunDir(root / f"run-{name}")
        with run.locked():
            run_export(run, ExportSettings(model="resnet18", weights=str(root / f"{name}.pth"), preprocess=SPEC))
        runs[name] = run
    return data, runs


def budget(data, **kw) -> QuantizeSettings:
    base = dict(precision="int8", calib_data=str(data.train), calib_samples=200, calib_method="minmax",
                budget_val_data=str(data.val), budget_samples=300, budget_latency=False, int8_float="fp32",
                max_accuracy_drop=1.0)
    return QuantizeSettings(**{**base, **kw})


def quantize(run, settings):
    with run.locked():
        return run_quantize(run, settings, progress=False)


def qdq_tensors(path) -> set[str]:
    m = onnx.load(str(path))
    return {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}


def test_fp32_is_unchanged_by_the_rescaled_channel(digits16):
    from rexport.pipeline.budget_data import split_budget_data
    from rexport.pipeline.budget import _ort_logits

    data, runs = digits16
    d = split_budget_data(data.val, SPEC, 10, need_labels=True, calibration_fingerprints=set(), fraction=0.5,
                          max_samples=64, seed=0)
    a, b = (_ort_logits(runs[n].file(VARIANT_FILES["fp32"]), d.x["selection"]) for n in ("plain", "sensitive"))
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()
    assert (a.argmax(1) == d.labels["selection"]).mean() >= 0.7  # a trained model, not noise


def test_sensitive_model_fallback_alone_meets_the_budget(digits16):
    data, runs = digits16
    run = runs["sensitive"]
    rec = quantize(run, budget(data, budget_per_tensor_method=False))
    b = rec["summary"]["budget"]
    plain = b["steps"][0]
    assert plain["fix"].startswith("none") and plain["selection"]["drop_pts"] > 1.0  # plain minmax misses 1 pt
    assert all(s["fix"] != "per-tensor calibration method" for s in b["steps"])   # switched off
    assert rec["status"] == "ok" and b["met"], b["message"]
    chosen = b["chosen"]
    assert chosen["fix"] == "float fallback" and SENSITIVE_LAYER in chosen["fallback_names"]
    assert chosen["selection"]["drop_pts"] <= 1.0 and chosen["confirmation"]["drop_pts"] <= 1.0
    assert "confirmation split" in b["message"]
    # the ranking put the rescaled layer's input first, measured on the selection split
    top = b["sensitivity"]["ranked"][0]
    assert any(w == f"{SENSITIVE_LAYER}.weight" for w in top["weights"])
    assert top["score"] > 10 * b["sensitivity"]["ranked"][1]["score"]
    # both INT8 forms leave that layer without Q/DQ; every other conv keeps its weight quantizer
    for form in ("int8", "int8-openvino"):
        tensors = qdq_tensors(run.file(VARIANT_FILES[form]))
        assert f"{SENSITIVE_LAYER}.weight" not in tensors and top["name"] not in tensors
        assert "layer2.0.conv1.weight" in tensors
    # evaluate: the confirmation split beside the full set, equal to what the search recorded for that file
    from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate
    from rexport.pipeline.report import write_report

    with run.locked():
        run_evaluate(run, EvaluateSettings(val_data=str(data.val), decode_workers=0), ["int8-openvino"])
    ev = json.loads(run.file("eval/int8-openvino.json").read_text())
    bs = ev["budget_splits"]
    assert bs["full_set_includes_selection"] and bs["selection"]["n"] == chosen["selection"]["n"]
    assert 100 * bs["confirmation"]["top1"] == pytest.approx(chosen["confirmation"]["top1_pct"])
    # the report: the steps and the ranked sensitivity, with their plots
    report = write_report(run)
    keys = [sec["key"] for sec in report["sections"]]
    assert "int8_budget" in keys and "int8_sensitivity" in keys
    assert {"budget_steps", "sensitivity"} <= {p["name"] for p in report["plots"] if p["drawn"] or p["caption"]}
    md = run.file("report/report.md").read_text()
    assert "INT8 accuracy budget: search steps" in md and SENSITIVE_LAYER in md and "confirmation split" in md


def test_per_tensor_choice_on_says_which_fix_met_it(digits16):
    data, runs = digits16
    rec = quantize(runs["sensitive"], budget(data))
    b = rec["summary"]["budget"]
    fixes = [s["fix"] for s in b["steps"]]
    assert fixes[0].startswith("none") and fixes[1] == "per-tensor calibration method"  # cheaper fix first
    assert b["met"] and b["chosen"]["fix"] in fixes
    met_by = b["steps"][b["chosen"]["step"]]
    assert met_by["selection"]["meets"] and met_by["fix"] == b["chosen"]["fix"]
    assert b["chosen"]["fix"] in b["message"] or "layer(s) in float" in b["message"]
    if b["chosen"]["fix"] == "per-tensor calibration method":
        assert b["chosen"]["calibration_method"] == "auto" and not b["chosen"]["fallback_layers"]
        assert rec["summary"]["calibration"]["method"] == "auto"  # the record and TensorRT cache of those ranges


def test_insensitive_model_selects_no_fallback_and_keeps_the_plain_file(digits16, tmp_path):
    data, runs = digits16
    run = runs["plain"]
    rec = quantize(run, budget(data, calib_method="entropy", max_accuracy_drop=2.0, budget_latency=True))
    b = rec["summary"]["budget"]
    assert b["met"] and len(b["steps"]) == 1 and b["chosen"]["fallback_layers"] == [] and b["sensitivity"] is None
    # the plain file: every layer the placement quantizes is quantized, with the calibration's own ranges
    fp32 = onnx.load(str(run.file(VARIANT_FILES["fp32"])))
    classifier = [n.name for n in fp32.graph.node if n.op_type in ("Gemm", "MatMul")][-1]  # TensorRT form: float
    for form in ("int8", "int8-openvino"):
        assert set(rec["summary"]["forms"][form]["qdq"]["excluded_nodes"]) <= {classifier}
    cal = json.loads(run.file(rec["summary"]["calibration_file"]).read_text())
    amax = rec["summary"]["forms"]["int8-openvino"]["qdq"]["activation_amax"]
    assert cal["settings"]["method"] == "entropy" and all(amax[t] == pytest.approx(cal["ranges"][t]) for t in amax)
    lat = b["steps"][0]["latency"]
    assert lat.get("p50_ms", 0) > 0 or "skipped" in lat


def test_impossible_budget_exits_1_and_keeps_the_best_file_marked(digits16):
    from conftest import rexport_cli

    data, runs = digits16
    run = runs["plain"]
    # calibrate on part of the validation folder: those images must stay out of both splits
    proc = rexport_cli("quantize", "--precision", "int8", "--calib-data", data.val, "--calib-samples", "200",
                       "--calib-method", "minmax", "--int8-float", "fp32", "--max-accuracy-drop", "-50",
                       "--val-data", data.val, "--budget-samples", "300", "--budget-max-steps", "1",
                       "--no-budget-per-tensor-method", "--no-budget-latency", "--sensitivity-samples", "16",
                       "--out", run.path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert "budget not met" in err[-1] and "misses it by" in err[-1] and "Traceback" not in proc.stderr
    assert "budget step 0" in proc.stdout and "budget step 1" in proc.stdout
    run = RunDir(run.path)
    st = run.stage("quantize:int8")
    assert st["status"] == "failed" and st["summary"]["budget"]["met"] is False
    for form in ("int8", "int8-openvino"):
        assert run.file(VARIANT_FILES[form]).is_file() and VARIANT_FILES[form] in st["outputs"]
    # splits: seeded, disjoint, recorded, and free of calibration images
    splits = json.loads(run.file("budget/splits.json").read_text())
    sel, conf = set(splits["fingerprints"]["selection"]), set(splits["fingerprints"]["confirmation"])
    cal = set(st["summary"]["calibration"]["sample_sha256"])
    assert len(cal) == 200 and splits["left_out_calibration"] == 200
    assert sel and conf and not sel & conf and not (sel | conf) & cal
    assert st["summary"]["budget"]["splits"]["seed"] == 0
    assert st["summary"]["budget"]["splits"]["selection"]["n"] == len(sel)


def test_switch_session_is_exact_and_the_ranking_is_cached(digits16, tmp_path):
    import onnxruntime as ort

    from rexport.pipeline.budget import _ort_logits
    from rexport.pipeline.sensitivity import SensitivitySettings, measure_sensitivity
    from rexport.pipeline.switch_session import SwitchSession

    data, runs = digits16
    run = runs["sensitive"]
    quantize(run, QuantizeSettings(precision="int8", calib_data=str(data.train), calib_samples=200,
                                   calib_method="minmax", int8_float="fp32"))
    int8, fp32 = run.file(VARIANT_FILES["int8-openvino"]), run.file(VARIANT_FILES["fp32"])
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    sess = SwitchSession(int8, fp32)
    assert len(sess.parts) >= 4 and len(sess.groups) >= 20
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # plain fake-quant arithmetic
    fake = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    every = {g.name for g in sess.groups}
    assert np.abs(sess.logits(x, every, 4) - fake).max() <= 1e-4 * np.abs(fake).max()
    assert np.abs(sess.logits(x, set(), 4) - _ort_logits(fp32, x)).max() <= 1e-5 * np.abs(fake).max()
    settings = SensitivitySettings(samples=8, metric="mse")
    first = measure_sensitivity(int8, fp32, x, None, settings, tmp_path, session=sess)
    again = measure_sensitivity(int8, fp32, x, None, settings, tmp_path)
    assert not first.reused and again.reused and again.key == first.key
    assert [r.group.name for r in again.ranked] == [r.group.name for r in first.ranked]
    assert first.ranked[0].score >= first.ranked[-1].score


def test_budget_needs_labels_and_data(digits16, tmp_path):
    data, _ = digits16
    with pytest.raises(InputError, match="needs --val-data"):
        QuantizeSettings(precision="int8", max_accuracy_drop=0.5)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(data.val.rglob("*.png"))[:4]:
        (flat / p.name).write_bytes(p.read_bytes())
    from rexport.pipeline.budget_data import split_budget_data

    with pytest.raises(InputError, match="needs labelled data"):
        split_budget_data(flat, SPEC, 10, need_labels=True, calibration_fingerprints=set(), fraction=0.5,
                          max_samples=10, seed=0)
    d = split_budget_data(flat, SPEC, 10, need_labels=False, calibration_fingerprints=set(), fraction=0.5,
                          max_samples=10, seed=0)
    assert d.labels["selection"] is None and d.record["selection"]["n"] == 2
