"""Streaming activation statistics on the FP32 ONNX model: one pass collects what every method needs.

``collect`` runs an augmented copy of the model in ONNX Runtime (see ``session``) batch by batch and
folds each batch into per-tensor running min/max and, for the histogram methods, a fixed-size
histogram of |x| (see ``histogram``). Memory is two runs' activations (capped at ``MAX_RUN_BYTES``
each by splitting batches) plus ``num_bins`` counts per tensor, whatever the batch size and the
number of samples. ``compute_ranges`` (``choice``) then turns the statistics into one symmetric amax
per tensor.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError

from rexport.calibration.choice import EPSILON, METHODS, compute_ranges
from rexport.calibration.histogram import AbsHistogram, NotFinite, fold
from rexport.calibration.ranges import INT8_LEVELS, entropy_amax, entropy_divergences, mse_amax, percentile_amax
from rexport.calibration.readers import CalibrationReader
from rexport.calibration.session import activation_tensors, augmented_session, collection_plan, run_batches

__all__ = ["EPSILON", "INT8_LEVELS", "MAX_RUN_BYTES", "METHODS", "AbsHistogram", "ActivationStatistics",
           "TensorStatistics", "activation_tensors", "collect", "compute_ranges", "entropy_amax",
           "entropy_divergences", "mse_amax", "percentile_amax"]

MAX_RUN_BYTES = 256 << 20  # activations one ONNX Runtime run may return; two runs are in flight


@dataclass
class TensorStatistics:
    min: float = float("inf")
    max: float = float("-inf")
    histogram: AbsHistogram | None = None

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))


@dataclass
class ActivationStatistics:
    """Per-tensor statistics in graph order (the model input first)."""

    tensors: dict[str, TensorStatistics] = field(default_factory=dict)
    samples: int = 0

    def update(self, name: str, lo: float, hi: float, x: np.ndarray | None = None, *, owned: bool = False,
               relu: str | None = None) -> None:
        """Fold one batch of tensor ``name`` in: its min ``lo`` and max ``hi`` and, for histograms, its
        values ``x`` (overwritten when ``owned``). With ``relu``, the same batch's ``max(x, 0)`` is
        folded into that tensor too (one read of ``x`` for both)."""
        st = self.tensors[name]
        if not (np.isfinite(lo) and np.isfinite(hi)) or (x is not None and st.histogram is None
                                                          and not np.isfinite(x).all()):
            raise _not_finite(name)
        st.min, st.max = min(st.min, lo), max(st.max, hi)
        relu_st = self.tensors[relu] if relu is not None else None
        if relu_st is not None:
            relu_st.min, relu_st.max = min(relu_st.min, max(lo, 0.0)), max(relu_st.max, max(hi, 0.0))
        if st.histogram is not None and x is not None:
            if x.dtype == np.uint8:  # a folded-preprocessing model's raw pixels: histogram them as floats
                x, owned = x.astype(np.float32), True
            try:
                fold(x, lo, hi, st.histogram, relu_st.histogram if relu_st is not None else None, owned=owned)
            except NotFinite:
                raise _not_finite(name) from None


def _not_finite(name: str) -> InputError:
    return InputError(f"activation {name!r} has NaN or infinite values on the calibration data",
                      "check the model and the calibration data (preprocessing, dtype)")


def _fold_batch(stats: ActivationStatistics, name: str, lo: float, hi: float, x: np.ndarray | None,
                derived: list[tuple[str, str]], *, owned: bool = True) -> None:
    """Fold tensor ``name``'s batch and the Relu outputs computed from it ("same" ones are copied at
    the end). The first Relu shares the read of ``x``; any further one gets its own (rare)."""
    relus = [d for d, kind in derived if kind == "relu"]
    stats.update(name, lo, hi, x, owned=owned and not relus[1:], relu=relus[0] if relus else None)
    for extra in relus[1:]:
        stats.update(extra, max(lo, 0.0), max(hi, 0.0), None if x is None else np.maximum(x, np.float32(0.0)),
                     owned=True)


def collect(fp32_onnx: str | os.PathLike, reader: CalibrationReader, *, histograms: bool, num_bins: int = 2048,
            max_samples: int | None = None, progress: bool = False,
            max_run_bytes: int = MAX_RUN_BYTES, optimization: str = "basic") -> ActivationStatistics:
    """Run ``reader``'s batches (at most ``max_samples`` samples) through the FP32 model and collect
    min/max (and |x| histograms when ``histograms``) for the input and every float activation.
    Peak memory is about the model, plus twice ``max_run_bytes`` of activations, plus one batch.
    ``optimization``: ONNX Runtime's graph optimization level, "all" or "basic" (see ``session``)."""
    import onnx

    from rexport.core.progress import progress_bar

    fp32_onnx = Path(fp32_onnx)
    try:
        model = onnx.load(str(fp32_onnx))
        plan = collection_plan(model)
    except Exception as e:  # DecodeError, OSError, shape-inference errors
        raise InputError(f"{fp32_onnx} is not a readable ONNX model ({type(e).__name__})",
                         "pass the FP32 .onnx written by 'rexport export'") from None
    if reader.input_name not in plan.inputs:
        raise InputError(f"the calibration data feeds input {reader.input_name!r}, but {fp32_onnx.name} takes "
                         f"{plan.inputs}", "open the reader with input_name set to the model's input")
    if len(plan.inputs) != 1:
        raise InputError(f"{fp32_onnx.name} has {len(plan.inputs)} float inputs {plan.inputs}; calibration "
                         "feeds one", "export the model with a single image input")
    stats = ActivationStatistics()
    for name in plan.tensors:
        stats.tensors[name] = TensorStatistics(histogram=AbsHistogram.empty(num_bins) if histograms else None)
    session, names, layout = augmented_session(model, plan, values=histograms, optimization=optimization)
    del model
    total = len(reader) if max_samples is None else min(len(reader), max_samples)
    reader.rewind()
    batches = run_batches(session, names, reader, total, fp32_onnx.name, max_run_bytes=max_run_bytes)
    derived = plan.derived
    try:
        with progress_bar(total, unit="img", desc="calibrating", enabled=progress) as bar:
            for x, outs in batches:
                _fold_batch(stats, reader.input_name, float(x.min()), float(x.max()), x,
                            derived.get(reader.input_name, []), owned=False)
                for name, i_lo, i_hi, i_value in layout:
                    values = outs[i_value] if i_value is not None else None
                    if i_lo is None:  # values fetched: min and max in numpy (a NaN propagates)
                        lo, hi = float(values.min()), float(values.max())
                    else:
                        lo, hi = float(outs[i_lo]), float(outs[i_hi])
                    _fold_batch(stats, name, lo, hi, values, derived.get(name, []))
                    if i_value is not None:
                        outs[i_value] = values = None  # free each activation as soon as it is folded in
                del outs
                stats.samples += len(x)
                bar.update(len(x))
    finally:
        batches.close()  # stops the worker thread now, also when folding a batch in failed
        reader.rewind()
    if stats.samples == 0:
        raise InputError("the calibration data yielded no samples", "pass a non-empty calibration set")
    _copy_same_values(stats, plan.derived)
    return stats


def _copy_same_values(stats: ActivationStatistics, derived: dict[str, list[tuple[str, str]]]) -> None:
    """A same-values tensor (Flatten, Reshape...) has exactly its source's statistics; a relu-kind
    tensor downstream of one (Relu of a Flatten) was folded from the source directly."""
    for source, children in derived.items():
        for name, kind in children:
            if kind == "same":
                stats.tensors[name] = copy.deepcopy(stats.tensors[source])
