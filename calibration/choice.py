"""From collected statistics to ranges: one method for every tensor, or a method chosen per tensor.

The per-tensor choice ("auto") costs no data pass: every candidate's amax and both scores come from
the histogram already collected.

Criterion: keep the distribution's shape first, then the values. A candidate qualifies when its KL
divergence (TensorRT's entropy measure, at that candidate's threshold) is within ``KL_TOLERANCE`` of
the best candidate's; among those, the smallest expected quantization MSE wins. KL first because an
outlier channel (one channel x50, scaled back by the next layer's weights) makes the MSE of the tensor
itself favour keeping it, i.e. minmax, which costs a digits ResNet-18 75 points of top-1 (issue 11's
measurement), whereas entropy, which clips it, keeps FP32 accuracy; MSE second because, among shapes
that are kept equally well, clipping less is what keeps the large values that do matter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rexport.core.errors import InputError

from rexport.calibration.histogram import AbsHistogram
from rexport.calibration.ranges import (INT8_LEVELS, entropy_amax, entropy_divergences, entropy_threshold,
                                        expected_mse, mse_amax, percentile_amax)

if TYPE_CHECKING:
    from rexport.calibration.statistics import ActivationStatistics

SINGLE_METHODS = ("entropy", "minmax", "percentile", "mse")
METHODS = (*SINGLE_METHODS, "auto")
CANDIDATES = ("entropy", "percentile", "mse", "minmax")  # also the order ties are broken in
KL_TOLERANCE = 0.25  # a candidate qualifies with KL <= (1 + 0.25) x the best candidate's KL
EPSILON = 1e-8  # the amax of an all-zero tensor (a scale of 0 is not a valid quantization scale)
CRITERION = (f"per tensor, among {'/'.join(CANDIDATES)}: the smallest expected int8 MSE among the candidates "
             f"whose KL divergence is within {KL_TOLERANCE:.0%} of the best candidate's")


@dataclass(frozen=True)
class TensorChoice:
    """The method chosen for one tensor, its amax, and every candidate's amax and scores."""

    method: str
    amax: float
    candidates: dict[str, float] = field(default_factory=dict)  # method -> amax
    mse: dict[str, float] = field(default_factory=dict)  # method -> expected quantization MSE per value
    kl: dict[str, float] = field(default_factory=dict)  # method -> KL divergence at its threshold

    def to_dict(self) -> dict:
        return {"method": self.method, "amax": self.amax,
                "candidates": {m: {"amax": a, "mse": _finite(self.mse[m]), "kl": _finite(self.kl[m])}
                               for m, a in self.candidates.items()}}


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None  # JSON has no inf


def _amax(method: str, absmax: float, hist: AbsHistogram | None, percentile: float,
          divergences: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """One method's amax (``divergences``: entropy's, when the caller has them already)."""
    if method == "minmax":
        amax = absmax
    elif hist is None:
        raise ValueError(f"{method} calibration needs histograms: collect(..., histograms=True)")
    elif method == "percentile":
        amax = percentile_amax(hist, percentile)
    elif method == "entropy":
        amax = entropy_amax(hist) if divergences is None else entropy_threshold(*divergences, hist.bin_width)
    else:
        amax = mse_amax(hist)
    amax = float(np.float32(amax))  # ranges are float32 values, exactly representable in JSON
    return amax if amax > EPSILON else EPSILON


def choose_tensor(absmax: float, hist: AbsHistogram, *, percentile: float = 99.99,
                  candidates: tuple[str, ...] = CANDIDATES) -> TensorChoice:
    """The per-tensor choice for one tensor (see the module docstring for the criterion)."""
    divergences = (entropy_divergences(hist.counts)
                   if hist.top > 0 and hist.counts.sum() > 0 and hist.num_bins > INT8_LEVELS else None)
    amaxes = {m: _amax(m, absmax, hist, percentile, divergences) for m in candidates}
    mse = dict(zip(amaxes, expected_mse(hist, np.array(list(amaxes.values()))).tolist()))
    kl = {m: math.inf for m in amaxes}
    if divergences is not None:
        cand, div = divergences
        for m, a in amaxes.items():  # the candidate threshold (in bins) that each amax falls in
            i = int(np.clip(math.ceil(a / hist.bin_width - 1e-6), cand[0], cand[-1]))
            kl[m] = float(div[i - cand[0]])
    else:  # nothing to clip: every candidate is the same range
        kl = {m: 0.0 for m in amaxes}
    best_kl = min(kl.values())
    allowed = [m for m in amaxes if kl[m] <= best_kl * (1 + KL_TOLERANCE) + 1e-12] or list(amaxes)
    method = min(allowed, key=lambda m: (mse[m], candidates.index(m)))
    return TensorChoice(method, amaxes[method], amaxes, mse, kl)


def choose_ranges(stats: "ActivationStatistics", *, percentile: float = 99.99,
                  candidates: tuple[str, ...] = CANDIDATES) -> dict[str, TensorChoice]:
    """A method per tensor from the statistics already collected (min/max and histograms); no data pass."""
    unknown = [m for m in candidates if m not in SINGLE_METHODS]
    if unknown or not candidates:
        raise InputError(f"unknown per-tensor candidate methods {unknown or list(candidates)}",
                         f"use some of {', '.join(SINGLE_METHODS)}")
    out = {}
    for name, st in stats.tensors.items():
        if st.histogram is None:
            raise ValueError("auto calibration needs histograms: collect(..., histograms=True)")
        out[name] = choose_tensor(st.absmax, st.histogram, percentile=percentile, candidates=candidates)
    return out


def compute_ranges(stats: "ActivationStatistics", method: str, *, percentile: float = 99.99) -> dict[str, float]:
    """One symmetric amax (> 0) per tensor, in graph order."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}", f"use one of {', '.join(METHODS)}")
    if method == "auto":
        return {name: c.amax for name, c in choose_ranges(stats, percentile=percentile).items()}
    return {name: _amax(method, st.absmax, st.histogram, percentile) for name, st in stats.tensors.items()}
