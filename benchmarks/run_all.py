"""`make bench`: every benchmark in this folder, one after the other (never two at once: the
machine has two cores), each writing its figures to benchmarks/results/."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["bench_engine.py", "bench_demo.py", "bench_calibration.py", "bench_int8_placement.py",
              "bench_int8_forms.py", "bench_sensitivity.py", "bench_budget_engine.py", "bench_evaluate.py"]


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)]).returncode != 0:
            failed.append(name)
    print("failed: " + ", ".join(failed) if failed else "all benchmarks finished; figures in benchmarks/results/")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
