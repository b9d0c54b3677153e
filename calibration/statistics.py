"""Streaming activation statistics on the FP32 ONNX model, and the ranges computed from them.

``collect`` runs an augmented copy of the model (every float activation made a graph output) in
ONNX Runtime one batch at a time and folds each batch into per-tensor running min/max and, for
the histogram methods, a fixed-size histogram of |x|. Memory is one batch of activations plus
``num_bins`` counts per tensor, whatever the number of samples. ``compute_ranges`` then turns
the statistics into one symmetric amax per tensor: minmax, percentile or entropy (TensorRT's
KL-divergence calibration).
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from rexport.core.errors import InputError

from rexport.calibration.readers import CalibrationReader

log = logging.getLogger(__name__)

METHODS = ("entropy", "minmax", "percentile")
INT8_LEVELS = 128  # quantized bins of |x| for symmetric int8: 0..127
EPSILON = 1e-8  # the amax of an all-zero tensor (a scale of 0 is not a valid quantization scale)


# -- histograms --------------------------------------------------------------------------


@dataclass
class AbsHistogram:
    """Counts of |x| in ``len(counts)`` equal bins over [0, ``top``].

    The range follows the running absmax. When a batch exceeds it, the old counts are re-binned
    onto the wider range by linear interpolation of their cumulative distribution (each old bin's
    count spread uniformly over its width and split between the new bins it overlaps); counts are
    float64 for that reason. The error this adds is at most one (new, coarser) bin per re-binning,
    and the final range is exactly the absmax seen, as TensorRT's two-pass histogram has it.
    """

    counts: np.ndarray
    top: float = 0.0

    @classmethod
    def empty(cls, num_bins: int) -> "AbsHistogram":
        return cls(np.zeros(num_bins, np.float64), 0.0)

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

    def add_abs(self, a: np.ndarray, absmax: float) -> None:
        """Add the values of ``a`` (already |x|, any shape; overwritten) whose maximum is ``absmax``."""
        if absmax > self.top:
            self._widen(absmax)
        if self.top <= 0.0:  # all zeros so far: they all sit in bin 0
            self.counts[0] += a.size
            return
        np.multiply(a, np.float32(self.num_bins / self.top), out=a)
        idx = a.astype(np.intp).ravel()
        np.minimum(idx, self.num_bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.num_bins)


# -- collection --------------------------------------------------------------------------


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

    def update(self, name: str, lo: float, hi: float, x: np.ndarray | None = None, *, owned: bool = False) -> None:
        """Fold one batch of tensor ``name`` in: its min ``lo`` and max ``hi`` and, for histograms, its
        values ``x`` (overwritten when ``owned``)."""
        st = self.tensors[name]
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise InputError(f"activation {name!r} has NaN or infinite values on the calibration data",
                             "check the model and the calibration data (preprocessing, dtype)")
        st.min, st.max = min(st.min, lo), max(st.max, hi)
        if st.histogram is not None and x is not None:
            a = x if owned else x.copy()
            if lo < 0:
                np.abs(a, out=a)
            st.histogram.add_abs(a, max(-lo, hi))


def activation_tensors(model) -> tuple[list[str], dict[str, int]]:
    """(float model inputs, {float activation: ONNX elem type}): every float node output, in graph
    order, that is not computed from initializers and constants alone; graph outputs included."""
    import onnx
    from onnx import TensorProto

    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    constant = {init.name for init in g.initializer}
    inputs = [i.name for i in g.input if i.name not in constant and types.get(i.name) in float_types]
    activations: dict[str, int] = {}
    for node in g.node:
        if node.op_type in ("Constant", "ConstantOfShape") or all(i in constant for i in node.input if i):
            constant.update(o for o in node.output if o)
            continue
        activations.update((o, types[o]) for o in node.output if o and types.get(o) in float_types)
    return inputs, activations


def _augmented_session(model, activations: dict[str, int], *, values: bool):
    """An ORT CPU session of ``model`` whose outputs are, per activation, its min and max (reduced in
    the graph, on all cores) and, when ``values``, the activation itself. Returns (session, names)."""
    import onnx
    import onnxruntime as ort

    g = model.graph
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    outputs: list[tuple[str, str, str | None]] = []  # (min name, max name, value name or None)
    del g.output[:]
    for n, (name, elem_type) in enumerate(activations.items()):
        lo, hi = f"rexport_calib_min_{n}", f"rexport_calib_max_{n}"
        if lo in taken or hi in taken:
            raise InputError(f"the model already has a tensor named {lo!r} or {hi!r}", "rename it")
        g.node.append(onnx.helper.make_node("ReduceMin", [name], [lo], keepdims=0))
        g.node.append(onnx.helper.make_node("ReduceMax", [name], [hi], keepdims=0))
        g.output.append(onnx.helper.make_tensor_value_info(lo, elem_type, []))
        g.output.append(onnx.helper.make_tensor_value_info(hi, elem_type, []))
        if values:
            g.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        outputs.append((lo, hi, name if values else None))
    opts = ort.SessionOptions()
    # Every activation has a consumer outside its own subgraph now, so ORT can fuse little away; BASIC
    # also avoids the NCHWc layout reorders ENABLE_ALL would put in front of each exposed output.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    # The worker thread and the caller's numpy share the cores: idle ORT threads must not spin.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [n for triple in outputs for n in triple if n is not None]
    return session, names


_DONE = object()


def _run_batches(session, names: list[str], reader: CalibrationReader, total: int, model_name: str,
                 in_flight: int = 2) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Yield (input batch, outputs) for up to ``total`` samples. A worker thread reads and runs the
    next batch while the caller folds in the last one; at most ``in_flight`` batches of outputs are
    alive at once, which is what bounds memory."""
    slots = threading.Semaphore(in_flight)
    results: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        done = 0
        try:
            while done < total and not stop.is_set():
                slots.acquire()
                if stop.is_set():
                    break
                feed = reader.get_next()
                if feed is None:
                    break
                x = feed[reader.input_name][: total - done]
                try:
                    outs = session.run(names, {reader.input_name: x})
                except Exception as e:  # onnxruntime raises its own InvalidArgument / Fail types
                    raise InputError(f"ONNX Runtime could not run {model_name} on a calibration batch of shape "
                                     f"{tuple(x.shape)}: {str(e).splitlines()[0][:300]}",
                                     "check the data's input size matches the model") from None
                done += len(x)
                results.put((x, outs))
        except BaseException as e:  # handed to the caller's thread, raised there
            results.put(e)
        finally:
            results.put(_DONE)

    worker = threading.Thread(target=work, name="calibration-inference", daemon=True)
    worker.start()
    try:
        while True:
            item = results.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            slots.release()
    finally:
        stop.set()
        slots.release()
        worker.join()


def collect(fp32_onnx: str | os.PathLike, reader: CalibrationReader, *, histograms: bool, num_bins: int = 2048,
            max_samples: int | None = None, progress: bool = False) -> ActivationStatistics:
    """Run ``reader``'s batches (at most ``max_samples`` samples) through the FP32 model and collect
    min/max (and |x| histograms when ``histograms``) for the input and every float activation."""
    import onnx
    from tqdm import tqdm

    fp32_onnx = Path(fp32_onnx)
    try:
        model = onnx.load(str(fp32_onnx))
        inputs, activations = activation_tensors(model)
    except Exception as e:  # DecodeError, OSError, shape-inference errors
        raise InputError(f"{fp32_onnx} is not a readable ONNX model ({type(e).__name__})",
                         "pass the FP32 .onnx written by 'rexport export'") from None
    if reader.input_name not in inputs:
        raise InputError(f"the calibration data feeds input {reader.input_name!r}, but {fp32_onnx.name} takes "
                         f"{inputs}", "open the reader with input_name set to the model's input")
    if len(inputs) != 1:
        raise InputError(f"{fp32_onnx.name} has {len(inputs)} float inputs {inputs}; calibration feeds one",
                         "export the model with a single image input")
    stats = ActivationStatistics()
    for name in [*inputs, *activations]:
        stats.tensors[name] = TensorStatistics(histogram=AbsHistogram.empty(num_bins) if histograms else None)
    session, names = _augmented_session(model, activations, values=histograms)
    del model
    per_tensor = 3 if histograms else 2
    total = len(reader) if max_samples is None else min(len(reader), max_samples)
    reader.rewind()
    batches = _run_batches(session, names, reader, total, fp32_onnx.name)
    try:
        with tqdm(total=total, unit="img", desc="calibrating", disable=not progress, file=sys.stderr,
                  leave=False) as bar:
            for x, outs in batches:
                stats.update(reader.input_name, float(x.min()), float(x.max()), x, owned=False)
                for k, name in enumerate(activations):
                    lo, hi = outs[per_tensor * k], outs[per_tensor * k + 1]
                    values = outs[per_tensor * k + 2] if histograms else None
                    stats.update(name, float(lo), float(hi), values, owned=True)
                    if histograms:
                        outs[per_tensor * k + 2] = None  # free each activation as soon as it is folded in
                del outs
                stats.samples += len(x)
                bar.update(len(x))
    finally:
        batches.close()  # stops the worker thread now, also when folding a batch in failed
        reader.rewind()
    if stats.samples == 0:
        raise InputError("the calibration data yielded no samples", "pass a non-empty calibration set")
    return stats


# -- ranges ------------------------------------------------------------------------------


def percentile_amax(hist: AbsHistogram, percentile: float) -> float:
    """The ``percentile`` of |x|, interpolated linearly inside the bin where the CDF crosses it."""
    total = hist.counts.sum()
    if total <= 0 or hist.top <= 0:
        return 0.0
    cdf = np.cumsum(hist.counts) / total
    target = percentile / 100.0
    k = int(np.searchsorted(cdf, target, side="left"))
    if k >= hist.num_bins:
        return hist.top
    below = cdf[k - 1] if k > 0 else 0.0
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
    """The clipping threshold minimising KL(P || Q) (ties go to the larger threshold)."""
    if hist.top <= 0 or hist.counts.sum() <= 0:
        return 0.0
    if hist.num_bins <= levels:
        return hist.top
    cand, kl = entropy_divergences(hist.counts, levels)
    best = len(kl) - 1 - int(np.argmin(kl[::-1]))
    return float(cand[best] * hist.bin_width)


def compute_ranges(stats: ActivationStatistics, method: str, *, percentile: float = 99.99) -> dict[str, float]:
    """One symmetric amax (> 0) per tensor, in graph order."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}", f"use one of {', '.join(METHODS)}")
    ranges: dict[str, float] = {}
    for name, st in stats.tensors.items():
        if method == "minmax":
            amax = st.absmax
        elif st.histogram is None:
            raise ValueError(f"{method} calibration needs histograms: collect(..., histograms=True)")
        elif method == "percentile":
            amax = percentile_amax(st.histogram, percentile)
        else:
            amax = entropy_amax(st.histogram)
        amax = float(np.float32(amax))  # ranges are float32 values, exactly representable in JSON
        ranges[name] = amax if amax > EPSILON else EPSILON
    return ranges
