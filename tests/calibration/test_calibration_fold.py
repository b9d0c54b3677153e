"""numba's fold gives exactly the counts of the numpy fold, in each of its kernels: |x| alone, |x|
and a Relu output at one scale (one count per value serves both), at two scales (a second pass),
and the all-zero / all-negative edges. A batch whose min or max is not finite is refused."""
from __future__ import annotations

import numpy as np
import pytest

from rexport.calibration import histogram
from rexport.calibration.histogram import AbsHistogram, NotFinite, fold

pytestmark = pytest.mark.skipif(not histogram.numba_available(), reason="numba is not installed")

BINS = 2048


def _batches(kind: str):
    """Seeded float32 batches (a few thousand values, odd sizes: the block tails) for each branch."""
    rng = np.random.default_rng(7)
    for step in range(4):
        x = rng.standard_normal(3001 + 517 * step, dtype=np.float32) * np.float32(1 + step)
        x[:: 5 + step] = 0.0
        if kind == "same":  # the positive side holds the absmax: both histograms share the scale
            x[0] = np.float32(50.0 * (step + 1))
        elif kind == "different":  # the negative side holds it: the Relu histogram's scale is finer
            x[0] = np.float32(-50.0 * (step + 1))
        elif kind == "negative":
            x = -np.abs(x)
        elif kind == "zeros":
            x[:] = 0.0
        yield x


def _fold_all(kind: str, *, relu: bool) -> tuple[AbsHistogram, AbsHistogram | None]:
    hist, relu_hist = AbsHistogram.empty(BINS), AbsHistogram.empty(BINS) if relu else None
    for x in _batches(kind):
        fold(x, float(x.min()), float(x.max()), hist, relu_hist)
    return hist, relu_hist


@pytest.mark.parametrize("kind", ["same", "different", "negative", "zeros", "plain"])
@pytest.mark.parametrize("relu", [True, False])
def test_numba_fold_counts_exactly_as_numpy(kind: str, relu: bool, monkeypatch) -> None:
    fast = _fold_all(kind, relu=relu)
    monkeypatch.setattr(histogram, "_kernels", lambda: None)
    slow = _fold_all(kind, relu=relu)
    for a, b in zip(fast, slow):
        if a is None:
            continue
        assert (a.top, a.zeros) == (b.top, b.zeros)
        np.testing.assert_array_equal(a.counts, b.counts)
    if relu and kind in ("negative", "zeros"):
        assert fast[1].total == fast[1].zeros > 0  # max(x, 0) is all zeros


def test_same_and_different_scales_take_their_kernels(monkeypatch) -> None:
    """The two Relu branches are what the cases above exercise (else they would test one path twice)."""
    calls: list[tuple] = []
    kernels = histogram._kernels()

    class Spy:
        TABLES = kernels.TABLES

        def __getattr__(self, name):
            def call(*args):
                calls.append((name, *args[3:]))  # the kernel and its flags
                return getattr(kernels, name)(*args)
            return call

    monkeypatch.setattr(histogram, "_kernels", lambda: Spy())
    _fold_all("same", relu=True)
    assert set(calls) == {("abs_counts", True)}
    calls.clear()
    _fold_all("different", relu=True)
    assert set(calls) == {("abs_counts", False), ("positive_counts",)}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_batch_with_nan_or_inf_is_refused(bad: float) -> None:
    x = np.ones(100, np.float32)
    x[3] = bad
    with pytest.raises(NotFinite):
        fold(x, float(x.min()), float(x.max()), AbsHistogram.empty(BINS), AbsHistogram.empty(BINS))
