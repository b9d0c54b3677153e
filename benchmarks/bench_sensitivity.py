"""Per-layer INT8 sensitivity search time against calibration time, measured in the same run:
ResNet-18/50 at 224x224, seeded-random weights, synthetic images (labels = the FP32 model's own
top-1, which is enough for timing; the ranking itself is tested on a trained model in
tests/pipeline/test_budget.py).

For each model: a fresh calibration (default method, entropy, and minmax, ``--calib-samples``
images), then the default sensitivity ranking (every quantizer group quantized alone, logit KL on
``--sens-samples`` images, :mod:`rexport.pipeline.sensitivity`), and the same ranking as a naive
whole-model pass per group (one switchable session, no FP32 prefix/suffix reuse) for comparison, plus
what one greedy fallback step costs (write the file, ORT on the selection images, OpenVINO latency).
The issue's target: the default search <= ~3x the calibration time. Results go to
benchmarks/results/sensitivity.json with the machine and its load.

    .venv/bin/python benchmarks/bench_sensitivity.py [--models resnet18 resnet50] [--calib-samples 512]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "sensitivity.json"
TARGET = 3.0


def _machine() -> dict:
    from rexport.core import env

    if hasattr(env, "machine_fingerprint"):
        return env.machine_fingerprint()
    return {"cpu": env.cpu_info(), "versions": env.versions(), "python": platform.python_version(),
            "cores": os.cpu_count()}


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _naive_seconds(int8: Path, fp32: Path, x: np.ndarray, batch: int) -> float:
    """Every group alone through one whole switchable model (the baseline the parts beat)."""
    import onnx
    import onnxruntime as ort

    from rexport.pipeline.qdq_groups import SWITCH_PREFIX, find_groups, switchable_model

    model = onnx.load(str(int8))
    groups = find_groups(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(switchable_model(model, groups, onnx.load(str(fp32))).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    for g in range(len(groups)):
        flags = {f"{SWITCH_PREFIX}{i}": np.array(i == g) for i in range(len(groups))}
        for s in range(0, len(x), batch):
            sess.run(None, {"input": x[s:s + batch], **flags})
    return time.perf_counter() - t0


def bench_model(name: str, args, work: Path) -> dict:
    from rexport.calibration import CalibrationSettings, calibrate, open_reader_for
    from rexport.core.preprocess import PreprocessSpec
    from rexport.pipeline.budget import _ort_logits, openvino_latency_ms
    from rexport.pipeline.export import ExportSettings, run_export
    from rexport.pipeline.manifest import RunDir
    from rexport.pipeline.quantization import insert_qdq
    from rexport.pipeline.quantization.forms import OPENVINO_FORM, form_settings
    from rexport.pipeline.quantization.qdq_plan import QdqSettings
    from rexport.pipeline.sensitivity import SensitivitySettings, measure_sensitivity

    run = RunDir(work / name)
    spec = PreprocessSpec(input_size=224)
    with run.locked():
        run_export(run, ExportSettings(model=name, num_classes=1000, preprocess=spec))
    fp32 = run.file("onnx/model.fp32.onnx")
    out = {"model": name, "input_size": 224, "calibration": {}}
    result = None
    for method in ("entropy", "minmax"):
        cs = CalibrationSettings(method=method, samples=args.calib_samples, batch_size=8)
        reader = open_reader_for("synthetic", spec, cs)
        t0 = time.perf_counter()
        res = calibrate(fp32, reader, cs, work / f"{name}-cal-{method}", progress=False)
        out["calibration"][method] = {"seconds": time.perf_counter() - t0, "samples": args.calib_samples}
        result = result or res
    int8 = work / f"{name}.int8-openvino.onnx"
    insert_qdq(fp32, result.ranges, int8, form_settings(QdqSettings(), OPENVINO_FORM))
    x = np.random.default_rng(1).standard_normal((args.sens_samples, 3, 224, 224)).astype(np.float32)
    labels = _ort_logits(fp32, x).argmax(1)
    settings = SensitivitySettings(samples=args.sens_samples)
    t0 = time.perf_counter()
    sens = measure_sensitivity(int8, fp32, x, labels, settings, work / f"{name}-sens")
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = measure_sensitivity(int8, fp32, x, labels, settings, work / f"{name}-sens")
    cached = time.perf_counter() - t0
    out["sensitivity"] = {"seconds": seconds, "groups": len(sens.ranked), "samples": args.sens_samples,
                          "metric": sens.metric, "mode": sens.mode, "cached_repeat_seconds": cached,
                          "cached_repeat_reused": again.reused}
    if not args.skip_naive:
        out["sensitivity"]["naive_whole_model_seconds"] = _naive_seconds(int8, fp32, x, settings.batch_size)
    t0 = time.perf_counter()
    step = work / f"{name}.step.onnx"
    insert_qdq(fp32, result.ranges, step, form_settings(QdqSettings(exclude_nodes=tuple(sens.ranked[0].group.consumers)),
                                                         OPENVINO_FORM))
    _ort_logits(step, x)
    lat = openvino_latency_ms(step)
    out["greedy_step"] = {"seconds": time.perf_counter() - t0, "selection_images": args.sens_samples, "latency": lat}
    cal = out["calibration"]["entropy"]["seconds"]
    out["ratios"] = {"sensitivity_over_entropy_calibration": seconds / cal,
                     "sensitivity_over_minmax_calibration": seconds / out["calibration"]["minmax"]["seconds"],
                     "greedy_step_over_entropy_calibration": out["greedy_step"]["seconds"] / cal}
    if "naive_whole_model_seconds" in out["sensitivity"]:
        out["ratios"]["naive_over_default_sensitivity"] = out["sensitivity"]["naive_whole_model_seconds"] / seconds
    out["peak_rss_gb_so_far"] = round(_peak_rss_bytes() / 2**30, 2)
    out["meets_target"] = out["ratios"]["sensitivity_over_entropy_calibration"] <= TARGET
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--calib-samples", type=int, default=512)
    p.add_argument("--sens-samples", type=int, default=64)
    p.add_argument("--skip-naive", action="store_true")
    args = p.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            rows.append(bench_model(m, args, Path(tmp)))
            r = rows[-1]
            print(f"{m}: sensitivity {r['sensitivity']['seconds']:.1f} s ({r['sensitivity']['groups']} groups, "
                  f"{args.sens_samples} images) = {r['ratios']['sensitivity_over_entropy_calibration']:.2f}x entropy "
                  f"calibration ({r['calibration']['entropy']['seconds']:.1f} s, {args.calib_samples} images), "
                  f"{r['ratios']['sensitivity_over_minmax_calibration']:.2f}x minmax; one greedy step "
                  f"{r['greedy_step']['seconds']:.1f} s"
                  + (f"; naive whole-model ranking {r['ratios']['naive_over_default_sensitivity']:.2f}x slower"
                     if "naive_over_default_sensitivity" in r["ratios"] else ""), flush=True)
    doc = {"benchmark": "sensitivity", "target": f"sensitivity search <= {TARGET}x calibration time, same run",
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": _machine(),
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "results": rows,
           "note": "random weights and synthetic images: timing only; the machine was shared (see load)"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
