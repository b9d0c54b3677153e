"""Calibration time against one plain ONNX Runtime FP32 pass: ResNet-18/50 at 224x224, 512 synthetic
images, every method, with peak memory.

Each measurement runs in its own process (which imports rexport.calibration, not torch), so its peak
RSS (VmHWM) is its own. The plain pass (a default ORT session over the same images at the same batch
size) runs before and after the model's calibrations; the ratios divide by their mean, in wall time
and in process CPU time (user + system of all threads: steadier on a shared machine). A plain pass
with calibration's own session options (basic graph optimization, which keeps the ranges identical;
no spinning) separates what the statistics cost from what that optimization level costs: its ratio
to the default pass is the floor of the others. A second run on
the same cache shows the reuse, and "auto after entropy" the per-tensor choice from cached statistics.
Figures go to benchmarks/results/calibration.json and a table on stdout.

    .venv/bin/python benchmarks/bench_calibration.py [--models resnet18 resnet50] [--samples 512] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "calibration.json"
TARGET_RATIO = {"minmax": 1.1, "percentile": 1.3, "entropy": 1.3}  # x one plain ORT FP32 pass (issue 13)
TARGET_PEAK_GB = 3.0
METHODS = ("minmax", "percentile", "entropy", "mse", "auto")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _plain_pass(model: Path, reader, *, options: str) -> dict:
    """One plain ORT pass: ``options`` "default" (ORT's defaults: all optimizations, spinning threads),
    "nospin" (the same without spinning) or "same" (exactly calibration's session options)."""
    import onnxruntime as ort

    from rexport.calibration.session import session_options

    if options == "same":
        opts = session_options()
    else:
        opts = ort.SessionOptions()
        if options == "nospin":  # as calibration's session: idle ORT threads do not spin (less CPU time, same work)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    reader.rewind()
    samples = 0
    while (feed := reader.get_next()) is not None:
        session.run(None, feed)
        samples += len(feed[reader.input_name])
    return {"reused": False, "tensors": 0, "samples": samples, "key": ""}


PLAIN = {"plain": "default", "plain-nospin": "nospin", "plain-same": "same"}


def child(args: argparse.Namespace) -> None:
    """Calibrate (or run the plain pass) once and print one JSON line of figures."""
    from rexport.calibration import CalibrationSettings, calibrate, numba_available, open_reader_for
    from rexport.core.preprocess import PreprocessSpec

    settings = CalibrationSettings(method="minmax" if args.method.startswith("plain") else args.method,
                                   samples=args.samples, batch_size=args.batch_size)
    reader = open_reader_for("synthetic", PreprocessSpec(input_size=args.size), settings)
    cpu0, start = os.times(), time.perf_counter()
    if args.method.startswith("plain"):
        figures = _plain_pass(args.model, reader, options=PLAIN[args.method])
    else:
        result = calibrate(args.model, reader, settings, args.cache, progress=False)
        figures = {"reused": result.reused, "statistics_reused": result.statistics_reused,
                   "tensors": len(result.ranges), "samples": result.samples, "key": result.key,
                   "chosen": dict(sorted(__import__("collections").Counter(result.choices.values()).items()))}
    seconds, cpu1 = time.perf_counter() - start, os.times()
    print(json.dumps({"seconds": round(seconds, 2),
                      "cpu_seconds": round(cpu1.user - cpu0.user + cpu1.system - cpu0.system, 2),
                      "peak_rss_bytes": _peak_rss_bytes(), "numba": numba_available(), **figures}))


def _export(name: str, size: int, path: Path) -> None:
    import warnings

    import torch

    from rexport.models import resnet

    torch.manual_seed(0)
    model = resnet.MODELS[name](num_classes=1000).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _run_child(model: Path, method: str, cache: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(model), "--method", method, "--cache", str(cache),
           "--samples", str(args.samples), "--batch-size", str(args.batch_size), "--size", str(args.size)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures.update(status="ok", process_seconds=round(wall, 2), load_before=round(load, 2),
                   load_after=round(os.getloadavg()[0], 2))
    return figures


def _environment() -> dict:
    import numpy
    import onnx
    import onnxruntime

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": numpy.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    from rexport.core.machine import machine_fingerprint

    machine = machine_fingerprint()  # before the runs: the probe's own seconds are not part of them
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_calibration.") as tmp:
        for name in args.models:
            model = Path(tmp) / f"{name}.fp32.onnx"
            _export(name, args.size, model)
            plain = [_run_child(model, "plain", Path(tmp) / "unused", args)]
            nospin = _run_child(model, "plain-nospin", Path(tmp) / "unused", args)
            same = _run_child(model, "plain-same", Path(tmp) / "unused", args)
            model_rows = []
            for method in args.methods:
                cache = Path(tmp) / f"cache-{name}-{method}"
                cold = _run_child(model, method, cache, args)
                warm = _run_child(model, method, cache, args)
                model_rows.append({"model": name, "method": method, "cold": cold, "reused": warm})
                if method == "entropy" and "auto" in args.methods:  # the per-tensor choice from entropy's statistics
                    model_rows.append({"model": name, "method": "auto after entropy",
                                       "cold": _run_child(model, "auto", cache, args), "reused": {}})
            plain.append(_run_child(model, "plain", Path(tmp) / "unused", args))
            ok = [p for p in plain if p["status"] == "ok"]
            base = ({"seconds": sum(p["seconds"] for p in ok) / len(ok),
                     "cpu_seconds": sum(p["cpu_seconds"] for p in ok) / len(ok)} if ok else None)
            floor = ({"cpu": round(same["cpu_seconds"] / base["cpu_seconds"], 3),
                      "wall": round(same["seconds"] / base["seconds"], 3)} if base and same["status"] == "ok" else None)
            rows.append({"model": name, "method": "plain ORT FP32 pass", "runs": plain, "mean": base,
                         "no_spinning": nospin, "same_options": same, "same_options_ratio": floor})
            if floor:
                print(f"{name}: a plain pass with calibration's session options (basic optimization, no spinning) "
                      f"takes {floor['wall']:.2f}x wall, {floor['cpu']:.2f}x CPU of the default plain pass")
            for row in model_rows:
                cold = row["cold"]
                if cold["status"] == "ok" and base:
                    row["ratio_wall"] = round(cold["seconds"] / base["seconds"], 3)
                    row["ratio_cpu"] = round(cold["cpu_seconds"] / base["cpu_seconds"], 3)
                    if nospin["status"] == "ok":
                        row["ratio_cpu_vs_no_spinning"] = round(cold["cpu_seconds"] / nospin["cpu_seconds"], 3)
                    if same["status"] == "ok":
                        row["ratio_wall_vs_same_options"] = round(cold["seconds"] / same["seconds"], 3)
                        row["ratio_cpu_vs_same_options"] = round(cold["cpu_seconds"] / same["cpu_seconds"], 3)
                    target = TARGET_RATIO.get(row["method"])
                    row["target_ratio"] = target
                    row["meets_target_cpu"] = None if target is None else row["ratio_cpu"] <= target
                    row["meets_target_wall"] = None if target is None else row["ratio_wall"] <= target
                    row["meets_memory_target"] = cold["peak_rss_bytes"] < TARGET_PEAK_GB * 2**30
                    row["cache_reused"] = row["reused"].get("reused") is True if row["reused"] else None
                rows.append(row)
                _print_row(row, base)
                sys.stdout.flush()

    doc = {"benchmark": "calibration", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "settings": {"samples": args.samples, "batch_size": args.batch_size, "input_size": args.size,
                        "data": "synthetic"},
           "targets": {"ratio_to_plain_pass": TARGET_RATIO, "peak_rss_gb": TARGET_PEAK_GB},
           "machine": machine, "environment": _environment(), "load_average_at_end": os.getloadavg(),
           "results": rows,
           "notes": "ratio_*: calibration / the mean of two plain ORT FP32 passes (default session, same images, "
                    "same batch size) measured in this run, before and after the model's calibrations. seconds: "
                    "wall time in a fresh process (session creation included in both); cpu_seconds: its "
                    "user+system time over all threads; peak_rss_bytes: VmHWM of that process; load_*: 1-min "
                    "load average around the run (other work on the machine inflates wall time more than CPU "
                    "time); ratio_cpu_vs_no_spinning: against a plain pass whose idle ORT threads do not spin "
                    "(as calibration's own session), the stricter CPU comparison. ratio_*_vs_same_options: against a plain pass with "
                    "exactly calibration's session options (rexport.calibration.session.session_options: basic graph "
                    "optimization, which keeps the ranges bit-identical, no spinning): what collecting the statistics "
                    "costs on top of running the model; same_options_ratio: that pass against the default one, the "
                    "floor the ratios to the default pass cannot go under while the ranges stay identical. 'auto after entropy' reuses entropy's cached statistics: no pass over the data."}
    from rexport.core.fsio import atomic_write_json

    atomic_write_json(args.out, doc)
    print(f"wrote {args.out}")
    failed = [r for r in rows if "cold" in r and r["cold"]["status"] != "ok"]
    return 1 if failed else 0


def _print_row(row: dict, base: dict | None) -> None:
    if not hasattr(_print_row, "header"):
        print(f"{'model':<10} {'method':<19} {'seconds':>8} {'cpu s':>7} {'x wall':>7} {'x cpu':>6} {'x cpu*':>7} "
              f"{'x same':>7} {'peak GB':>8} {'load':>5} {'reused s':>9}   (x cpu*: CPU vs a plain pass without "
              "spinning; x same: CPU vs a plain pass with calibration's session options)")
        _print_row.header = True  # type: ignore[attr-defined]
    c, w = row["cold"], row["reused"]
    if c["status"] != "ok":
        print(f"{row['model']:<10} {row['method']:<19} FAILED: {c['error']}")
        return
    print(f"{row['model']:<10} {row['method']:<19} {c['seconds']:>8.1f} {c['cpu_seconds']:>7.1f} "
          f"{row.get('ratio_wall', float('nan')):>7.2f} {row.get('ratio_cpu', float('nan')):>6.2f} "
          f"{row.get('ratio_cpu_vs_no_spinning', float('nan')):>7.2f} "
          f"{row.get('ratio_cpu_vs_same_options', float('nan')):>7.2f} "
          f"{c['peak_rss_bytes'] / 2**30:>8.2f} {c['load_before']:>5.1f} {w.get('seconds', float('nan')):>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
