"""numba kernels for the histogram fold (imported only when numba is installed).

Each kernel works block by block: a loop that only computes bin indices (the float32 multiply,
truncation and clip to the last bin, exactly as the numpy path computes them), then a loop that
only increments counts, spread over ``TABLES`` count tables so that runs of one bin (ReLU zeros) do
not serialise on one counter. Splitting the two is what lets the index loop run in SIMD: it measured
1.1-1.5 ns per value against 2.6-3.3 for the former one-loop kernel that did both per value.

A Relu output is folded from its input in the same read. When both histograms have the same scale
(their ranges agree, the common case) one increment per value serves both: counts are kept apart
for x > 0 and x <= 0, the |x| histogram is their sum and the Relu one the x > 0 part. Otherwise a
second pass counts the positives at the Relu scale (1.7 ns per value for both passes, measured,
against 2.4 for one loop that packed the positive values' indices).

The kernels are module-level functions so that numba's on-disk cache holds them: the closures they
replaced were compiled anew in every process (1.4 s of CPU per calibration). They do not look for
NaN: ``fold`` is given the batch's min and max, which numpy computes NaN-propagating, and refuses a
batch whose min or max is not finite; the clip to [0, last bin] keeps any index in bounds anyway.
"""
from __future__ import annotations

import numba
import numpy as np

TABLES = 2  # count tables (rows of ``counts``); 2 of int32 x 2048 (x 2 signs) stay in L1
BLOCK = 1024  # values per index block
_JIT = dict(cache=True, nogil=True, boundscheck=False)


@numba.njit(**_JIT)
def _scatter(idx, m, counts):
    """counts[t, idx[k]] += 1 for the first ``m`` indices, alternating the two tables."""
    q = m - m % 2
    for k in range(0, q, 2):
        counts[0, idx[k]] += 1
        counts[1, idx[k + 1]] += 1
    for k in range(q, m):
        counts[0, idx[k]] += 1


@numba.njit(**_JIT)
def _nonzeros(blk):
    n = 0
    for k in range(blk.shape[0]):
        n += np.int64(blk[k] != np.float32(0.0))
    return n


@numba.njit(**_JIT)
def abs_counts(x, scale, counts, split):
    """Count |x| at ``scale`` into ``counts`` (exact zeros land in bin 0); returns the number of exact
    zeros. ``counts`` is (TABLES, bins), or with ``split`` (TABLES, 2 * bins): columns [0, bins) for
    x <= 0, [bins, 2 * bins) for x > 0."""
    bins = np.int32(counts.shape[1] // 2 if split else counts.shape[1])
    offset = bins if split else np.int32(0)
    top = bins - np.int32(1)
    idx = np.empty(BLOCK, np.int32)
    n = x.shape[0]
    nonzero = 0
    for start in range(0, n, BLOCK):
        blk = x[start:start + BLOCK]
        m = blk.shape[0]
        for k in range(m):
            y = blk[k]
            idx[k] = max(min(np.int32(abs(y) * scale), top), np.int32(0)) + np.int32(y > np.float32(0.0)) * offset
        nonzero += _nonzeros(blk)
        _scatter(idx, m, counts)
    return n - nonzero


@numba.njit(**_JIT)
def positive_counts(x, scale, counts):
    """Count the x > 0 at ``scale`` into ``counts`` (TABLES, bins + 1); every x <= 0 goes to the last
    column, which is not a bin (the caller drops it: those are the Relu output's zeros)."""
    top = np.int32(counts.shape[1] - 2)
    idx = np.empty(BLOCK, np.int32)
    n = x.shape[0]
    for start in range(0, n, BLOCK):
        blk = x[start:start + BLOCK]
        m = blk.shape[0]
        for k in range(m):
            y = blk[k]
            i = max(min(np.int32(y * scale), top), np.int32(0))
            idx[k] = i if y > np.float32(0.0) else top + np.int32(1)
        _scatter(idx, m, counts)
