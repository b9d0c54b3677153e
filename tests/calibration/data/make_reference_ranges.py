"""Write reference_ranges.json: the ranges calibration computed before the single-pass rewrite.

Run once with the implementation the fixture is meant to pin (it was made with commit b2a82d4's
calibration/statistics.py); the tests compare every later implementation with it.

    .venv/bin/python tests/calibration/data/make_reference_ranges.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from reference_case import (METHODS, NUM_BINS, PERCENTILE, SAMPLES, export_model,  # noqa: E402
                            synthetic_statistics)

from rexport.calibration import CalibrationSettings, compute_ranges, open_reader_for  # noqa: E402
from rexport.calibration.statistics import collect  # noqa: E402
from rexport.core.preprocess import PreprocessSpec  # noqa: E402


def main() -> None:
    import onnxruntime

    doc: dict = {"made_with": {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
                 "percentile": PERCENTILE, "num_bins": NUM_BINS}
    stats = synthetic_statistics()
    doc["synthetic_statistics"] = {m: compute_ranges(stats, m, percentile=PERCENTILE) for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        model = export_model(Path(tmp) / "model.fp32.onnx")
        settings = CalibrationSettings(samples=SAMPLES, batch_size=8, seed=0)
        reader = open_reader_for("synthetic", PreprocessSpec(input_size=64, resize=73), settings)
        stats = collect(model, reader, histograms=True, num_bins=NUM_BINS, max_samples=SAMPLES)
    doc["resnet18_64px"] = {
        "minmax_per_tensor": {n: [st.min, st.max] for n, st in stats.tensors.items()},
        **{m: compute_ranges(stats, m, percentile=PERCENTILE) for m in METHODS}}
    (HERE / "reference_ranges.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
