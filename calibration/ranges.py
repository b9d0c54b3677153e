"""Range methods: one symmetric amax from a tensor's |x| histogram (percentile, entropy, mse)."""
from __future__ import annotations

import numpy as np

from rexport.calibration.histogram import AbsHistogram

INT8_LEVELS = 128  # quantized bins of |x| for symmetric int8: 0..127
INT8_MAX = 127  # the largest quantized level: scale = amax / 127
MSE_STRIDES = (32, 4, 1)  # the mse search: a grid of every 32 bins, refined around its best


def percentile_amax(hist: AbsHistogram, percentile: float) -> float:
    """The ``percentile`` of |x| (exact zeros included), interpolated linearly inside the bin where
    the CDF crosses it."""
    total = hist.total
    if total <= 0 or hist.top <= 0:
        return 0.0
    cdf = (hist.zeros + np.cumsum(hist.counts)) / total
    target = percentile / 100.0
    if target <= hist.zeros / total:
        return 0.0
    k = int(np.searchsorted(cdf, target, side="left"))
    if k >= hist.num_bins:
        return hist.top
    below = cdf[k - 1] if k > 0 else hist.zeros / total
    frac = (target - below) / (cdf[k] - below) if cdf[k] > below else 1.0
    return float(min(hist.top, (k + frac) * hist.bin_width))


def entropy_divergences(counts: np.ndarray, levels: int = INT8_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every clipping candidate ``i`` in [levels, len(counts)] bins: TensorRT's
    EntropyCalibration2 search, vectorised over candidates.

    For candidate i: P = counts[:i] with every count beyond bin i-1 folded into bin i-1;
    Q = counts[:i] merged into ``levels`` groups (bin k in group floor(k * levels / i)), each
    group's sum spread evenly over the bins where P is non-zero, zero elsewhere. Both are
    normalised. A candidate where P has mass and Q none is infinitely bad (the last candidate,
    which clips nothing, is always finite). Returns (candidates, divergences).
    """
    h = np.asarray(counts, np.float64)
    n = len(h)
    cand = np.arange(levels, n + 1)
    total = h.sum()
    cum = np.concatenate(([0.0], np.cumsum(h)))
    nonzero = np.concatenate(([0], np.cumsum(h > 0)))
    hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    cum_hlogh = np.concatenate(([0.0], np.cumsum(hlogh)))

    j = np.arange(levels + 1)
    bounds = (j[None, :] * cand[:, None] + levels - 1) // levels  # ceil(j * i / levels): group starts
    group_sum = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]  # sums of raw counts, shape (M, levels)
    group_nz = (nonzero[bounds[:, 1:]] - nonzero[bounds[:, :-1]]).astype(np.float64)
    last = h[cand - 1]
    tail = total - cum[cand]
    p_last = last + tail
    group_nz[:, -1] += (last == 0) & (tail > 0)  # the folded-in outliers make P's last bin non-zero

    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.where(group_sum > 0, np.log(group_sum / np.maximum(group_nz, 1.0)), 0.0)
        # sum over k < i-1 of h_k * log q_k: every group's raw mass, minus bin i-1 which is handled apart
        mass = group_sum.copy()
        mass[:, -1] -= last
        cross = (mass * log_q).sum(axis=1)
        q_last_log = log_q[:, -1]
        last_term = np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)) - p_last * q_last_log, 0.0)
        kl = (cum_hlogh[cand - 1] - cross + last_term) / total + np.log(cum[cand] / total)
        bad = ((p_last > 0) & (group_sum[:, -1] <= 0)) | (cum[cand] <= 0)
    kl = np.where(bad, np.inf, kl)
    return cand, kl


def entropy_amax(hist: AbsHistogram, levels: int = INT8_LEVELS) -> float:
    """The clipping threshold minimising KL(P || Q) (ties go to the larger threshold).

    Exact zeros are left out (pytorch-quantization's ``skip_zeros``). Any threshold quantizes them
    exactly, but as a spike in bin 0 they make KL favour thresholds whose first group is narrow,
    i.e. hard clipping: with ReLU outputs (about half zeros) that cut ranges to 0.3-0.5 of their max
    and cost a trained digits ResNet-18 5.8 points of top-1; without the zeros, no loss."""
    if hist.top <= 0 or hist.counts.sum() <= 0:
        return 0.0
    if hist.num_bins <= levels:
        return hist.top
    return entropy_threshold(*entropy_divergences(hist.counts, levels), hist.bin_width)


def entropy_threshold(cand: np.ndarray, kl: np.ndarray, bin_width: float) -> float:
    """The amax of the smallest divergence (ties: the larger threshold)."""
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(cand[best] * bin_width)



def _saw_integral(u: np.ndarray) -> np.ndarray:
    """Integral over [0, u] of (t - round(t))^2 dt: the rounding error of a unit-step quantizer."""
    n = np.floor(u + 0.5)
    r = u - n
    return n / 12.0 + r ** 3 / 3.0


def expected_mse(hist: AbsHistogram, amaxes: np.ndarray) -> np.ndarray:
    """Expected squared error per value of symmetric int8 fake quantization with each of ``amaxes``
    (scale amax/127; rounding below amax, clipping above), |x| taken uniform inside each bin and exact
    zeros (quantized exactly) counted in the mean. Same model of the data as entropy and percentile."""
    amaxes = np.asarray(amaxes, np.float64)
    total = hist.total
    nz = np.flatnonzero(hist.counts > 0)
    if total <= 0 or len(nz) == 0:
        return np.zeros(len(amaxes))
    w = hist.bin_width
    a, b, c = nz * w, (nz + 1) * w, hist.counts[nz]
    A = amaxes[:, None]
    s = A / INT8_MAX
    lo, hi = np.minimum(a, A), np.minimum(b, A)  # the part of each bin below amax: rounding error
    rounding = s ** 3 * (_saw_integral(hi / s) - _saw_integral(lo / s))
    clo = np.maximum(a, A)  # the part above amax: clipped to amax
    clipping = ((b - A) ** 3 - (clo - A) ** 3) / 3.0 * (b > A)
    return ((rounding + clipping) * (c / (b - a))).sum(axis=1) / total


def mse_amax(hist: AbsHistogram, levels: int = INT8_LEVELS) -> float:
    """The amax (a bin edge from bin ``levels`` up, as entropy searches) with the smallest
    ``expected_mse``, searched coarse to fine: every ``MSE_STRIDES[0]`` bins, then around the best at
    each finer stride down to single bins. Ties go to the larger amax."""
    if hist.top <= 0 or hist.counts.sum() <= 0:
        return 0.0
    n = hist.num_bins
    if n <= levels:
        return hist.top
    w = hist.bin_width
    lo, hi, best = levels, n, n
    for stride in MSE_STRIDES:
        cand = np.unique(np.append(np.arange(lo, hi + 1, stride), hi))
        mse = expected_mse(hist, cand * w)
        best = int(cand[len(mse) - 1 - int(np.argmin(mse[::-1]))])
        lo, hi = max(levels, best - stride), min(n, best + stride)
    return float(best * w)
