"""Streaming |x| histograms: the one structure every histogram method (entropy, percentile, mse,
auto) computes its range from, and the fold that adds a batch to it.

The fold is the hot loop of calibration (ResNet-50 at 224 has 26.6 M activation values per image).
numpy needs six passes per value for it (abs, count zeros, scale, cast to intp, clip, bincount: about
7 ns per value here, as long as the ONNX Runtime pass itself); with numba installed
(``pip install 'rexport[fast]'``) blocked kernels do it (``_fold_numba``: 1.7 ns per fetched value
on ResNet-18, a Relu output folded from the same read included; 8% of the ONNX Runtime pass). Both
give the same counts: the bin index is computed with the same float32 multiply and truncation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass
class AbsHistogram:
    """Counts of |x| in ``len(counts)`` equal bins over [0, ``top``], exact zeros counted apart in
    ``zeros`` (not in bin 0).

    The range follows the running absmax. When a batch exceeds it, the old counts are re-binned
    onto the wider range by linear interpolation of their cumulative distribution (each old bin's
    count spread uniformly over its width and split between the new bins it overlaps); counts are
    float64 for that reason. The error this adds is at most one (new, coarser) bin per re-binning,
    and the final range is exactly the absmax seen, as TensorRT's two-pass histogram has it.
    """

    counts: np.ndarray
    top: float = 0.0
    zeros: float = 0.0

    @classmethod
    def empty(cls, num_bins: int) -> "AbsHistogram":
        return cls(np.zeros(num_bins, np.float64), 0.0)

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self.zeros

    @property
    def num_bins(self) -> int:
        return len(self.counts)

    @property
    def bin_width(self) -> float:
        return self.top / self.num_bins

    def _widen(self, top: float) -> None:
        if self.top > 0 and self.counts.any():
            old_edges = np.linspace(0.0, self.top, self.num_bins + 1)
            old_cdf = np.concatenate(([0.0], np.cumsum(self.counts)))
            new_edges = np.linspace(0.0, top, self.num_bins + 1)
            self.counts = np.diff(np.interp(new_edges, old_edges, old_cdf))
        else:
            self.counts[:] = 0.0
        self.top = top

    def scale_for(self, absmax: float) -> np.float32 | None:
        """Widen to ``absmax`` if needed; the float32 factor from |x| to its bin (None: nothing to bin)."""
        if absmax <= 0.0:
            return None
        if absmax > self.top:
            self._widen(absmax)
        return np.float32(self.num_bins / self.top)

    def add_counts(self, counts: np.ndarray, zeros: int) -> None:
        """Add a batch's bin counts (exact zeros counted in bin 0) and its number of exact zeros."""
        self.zeros += zeros
        counts[0] -= zeros
        self.counts += counts

    def add_abs(self, a: np.ndarray, absmax: float) -> None:
        """Add the values of ``a`` (already |x|, any shape; overwritten) whose maximum is ``absmax``.
        numpy only; raises ValueError on a NaN (it casts to a negative index, which bincount refuses)."""
        zeros = a.size - np.count_nonzero(a)
        scale = self.scale_for(absmax)
        if scale is None:
            self.zeros += zeros
            return
        np.multiply(a, scale, out=a)
        with np.errstate(invalid="ignore"):
            idx = a.astype(np.intp).ravel()
        np.minimum(idx, self.num_bins - 1, out=idx)
        self.add_counts(np.bincount(idx, minlength=self.num_bins), zeros)


class NotFinite(ValueError):
    """A batch held a NaN (or an infinity) where a histogram was to be folded."""


def fold(x: np.ndarray, lo: float, hi: float, hist: AbsHistogram, relu_hist: AbsHistogram | None = None, *,
         owned: bool = False) -> None:
    """Add the batch ``x`` (min ``lo``, max ``hi``, as numpy computes them: a NaN propagates) to
    ``hist`` and, when given, ``max(x, 0)`` to ``relu_hist`` (a Relu output, folded from its input
    without ONNX Runtime returning it). ``x`` is overwritten only when ``owned`` and numba is
    missing. Raises NotFinite, also where ``lo`` or ``hi`` is not finite."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise NotFinite()
    kernels = _kernels()
    flat = x.reshape(-1)
    if kernels is not None and flat.dtype == np.float32:
        _fold_with_kernels(kernels, flat, lo, hi, hist, relu_hist)
        return
    try:
        if relu_hist is not None:
            relu_hist.add_abs(np.maximum(flat, np.float32(0.0)), max(hi, 0.0))
        a = flat if owned else flat.copy()
        if lo < 0:
            np.abs(a, out=a)
        hist.add_abs(a, max(-lo, hi))
    except ValueError:
        raise NotFinite() from None


def _fold_with_kernels(kernels, flat: np.ndarray, lo: float, hi: float, hist: AbsHistogram,
                       relu_hist: AbsHistogram | None) -> None:
    scale = hist.scale_for(max(-lo, hi))
    relu_scale = relu_hist.scale_for(max(hi, 0.0)) if relu_hist is not None else None
    nb, tables = hist.num_bins, kernels.TABLES
    if scale is None:  # all zeros: nothing to bin (and max(x, 0) is all zeros too)
        hist.zeros += flat.size
        if relu_hist is not None:
            relu_hist.zeros += flat.size
        return
    if relu_scale is None:  # no Relu, or max(x, 0) is all zeros
        _abs_into(kernels, flat, scale, hist)
        if relu_hist is not None:
            relu_hist.zeros += flat.size
        return
    if relu_scale == scale and relu_hist.num_bins == nb:  # one count per value serves both
        counts = np.zeros((tables, 2 * nb), np.int32)
        zeros = int(kernels.abs_counts(flat, scale, counts, True))
        split = counts.sum(axis=0)
        positive = split[nb:]
        relu_hist.add_counts(positive.copy(), 0)
        relu_hist.zeros += flat.size - int(positive.sum())
        hist.add_counts(split[:nb] + positive, zeros)
        return
    _abs_into(kernels, flat, scale, hist)
    relu_counts = np.zeros((tables, relu_hist.num_bins + 1), np.int32)  # + the column of the x <= 0
    kernels.positive_counts(flat, relu_scale, relu_counts)
    positive = relu_counts[:, :-1].sum(axis=0)
    relu_hist.add_counts(positive, 0)
    relu_hist.zeros += flat.size - int(positive.sum())


def _abs_into(kernels, flat: np.ndarray, scale, hist: AbsHistogram) -> None:
    """|x| at ``scale`` into ``hist``, exact zeros counted apart."""
    counts = np.zeros((kernels.TABLES, hist.num_bins), np.int32)
    zeros = int(kernels.abs_counts(flat, scale, counts, False))
    hist.add_counts(counts.sum(axis=0), zeros)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The numba kernels (compiled once, then loaded from numba's on-disk cache); None without numba."""
    try:
        import numba
    except ImportError:
        return None
    from rexport.calibration import _fold_numba

    return _fold_numba


def numba_available() -> bool:
    return _kernels() is not None
