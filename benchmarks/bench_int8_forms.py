"""The two INT8 forms and both float choices of the TensorRT form, on the CPU engines, with accuracy.

Trains our resnet18 on scikit-learn's real digits (rexport/demo.py), runs the real export and quantize
stages (one calibration on the 1,000 training digits), and measures each INT8 file on the 797 held-out
digits: ``int8`` with FP16 float parts (as kept by its proof), the same file with FP32 float parts
(``model.int8.fp32-float.onnx``), and ``int8-openvino``; each in ONNX Runtime CPU and in OpenVINO CPU
(the ONNX compiled as is, INFERENCE_PRECISION_HINT=f32). Speed is CPU time on one thread per batch,
round-robin over the files (benchmarks/bench_int8_placement.py's clock: it stays within ~2 % on a
loaded machine, where wall clock does not), at the demo's 32x32 input.

    .venv/bin/python benchmarks/bench_int8_forms.py                 # trains 6 epochs (~1-3 min)
    .venv/bin/python benchmarks/bench_int8_forms.py --rounds 2 --seconds 0.5 --batches 1,32
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8_placement import time_interleaved  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "int8_forms.json"
FILES = {"int8 (TensorRT form, fp16 floats)": "onnx/model.int8.onnx",
         "int8 (TensorRT form, fp32 floats)": "onnx/model.int8.fp32-float.onnx",
         "int8-openvino (OpenVINO form)": "onnx/model.int8-openvino.onnx",
         "fp32": "onnx/model.fp32.onnx"}


def make_run(work: Path, epochs: int):
    from rexport.demo import DIGITS_SPEC, train_digits, write_digits
    from rexport.pipeline.export import ExportSettings, run_export
    from rexport.pipeline.manifest import RunDir
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    data = write_digits(work / "digits")
    ckpt = work / "digits.pth"
    if not ckpt.exists():
        train_digits(data, ckpt, epochs=epochs)
    run = RunDir(work / "run")
    with run.locked():
        run_export(run, ExportSettings(model="resnet18", weights=str(ckpt), preprocess=DIGITS_SPEC))
        rec = run_quantize(run, QuantizeSettings(precision="int8", calib_data=str(data.train),
                                                 calib_samples=data.n_train, int8_float_data=str(data.val),
                                                 int8_float_val_data=str(data.val)), progress=False)
    return run, data, rec["summary"]


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ov_compiled(path: Path, batch: int | None, threads: int):
    """The ONNX file compiled by OpenVINO CPU, at a static batch (None: the file's dynamic batch)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if batch is not None:
        model.reshape({model.inputs[0].get_any_name(): [batch, 3, 32, 32]})
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    return core.compile_model(model, "CPU", config)


def accuracy(predict, x: np.ndarray, y: np.ndarray, batch: int = 97) -> float:
    pred = np.concatenate([predict(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float(np.mean(pred == y))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="work folder (kept; default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args(argv)
    from rexport.core.machine import machine_fingerprint
    from rexport.demo import DIGITS_SPEC, load_folder

    load_before = os.getloadavg()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        run, data, summary = make_run(work, args.epochs)
        files = {k: run.file(v) for k, v in FILES.items() if run.file(v).is_file()}
        if summary["int8_float"] == "fp32":  # FP16 floats failed their proof: int8 is the FP32-float file
            from rexport.pipeline.quantization.float_parts import convert_int8_float_fp16

            trt16, trt32 = list(FILES)[:2]
            files[trt32] = files.pop(trt16)
            files[trt16 + " [failed its proof]"] = convert_int8_float_fp16(
                files[trt32], work / "model.int8.fp16-float.onnx").path
        x, y = load_folder(data.val, DIGITS_SPEC)
        rows, acc = [], {}
        for label, path in files.items():
            sess = ort_session(path, 1)
            acc[("onnxruntime", label)] = accuracy(lambda b: sess.run(None, {"input": b})[0], x, y)
            comp = ov_compiled(path, None, 1)
            acc[("openvino", label)] = accuracy(lambda b: comp({0: b})[0], x, y)
        for batch in (int(b) for b in args.batches.split(",")):
            xb = x[:batch] if len(x) >= batch else np.resize(x, (batch, *x.shape[1:]))
            runners = {}
            for label, path in files.items():
                sess, comp = ort_session(path, 1), ov_compiled(path, batch, 1)
                runners[("onnxruntime", label)] = (lambda s: lambda: s.run(None, {"input": xb}))(sess)
                runners[("openvino", label)] = (lambda c: lambda: c({0: xb}))(comp)
            keyed = {f"{k[0]}|{k[1]}": fn for k, fn in runners.items()}
            med = time_interleaved(keyed, batch, args.seconds, args.rounds, clock=time.process_time)
            for key, per_round in med.items():
                runtime, label = key.split("|", 1)
                rows.append({"runtime": runtime, "file": label, "batch": batch,
                             "img_per_cpu_s": round(batch / statistics.median(per_round), 1),
                             "cpu_ms_per_batch_rounds": [round(1e3 * m, 3) for m in per_round],
                             "top1": round(acc[(runtime, label)], 4)})
    speed = {(r["runtime"], r["file"], r["batch"]): r["img_per_cpu_s"] for r in rows}
    trt16, trt32, ovf = list(FILES)[:3]
    if summary["int8_float"] == "fp32":
        trt16 += " [failed its proof]"
    ratios = {}
    for runtime in ("openvino", "onnxruntime"):
        for batch in sorted({r["batch"] for r in rows}):
            if (runtime, ovf, batch) in speed and (runtime, trt16, batch) in speed:
                ratios[f"{runtime} b{batch}: int8-openvino / int8 (fp16 floats), img per CPU-s"] = round(
                    speed[(runtime, ovf, batch)] / speed[(runtime, trt16, batch)], 3)
            if (runtime, trt32, batch) in speed and (runtime, trt16, batch) in speed:
                ratios[f"{runtime} b{batch}: int8 fp32 floats / fp16 floats, img per CPU-s"] = round(
                    speed[(runtime, trt32, batch)] / speed[(runtime, trt16, batch)], 3)
    result = {
        "what": "INT8 forms x float choices, resnet18 trained on real digits, 797 held-out images, CPU time "
                "per batch on one thread (round-robin), 32x32 input",
        "ratios_same_run": ratios,
        "rows": rows,
        "int8_float": summary["int8_float"], "int8_float_fallback_reason": summary["int8_float_fallback_reason"],
        "int8_float_proof": summary["int8_float_proof"],
        "qdq_pairs": {f: summary["forms"][f]["qdq"]["qdq_pairs"] for f in summary["forms"]},
        "calibration": {k: summary["calibration"][k] for k in ("method", "samples", "description")},
        "machine": machine_fingerprint(probe=False),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "seconds": round(time.time() - t0, 1),
        "not_measured": "TensorRT (no GPU here): scripts/gpu_check.sh builds both float choices on a GPU",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from rexport.core.fsio import atomic_write_json

    atomic_write_json(RESULTS, result)
    for k, v in ratios.items():
        print(f"{k}: {v}")
    for r in rows:
        print(f"{r['runtime']:12s} b{r['batch']:<3d} {r['file']:36s} {r['img_per_cpu_s']:9.1f} img/CPU-s "
              f"top-1 {r['top1']:.2%}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
