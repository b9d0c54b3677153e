"""Collected statistics on disk, so that another histogram method on the same model and data (say
``auto`` after ``entropy``) costs no second pass over the data.

``cache_dir/stats-<key>.npz``: per tensor its min, max, histogram counts, top and zero count. The key
hashes what the statistics depend on (model, data, samples, batch size, seed, bins), not the method.
A file that does not load, or whose checksum does not match, is ignored and recomputed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from rexport.core.fsio import atomic_path, sha256_json

from rexport.calibration.histogram import AbsHistogram
from rexport.calibration.statistics import ActivationStatistics, TensorStatistics

STATS_FORMAT = 1  # bump with anything that changes the collected values


def statistics_key(fp32_onnx_sha256: str, data_fingerprint: str, settings) -> str:
    """16 hex digits: the statistics' inputs (``settings`` a CalibrationSettings; its method and
    percentile are left out, they only act on the statistics)."""
    keep = {k: v for k, v in settings.to_dict().items() if k not in ("method", "percentile")}
    return sha256_json({"stats_format": STATS_FORMAT, "fp32_onnx_sha256": fp32_onnx_sha256,
                        "data_fingerprint": data_fingerprint, "settings": keep})[:16]


def _checksum(meta: dict, counts: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(np.ascontiguousarray(counts, np.float64).tobytes())
    return h.hexdigest()


def save_statistics(path: Path, stats: ActivationStatistics) -> None:
    """Write ``stats`` (with histograms) atomically."""
    names = list(stats.tensors)
    sts = [stats.tensors[n] for n in names]
    meta = {"names": names, "samples": stats.samples, "min": [st.min for st in sts], "max": [st.max for st in sts],
            "top": [st.histogram.top for st in sts], "zeros": [st.histogram.zeros for st in sts]}
    counts = np.stack([st.histogram.counts for st in sts])
    meta["sha256"] = _checksum(meta, counts)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), counts=counts)


def load_statistics(path: Path) -> ActivationStatistics | None:
    """The statistics in ``path``, or None when it is missing, unreadable or fails its checksum."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta, counts = json.loads(str(z["meta"])), z["counts"]
        expected = meta.pop("sha256")
        if _checksum(meta, counts) != expected or counts.shape[0] != len(meta["names"]):
            return None
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None
    stats = ActivationStatistics(samples=int(meta["samples"]))
    for i, name in enumerate(meta["names"]):
        hist = AbsHistogram(counts[i].astype(np.float64), float(meta["top"][i]), float(meta["zeros"][i]))
        stats.tensors[name] = TensorStatistics(float(meta["min"][i]), float(meta["max"][i]), hist)
    return stats
