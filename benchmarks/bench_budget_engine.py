"""Issue 11's "done when", measured: `make engine ... ARGS="--max-accuracy-drop 0.5"` on a trained model
with an outlier channel, end to end, as a user runs it.

scikit-learn's real digits (1,000 to train and calibrate, 797 held out as --val-data), our resnet18
trained on them (``rexport.demo``), and its FP32-equivalent twin with one outlier channel in layer2.0
(``rexport.demo.outlier_twin``). Then ``make engine`` twice, with min-max calibration (the method that
breaks on outliers):
  - ``choice-on``: the default search (the per-tensor method choice first, then float fallback);
  - ``choice-off``: ``--no-budget-per-tensor-method``, so the float fallback alone must hold the budget.
Per run: exit code, wall time, the budget search (drop before and after on both splits, search time and
its ratio to the calibration time, layers changed) and every variant's accuracy on the full held-out
set. Figures go to benchmarks/results/budget_engine.json with the machine and its load.

    .venv/bin/python benchmarks/bench_budget_engine.py [--budget 0.5] [--work DIR]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "budget_engine.json"
RUNS = {"choice-on": [], "choice-off": ["--no-budget-per-tensor-method"]}


def prepare(work: Path) -> dict:
    """Digits folders, the trained checkpoint and its outlier twin (reused when already there)."""
    import rexport.demo as demo

    data = demo.write_digits(work / "digits")
    plain = work / "digits_resnet18.pth"
    if not plain.exists():
        demo.train_digits(data, plain, epochs=8)
    twin = work / "digits_resnet18_outlier.pth"
    layer = demo.outlier_twin(plain, twin)
    labels = work / "labels.txt"
    labels.write_text("\n".join(demo.DIGITS_SPEC.labels) + "\n")
    return {"data": data, "weights": twin, "labels": labels, "outlier_layer": layer}


def make_engine(prep: dict, out: Path, extra: list[str], budget: float) -> dict:
    data = prep["data"]
    args = ["--labels", str(prep["labels"]), "--input-size", "32", "--resize", "32", "--mean", "0.5,0.5,0.5",
            "--std", "0.5,0.5,0.5", "--calib-method", "minmax", "--calib-samples", str(data.n_train),
            "--max-accuracy-drop", str(budget), *extra]
    cmd = ["make", "-s", "engine", "MODEL=resnet18", f"WEIGHTS={prep['weights']}", f"CALIB={data.train}",
           f"VAL={data.val}", f"OUT={out}", f"ARGS={' '.join(args)}"]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return {"command": " ".join(cmd[:-1] + [f'ARGS="{" ".join(args)}"']), "rc": proc.returncode,
            "seconds": round(seconds, 1), "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "stdout_tail": proc.stdout[-3000:], "stderr_tail": proc.stderr[-1500:], **collect(out)}


def collect(out: Path) -> dict:
    """What the run directory says: the budget search and every variant's accuracy."""
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["stages"].get("quantize:int8", {})
    b = (q.get("summary") or {}).get("budget") or {}
    steps = [{"step": s["step"], "fix": s["fix"], "layers": s["fallback_names"],
              "selection_drop_pts": s["selection"].get("drop_pts"),
              "openvino_p50_ms_b1": s["latency"].get("p50_ms")} for s in b.get("steps", [])]
    chosen = b.get("chosen") or {}
    evals = {}
    for f in sorted((out / "eval").glob("*.json")):
        ev = json.loads(f.read_text())
        evals[ev["variant"]] = {"top1": ev["top1"], "n": ev["n"], "drop_top1_vs_reference": ev.get("drop_top1_vs_reference"),
                                "budget_splits": ev.get("budget_splits")}
    return {"quantize_status": q.get("status"), "met": b.get("met"), "message": b.get("message"),
            "search_seconds": b.get("search_seconds"), "calibration_seconds": b.get("calibration_seconds"),
            "search_over_calibration": b.get("search_over_calibration"),
            "drop_before_pts": (b.get("steps") or [{}])[0].get("selection", {}).get("drop_pts"),
            "chosen": {"fix": chosen.get("fix"), "layers": chosen.get("fallback_names"),
                       "calibration_method": chosen.get("calibration_method"),
                       "selection_drop_pts": (chosen.get("selection") or {}).get("drop_pts"),
                       "confirmation_drop_pts": (chosen.get("confirmation") or {}).get("drop_pts"),
                       "confirmation_n": (chosen.get("confirmation") or {}).get("n")},
            "splits": {k: v for k, v in (b.get("splits") or {}).items() if k in ("seed", "selection", "confirmation",
                                                                                  "left_out")},
            "steps": steps, "eval": evals, "report": str(out / "report" / "report.html")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--work", default=None, help="keep the digits, checkpoints and run dirs here")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    from rexport.core.machine import machine_fingerprint

    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="rexport-budget-")
    work = Path(args.work or tmp.name)
    prep = prepare(work)
    result = {"benchmark": "budget_engine", "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "budget_pts": args.budget, "outlier_layer": prep["outlier_layer"], "machine": machine_fingerprint(),
              "runs": {}}
    for name, extra in RUNS.items():
        r = make_engine(prep, work / f"run-{name}", extra, args.budget)
        result["runs"][name] = r
        c = r["chosen"]
        print(f"{name}: rc {r['rc']} in {r['seconds']} s; plain minmax drop {r['drop_before_pts']} pt -> "
              f"{c['fix']} {c['layers'] or ''}: selection {c['selection_drop_pts']} pt, confirmation "
              f"{c['confirmation_drop_pts']} pt; search {r['search_seconds']} s "
              f"({r['search_over_calibration']}x calibration)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"figures: {args.out}")
    if tmp:
        tmp.cleanup()
    return max(r["rc"] for r in result["runs"].values())


if __name__ == "__main__":
    raise SystemExit(main())
