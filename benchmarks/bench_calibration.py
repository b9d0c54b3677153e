"""Calibration time and peak memory: ResNet-18/50 at 224x224, 512 synthetic images, every method.

Each calibration runs in its own process (which imports rexport.calibration, not torch), so its peak
RSS (VmHWM) is the calibration's own; a second run on the same cache shows the reuse. Figures go to
benchmarks/results/calibration.json and a table on stdout.

    .venv/bin/python benchmarks/bench_calibration.py [--models resnet18 resnet50] [--samples 512]
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
TARGET_SECONDS = {"resnet18": 60.0}  # per method, on the 2-core development machine
TARGET_PEAK_GB = 3.0
METHODS = ("minmax", "percentile", "entropy")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> None:
    """Calibrate once and print one JSON line of figures."""
    from rexport.calibration import CalibrationSettings, calibrate, open_reader_for
    from rexport.core.preprocess import PreprocessSpec

    settings = CalibrationSettings(method=args.method, samples=args.samples, batch_size=args.batch_size)
    reader = open_reader_for("synthetic", PreprocessSpec(input_size=args.size), settings)
    cpu0, start = os.times(), time.perf_counter()
    result = calibrate(args.model, reader, settings, args.cache, progress=False)
    seconds, cpu1 = time.perf_counter() - start, os.times()
    print(json.dumps({"seconds": round(seconds, 2),
                      "cpu_seconds": round(cpu1.user - cpu0.user + cpu1.system - cpu0.system, 2),
                      "peak_rss_bytes": _peak_rss_bytes(), "reused": result.reused, "tensors": len(result.ranges),
                      "samples": result.samples, "key": result.key}))


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

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_calibration.") as tmp:
        for name in args.models:
            model = Path(tmp) / f"{name}.fp32.onnx"
            _export(name, args.size, model)
            for method in args.methods:
                cache = Path(tmp) / f"cache-{name}-{method}"
                cold = _run_child(model, method, cache, args)
                warm = _run_child(model, method, cache, args)
                row = {"model": name, "method": method, "cold": cold, "reused": warm}
                if cold["status"] == "ok":
                    limit = TARGET_SECONDS.get(name)
                    row["meets_time_target"] = None if limit is None else cold["seconds"] < limit
                    row["meets_memory_target"] = cold["peak_rss_bytes"] < TARGET_PEAK_GB * 2**30
                    row["cache_reused"] = warm.get("reused") is True
                rows.append(row)
                _print_row(row)
                sys.stdout.flush()

    doc = {"benchmark": "calibration", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "settings": {"samples": args.samples, "batch_size": args.batch_size, "input_size": args.size,
                        "data": "synthetic"},
           "targets": {"seconds_per_method": TARGET_SECONDS, "peak_rss_gb": TARGET_PEAK_GB},
           "environment": _environment(), "results": rows,
           "notes": "seconds: wall time of calibrate() in a fresh process; cpu_seconds: its user+system time; "
                    "peak_rss_bytes: VmHWM of that process; load_*: 1-min load average around the run "
                    "(other work on the machine inflates wall time, not CPU time)."}
    from rexport.core.fsio import atomic_write_json

    atomic_write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0 if all(r["cold"]["status"] == "ok" and r["reused"].get("reused") for r in rows) else 1


def _print_row(row: dict) -> None:
    if not hasattr(_print_row, "header"):
        print(f"{'model':<10} {'method':<11} {'seconds':>8} {'cpu s':>7} {'peak GB':>8} {'load':>5} "
              f"{'reused s':>9} {'targets':>8}")
        _print_row.header = True  # type: ignore[attr-defined]
    c, w = row["cold"], row["reused"]
    if c["status"] != "ok":
        print(f"{row['model']:<10} {row['method']:<11} FAILED: {c['error']}")
        return
    ok = row["meets_memory_target"] and row["meets_time_target"] is not False and row["cache_reused"]
    print(f"{row['model']:<10} {row['method']:<11} {c['seconds']:>8.1f} {c['cpu_seconds']:>7.1f} "
          f"{c['peak_rss_bytes'] / 2**30:>8.2f} {c['load_before']:>5.1f} "
          f"{w.get('seconds', float('nan')):>9.2f} {'ok' if ok else 'MISSED':>8}")


if __name__ == "__main__":
    sys.exit(main())
