"""Per-layer INT8 sensitivity: for every quantizer group, what quantizing it alone costs (``alone``) or
what leaving it alone in float regains (``leave-out``), measured as logit KL divergence (or MSE) to FP32
on a selection split, with top-1 beside it as the final judge.

It is fast because no file is written or compiled per group: the INT8 file is rewritten so that every
group can be switched on or off by a boolean input, cut into parts at the block boundaries, and each
group costs a pass over the network after it, in FP32 speed (:mod:`rexport.pipeline.switch_session`).
Results are cached by content: the INT8 file's sha256 (its ranges and placement), the FP32 file's,
the data fingerprint, the calibration key and these settings.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json, read_json, sha256_file, sha256_json
from rexport.pipeline.qdq_groups import QuantizerGroup
from rexport.pipeline.switch_session import SwitchSession

METRICS = ("kl", "mse")
MODES = ("alone", "leave-out")
FORMAT = 1


@dataclass(frozen=True)
class SensitivitySettings:
    metric: str = "kl"        # kl | mse: logit divergence from FP32
    mode: str = "alone"       # alone: only this group in INT8 | leave-out: every group but this one
    samples: int = 32         # images of the selection split the ranking uses (ResNet-50: ~2x calibration)
    batch_size: int = 16
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InputError(f"unknown sensitivity metric {self.metric!r}", f"use one of {', '.join(METRICS)}")
        if self.mode not in MODES:
            raise InputError(f"unknown sensitivity mode {self.mode!r}", f"use one of {', '.join(MODES)}")
        if self.samples < 1 or self.batch_size < 1:
            raise InputError("sensitivity samples and batch size must be >= 1")

    def key_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "threads"}


@dataclass(frozen=True)
class GroupSensitivity:
    group: QuantizerGroup
    score: float                 # KL (nats) or MSE of the logits against FP32, mean over samples
    agreement_top1: float        # top-1 agreement with FP32
    accuracy_top1: float | None  # with labels

    def to_dict(self) -> dict:
        return {**self.group.to_dict(), "score": self.score, "agreement_top1": self.agreement_top1,
                "accuracy_top1": self.accuracy_top1}


@dataclass
class SensitivityResult:
    key: str
    ranked: list[GroupSensitivity]   # most sensitive first
    metric: str
    mode: str
    samples: int
    seconds: float
    reused: bool
    path: Path
    baseline: dict = field(default_factory=dict)  # FP32 and all-INT8 figures on the same samples

    def to_dict(self) -> dict:
        return {"key": self.key, "metric": self.metric, "mode": self.mode, "samples": self.samples,
                "seconds": round(self.seconds, 3), "reused": self.reused, "baseline": self.baseline,
                "ranked": [r.to_dict() for r in self.ranked]}


def data_fingerprint(x: np.ndarray, labels: np.ndarray | None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    if labels is not None:
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def logit_divergence(ref: np.ndarray, y: np.ndarray, metric: str) -> float:
    if metric == "mse":
        return float(np.mean((ref.astype(np.float64) - y) ** 2))
    lp, lq = log_softmax(ref), log_softmax(y)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def _figures(ref: np.ndarray, y: np.ndarray, labels: np.ndarray | None, metric: str) -> tuple[float, float, float | None]:
    agree = float((ref.argmax(1) == y.argmax(1)).mean())
    acc = None if labels is None else float((y.argmax(1) == labels).mean())
    return logit_divergence(ref, y, metric), agree, acc


def measure_sensitivity(int8_path: Path, fp32_path: Path, x: np.ndarray, labels: np.ndarray | None,
                        settings: SensitivitySettings, cache_dir: Path, *, calibration_key: str = "",
                        session: SwitchSession | None = None) -> SensitivityResult:
    """Rank the quantizer groups of ``int8_path`` by their effect on the logits of ``x`` (the first
    ``settings.samples`` rows are used); from ``cache_dir`` when measured before on the same content."""
    start = time.perf_counter()
    x = x[:settings.samples]
    labels = None if labels is None else labels[:settings.samples]
    if len(x) == 0:
        raise InputError("no images to measure sensitivity on", "pass a larger --val-data set")
    key = sha256_json({"format": FORMAT, "int8": sha256_file(int8_path), "fp32": sha256_file(fp32_path),
                       "data": data_fingerprint(x, labels), "calibration_key": calibration_key,
                       "settings": settings.key_dict()})[:16]
    path = Path(cache_dir) / f"{key}.json"
    if path.is_file():
        doc = read_json(path)
        if doc.get("key") == key and doc.get("format") == FORMAT:
            return _from_doc(doc, path, time.perf_counter() - start)
    sess = session or SwitchSession(int8_path, fp32_path, threads=settings.threads)
    every = {g.name for g in sess.groups}
    subsets = [{g.name} if settings.mode == "alone" else every - {g.name} for g in sess.groups]
    ref, outs = sess.logits_many(x, [every, *subsets], settings.batch_size)
    full = outs[0]
    base = dict(zip(("score", "agreement_top1", "accuracy_top1"), _figures(ref, full, labels, settings.metric)))
    baseline = {"int8": base, "fp32_accuracy_top1": None if labels is None else float((ref.argmax(1) == labels).mean())}
    rows = []
    for grp, y in zip(sess.groups, outs[1:]):
        score, agree, acc = _figures(ref, y, labels, settings.metric)
        if settings.mode == "leave-out":  # what leaving it in float regains
            score = base["score"] - score
        rows.append(GroupSensitivity(grp, score, agree, acc))
    rows.sort(key=lambda r: -r.score)
    seconds = time.perf_counter() - start
    result = SensitivityResult(key, rows, settings.metric, settings.mode, len(x), seconds, False, path, baseline)
    atomic_write_json(path, {"format": FORMAT, **result.to_dict()})
    return result


def _from_doc(doc: dict, path: Path, seconds: float) -> SensitivityResult:
    ranked = [GroupSensitivity(QuantizerGroup(r["name"], tuple(r["consumers"]), tuple(r["weights"])), r["score"],
                               r["agreement_top1"], r["accuracy_top1"]) for r in doc["ranked"]]
    return SensitivityResult(doc["key"], ranked, doc["metric"], doc["mode"], doc["samples"], seconds, True, path,
                             doc.get("baseline", {}))
