"""`make engine MODEL=resnet18` end to end: wall time and peak memory of a fresh run (synthetic
calibration of 512 images, the CPU engines and the benchmark included), then of an unchanged rerun.

Targets (issue: one command, one report): fresh run under 3 minutes and 4 GB peak RSS on the
2-core machine; unchanged rerun under 10 seconds. Figures go to benchmarks/results/engine_run.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "engine_run.json"
TARGETS = {"fresh_seconds": 180.0, "peak_rss_gb": 4.0, "rerun_seconds": 10.0}

# Runs one command in a child and reports its wall time and the peak RSS of its process tree's
# largest member (ru_maxrss of the children of this fresh wrapper process).
_MEASURE = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": proc.returncode, "seconds": time.perf_counter() - t0,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "stdout": proc.stdout, "stderr_tail": proc.stderr[-2000:]}))
"""


def measure(cmd: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    from rexport.core.machine import machine_fingerprint

    machine = machine_fingerprint()  # before the runs: the probe's own seconds are not part of them
    env_cmd = [sys.executable, "-m", "rexport", "run", "--model", args.model, "--calib-samples", "512"]
    with tempfile.TemporaryDirectory(prefix="rexport-bench-") as tmp:
        run_dir = Path(tmp) / args.model
        cmd = env_cmd + ["--out", str(run_dir)]
        load_before = os.getloadavg()
        fresh = measure(cmd)
        rerun = measure(cmd)
        report = json.loads((run_dir / "report" / "report.json").read_text()) if fresh["rc"] == 0 else None
        bench = json.loads((run_dir / "bench" / "results.json").read_text()) if fresh["rc"] == 0 else None
    result = {
        "benchmark": "engine_run",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "rexport run --model %s --calib-samples 512 (what make engine runs)" % args.model,
        "machine": machine,
        "load_average": {"before": load_before, "after": os.getloadavg(), "cpus": os.cpu_count()},
        "targets": TARGETS,
        "fresh": {k: fresh[k] for k in ("rc", "seconds", "peak_rss_bytes")},
        "rerun": {k: rerun[k] for k in ("rc", "seconds", "peak_rss_bytes")},
        "meets": {
            "fresh_seconds": fresh["seconds"] < TARGETS["fresh_seconds"],
            "peak_rss_gb": fresh["peak_rss_bytes"] < TARGETS["peak_rss_gb"] * 1e9,
            "rerun_seconds": rerun["seconds"] < TARGETS["rerun_seconds"],
        },
        "summary": fresh["stdout"],
        "rows": report["rows"] if report else None,
        # throughput as a share of this machine's measured peak (bench rows; rexport.core.machine)
        "percent_of_probe": [{k: r.get(k) for k in ("variant", "batch", "images_per_s", "percent_of_probe")}
                            for r in (bench or {}).get("rows", []) if r.get("status") == "ok"],
        "peaks": (bench or {}).get("machine", {}).get("peaks"),
    }
    if fresh["rc"] != 0:
        result["error"] = fresh["stderr_tail"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(fresh["stdout"])
    print(f"fresh run: {fresh['seconds']:.1f} s, peak RSS {fresh['peak_rss_bytes'] / 1e9:.2f} GB "
          f"(targets {TARGETS['fresh_seconds']:.0f} s, {TARGETS['peak_rss_gb']:.0f} GB)")
    print(f"unchanged rerun: {rerun['seconds']:.1f} s (target {TARGETS['rerun_seconds']:.0f} s)")
    print(f"figures: {args.out}")
    return 0 if fresh["rc"] == 0 and rerun["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
