"""The CPU proof that keeps the TensorRT form's FP16 float parts: the FP16-float file against the
FP32-float form of the same file (same Q/DQ, same scales), in ONNX Runtime CPU.

Kept only when the per-sample logit cosine is >= 0.999 everywhere, top-1 agrees on >= 99.5 % of the
validation inputs, and, when labelled data is given, top-1 accuracy is within 0.2 points. Otherwise the
stage falls back to FP32 float parts and records the failed check as the reason.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

#: (metric, the bound it must meet) for keeping FP16 float parts
THRESHOLDS = {"cosine_min": 0.999, "top1_agreement": 0.995, "accuracy_delta_pt": 0.2}


@dataclass(frozen=True)
class FloatProof:
    kept: bool
    samples: int
    cosine_min: float
    top1_agreement: float
    #: top-1 accuracy (0-1) of each float choice on the labelled data; None without labels
    accuracy_fp16: float | None = None
    accuracy_fp32: float | None = None
    labelled_samples: int = 0
    #: why FP16 float parts were not kept (None when kept)
    reason: str | None = None

    @property
    def accuracy_delta_pt(self) -> float | None:
        if self.accuracy_fp16 is None or self.accuracy_fp32 is None:
            return None
        return abs(self.accuracy_fp16 - self.accuracy_fp32) * 100.0

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy_delta_pt": self.accuracy_delta_pt, "thresholds": dict(THRESHOLDS)}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(axis=1) / np.maximum(den, 1e-300), 1.0)


def _logits(runner, x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runner.infer(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def prove_fp16_floats(fp16_path: Path, fp32_path: Path, x: np.ndarray, *,
                      labelled: Iterable[tuple[np.ndarray, np.ndarray]] | None = None,
                      batch_size: int = 16, threads: int | None = None) -> FloatProof:
    """Measure the FP16-float file against the FP32-float one on ``x`` (and ``labelled`` (x, y) batches)."""
    from rexport.pipeline.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(fp16_path, threads=threads, name="int8/fp16-float") as r16, \
            OnnxRuntimeRunner(fp32_path, threads=threads, name="int8/fp32-float") as r32:
        y16, y32 = _logits(r16, x, batch_size), _logits(r32, x, batch_size)
        finite = bool(np.all(np.isfinite(y16)))
        cos = float(_cosines(y16, y32).min()) if finite else float("nan")
        agree = float(np.mean(y16.argmax(1) == y32.argmax(1)))
        acc16 = acc32 = None
        n_lab = 0
        if labelled is not None:
            hit16 = hit32 = 0
            for xb, yb in labelled:
                if not len(xb):
                    continue
                hit16 += int(np.sum(r16.infer(xb).argmax(1) == yb))
                hit32 += int(np.sum(r32.infer(xb).argmax(1) == yb))
                n_lab += len(yb)
            if n_lab:
                acc16, acc32 = hit16 / n_lab, hit32 / n_lab
    failed = []
    if not finite:
        failed.append("non-finite logits")
    elif cos < THRESHOLDS["cosine_min"]:
        failed.append(f"cosine_min {cos:.5f} < {THRESHOLDS['cosine_min']}")
    if agree < THRESHOLDS["top1_agreement"]:
        failed.append(f"top-1 agreement {agree:.2%} < {THRESHOLDS['top1_agreement']:.1%}")
    proof = FloatProof(kept=False, samples=len(x), cosine_min=cos, top1_agreement=agree,
                       accuracy_fp16=acc16, accuracy_fp32=acc32, labelled_samples=n_lab)
    delta = proof.accuracy_delta_pt
    if delta is not None and delta > THRESHOLDS["accuracy_delta_pt"]:
        failed.append(f"top-1 accuracy {acc16:.2%} vs {acc32:.2%} with FP32 floats "
                      f"({delta:.2f} pt > {THRESHOLDS['accuracy_delta_pt']} pt)")
    reason = None
    if failed:
        reason = "FP16 float parts failed the CPU proof against FP32 float parts: " + "; ".join(failed)
    return FloatProof(**{**asdict(proof), "kept": not failed, "reason": reason})
