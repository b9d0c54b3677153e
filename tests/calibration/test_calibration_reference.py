"""The single-pass collection gives exactly the ranges of the implementation it replaced.

data/reference_ranges.json was written by data/make_reference_ranges.py with the old implementation
(every activation returned by ONNX Runtime at ORT_ENABLE_BASIC and folded by numpy). The same fixed
inputs must give the same ranges, bit for bit, with numba's fused fold and with the numpy one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rexport.calibration import CalibrationSettings, compute_ranges, open_reader_for
from rexport.calibration import histogram
from rexport.calibration.statistics import collect
from rexport.core.preprocess import PreprocessSpec

from reference_case import METHODS, NUM_BINS, PERCENTILE, SAMPLES, export_model, synthetic_statistics

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_ranges.json").read_text())


@pytest.fixture(params=["numba", "numpy"])
def fold_path(request, monkeypatch):
    if request.param == "numba":
        if not histogram.numba_available():
            pytest.skip("numba is not installed (pip install 'rexport[fast]')")
    else:
        monkeypatch.setattr(histogram, "_kernels", lambda: None)
    return request.param


def test_synthetic_statistics_give_the_reference_ranges(fold_path) -> None:
    """Seeded numpy batches (the same on every machine) through the fold: growing ranges, re-binning,
    exact zeros, heavy tails, an all-zero tensor."""
    stats = synthetic_statistics()
    for method in METHODS:
        assert compute_ranges(stats, method, percentile=PERCENTILE) == REFERENCE["synthetic_statistics"][method], method


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return export_model(tmp_path_factory.mktemp("reference") / "model.fp32.onnx")


def _collect(model: Path, **kw):
    settings = CalibrationSettings(samples=SAMPLES, batch_size=8, seed=0)
    reader = open_reader_for("synthetic", PreprocessSpec(input_size=64, resize=73), settings)
    return collect(model, reader, max_samples=SAMPLES, num_bins=NUM_BINS, **kw)


def test_resnet18_gives_the_reference_ranges(model: Path) -> None:
    """The real model: the same activations, so the same ranges, for every
    tensor, including those now folded from their source (Relu, Flatten) instead of fetched. (With
    numba's fold when installed; the synthetic test above covers both folds.)"""
    stats = _collect(model, histograms=True)
    ref = REFERENCE["resnet18_64px"]
    got_minmax = {n: [st.min, st.max] for n, st in stats.tensors.items()}
    assert list(got_minmax) == list(ref["minmax_per_tensor"])
    assert got_minmax == ref["minmax_per_tensor"], "ONNX Runtime computes other activations on this machine"
    for method in METHODS:
        assert compute_ranges(stats, method, percentile=PERCENTILE) == ref[method], method
    minmax_only = _collect(model, histograms=False)
    assert compute_ranges(minmax_only, "minmax") == ref["minmax"]
