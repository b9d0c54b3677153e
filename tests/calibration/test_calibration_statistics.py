"""The range computations on known distributions, against plain reference implementations."""
from __future__ import annotations

import numpy as np
import pytest

from rexport.calibration.statistics import (AbsHistogram, ActivationStatistics, TensorStatistics, compute_ranges,
                                            entropy_amax, entropy_divergences, percentile_amax)
from rexport.core.errors import InputError


def kl_reference(counts: np.ndarray, levels: int = 128) -> np.ndarray:
    """TensorRT's entropy search written as the plain loop it is described as."""
    h = counts.astype(np.float64)
    out = []
    for i in range(levels, len(h) + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()
        group = (np.arange(i) * levels) // i
        q_sum = np.bincount(group, weights=h[:i], minlength=levels)
        q_nz = np.bincount(group, weights=(p > 0).astype(float), minlength=levels)
        q = np.where(p > 0, q_sum[group] / np.maximum(q_nz[group], 1), 0.0)
        P = p / p.sum()
        Q = q / q.sum() if q.sum() > 0 else q
        mask = P > 0
        if (Q[mask] == 0).any():
            out.append(np.inf)
        else:
            out.append(float((P[mask] * np.log(P[mask] / Q[mask])).sum()))
    return np.array(out)


def _hist(values: np.ndarray, bins: int = 2048) -> AbsHistogram:
    a = np.abs(values)
    counts, _ = np.histogram(a, bins, (0, a.max()))
    return AbsHistogram(counts.astype(np.float64), float(a.max()))


@pytest.mark.parametrize("case", ["heavy_tail", "relu_like", "gaps", "sparse"])
def test_entropy_divergences_match_the_plain_loop(case: str) -> None:
    rng = np.random.default_rng(7)
    if case == "heavy_tail":
        counts = _hist(rng.standard_t(3, 100_000)).counts
    elif case == "relu_like":
        counts = _hist(np.maximum(rng.standard_normal(100_000), 0)).counts
    elif case == "gaps":
        counts = _hist(rng.standard_normal(100_000)).counts
        counts[300:900] = 0
        counts[1200:2047] = 0
    else:
        counts = rng.integers(0, 4, 2048) * (rng.random(2048) < 0.2)
        counts[-1] = 1
    cand, kl = entropy_divergences(counts)
    ref = kl_reference(counts)
    assert cand[0] == 128 and cand[-1] == 2048 and len(kl) == len(ref)
    np.testing.assert_array_equal(np.isfinite(kl), np.isfinite(ref))
    np.testing.assert_allclose(kl[np.isfinite(kl)], ref[np.isfinite(ref)], rtol=1e-9, atol=1e-12)
    assert np.isfinite(kl[-1])  # clipping nothing is always a valid candidate


def test_entropy_and_percentile_clip_outliers_minmax_keeps_them() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1_000_000).astype(np.float32)
    x[:3] = [40.0, -35.0, 38.0]
    hist = _hist(x)
    entropy = entropy_amax(hist)
    assert 2.0 < entropy < 10.0, entropy
    p = percentile_amax(hist, 99.99)
    expected = np.percentile(np.abs(x), 99.99)
    assert abs(p - expected) <= hist.bin_width, (p, expected)
    stats = ActivationStatistics({"t": TensorStatistics(float(x.min()), float(x.max()), hist)})
    assert compute_ranges(stats, "minmax")["t"] == pytest.approx(40.0)
    assert compute_ranges(stats, "entropy")["t"] == pytest.approx(entropy, rel=1e-6)
    assert compute_ranges(stats, "percentile", percentile=99.99)["t"] == pytest.approx(p, rel=1e-6)


def test_streaming_histogram_rebins_onto_the_running_absmax() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal(50_000).astype(np.float32) * scale for scale in (0.5, 1.0, 1.0, 3.0, 2.0, 4.0)]
    hist = AbsHistogram.empty(2048)
    for b in batches:
        a = np.abs(b)
        hist.add_abs(a.copy(), float(a.max()))
    everything = np.abs(np.concatenate(batches))
    assert hist.top == pytest.approx(float(everything.max()))
    assert hist.counts.sum() == pytest.approx(everything.size)
    for q in (50.0, 90.0, 99.0, 99.9):
        assert abs(percentile_amax(hist, q) - np.percentile(everything, q)) < 2 * hist.bin_width, q
    # re-binning only smears counts within a bin or so: the CDF stays that of a one-shot histogram
    one_shot = _hist(np.concatenate(batches))
    cdf_gap = np.abs(np.cumsum(hist.counts) - np.cumsum(one_shot.counts)).max() / everything.size
    assert cdf_gap < 0.003, cdf_gap


def test_all_zero_tensor_gets_a_tiny_positive_range() -> None:
    hist = AbsHistogram.empty(2048)
    hist.add_abs(np.zeros(100, np.float32), 0.0)
    stats = ActivationStatistics({"zeros": TensorStatistics(0.0, 0.0, hist)})
    for method in ("minmax", "percentile", "entropy"):
        amax = compute_ranges(stats, method)["zeros"]
        assert 0 < amax < 1e-6


def test_nan_activation_is_an_input_error() -> None:
    stats = ActivationStatistics({"t": TensorStatistics(histogram=AbsHistogram.empty(2048))})
    with pytest.raises(InputError, match="NaN or infinite"):
        stats.update("t", float("nan"), 1.0, np.array([np.nan, 1.0], np.float32))


def test_unknown_method_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown calibration method"):
        compute_ranges(ActivationStatistics(), "kl")


def test_entropy_leaves_exact_zeros_out_and_percentile_keeps_them() -> None:
    rng = np.random.default_rng(3)
    batches = [np.maximum(rng.standard_normal(200_000).astype(np.float32), 0) for _ in range(3)]
    streamed, nonzero_only = AbsHistogram.empty(2048), AbsHistogram.empty(2048)
    for b in batches:
        streamed.add_abs(b.copy(), float(b.max()))
        nz = b[b != 0]
        nonzero_only.add_abs(nz.copy(), float(nz.max()))
    everything = np.concatenate(batches)
    assert streamed.zeros == np.count_nonzero(everything == 0) > 0.45 * everything.size
    assert streamed.total == everything.size
    np.testing.assert_allclose(streamed.counts, nonzero_only.counts)
    amax = entropy_amax(streamed)
    assert amax == entropy_amax(nonzero_only)
    # with the ReLU zeros as a spike in bin 0, KL would clip far harder: the bias this avoids
    spiked = AbsHistogram(streamed.counts.copy(), streamed.top)
    spiked.counts[0] += streamed.zeros
    assert entropy_amax(spiked) < 0.8 * amax
    for q in (40.0, 75.0, 99.9):
        assert abs(percentile_amax(streamed, q) - np.percentile(everything, q)) < 2 * streamed.bin_width, q
