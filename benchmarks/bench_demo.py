"""`make demo` measured: accuracy and agreement of every variant of a resnet18 trained on real digits.

The README's accuracy line and the default INT8 top-1 agreement gate (pipeline/validate.py,
REAL_DATA_TOLERANCES) rest on these figures: scikit-learn's 1,797 real handwritten digits, 1,000 to
train and calibrate on, 797 held out. Figures go to benchmarks/results/digits_demo.json with the machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "digits_demo.json"


def collect(run_dir: Path) -> dict:
    """Per variant: accuracy on the 797 held-out digits, agreement with PyTorch, validation metrics."""
    rows = {}
    for f in sorted((run_dir / "eval").glob("*.json")):
        ev = json.loads(f.read_text())
        rows[ev["variant"]] = {"top1": ev["top1"], "top5": ev["top5"], "n": ev["n"],
                               "agreement_top1_vs_pytorch": ev["agreement_top1_vs_reference"]}
    for f in sorted((run_dir / "validate").glob("*.json")):
        va = json.loads(f.read_text())
        rows.setdefault(va["variant"], {})["validate"] = {
            "passed": va["passed"], "samples": va["inputs"]["samples"], "inputs": va["inputs"]["kind"],
            "top1_agreement": va["metrics"]["top1_agreement"], "cosine_min": va["metrics"]["cosine_min"],
            "rel_to_range": va["metrics"]["rel_to_range"], "failures": va["failures"]}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    from rexport.core.machine import machine_fingerprint

    machine = machine_fingerprint()
    with tempfile.TemporaryDirectory(prefix="rexport-demo-") as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rexport.demo", "--out", tmp], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        rows = collect(Path(tmp) / "run")
    result = {"benchmark": "digits_demo", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python -m rexport.demo (make demo)", "machine": machine, "rc": proc.returncode,
              "seconds": round(seconds, 1), "summary": proc.stdout, "stderr_tail": proc.stderr[-2000:],
              "variants": rows}
    int8 = {v: r for v, r in rows.items() if "int8" in v and "agreement_top1_vs_pytorch" in r}
    if int8:
        result["int8_agreement_min"] = min(r["agreement_top1_vs_pytorch"] for r in int8.values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(proc.stdout[-4000:])
    for v, r in rows.items():
        if "top1" in r:
            print(f"{v:<16} top-1 {r['top1']:.2%}  agreement with PyTorch {r['agreement_top1_vs_pytorch']:.2%}")
    print(f"figures: {args.out}")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
