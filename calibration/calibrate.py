"""Calibrate an FP32 ONNX model: activation ranges, cached by what they were computed from.

``cache_dir/<key>.json`` holds the ranges with everything they depend on; the key hashes the FP32
model's sha256, the data fingerprint and the settings, so the same inputs reuse the file and any
change computes a new one. ``cache_dir/<key>.tensorrt.cache`` is the same ranges as a TensorRT
calibration cache, for TensorRT 8.x's implicit INT8 path.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json, sha256_file, sha256_json
from rexport.core.preprocess import PreprocessSpec

from rexport.calibration.readers import CalibrationReader, open_reader
from rexport.calibration.choice import CRITERION, METHODS, SINGLE_METHODS, choose_ranges, compute_ranges
from rexport.calibration.ranges import INT8_LEVELS
from rexport.calibration.statistics import ActivationStatistics, collect
from rexport.calibration.stats_cache import load_statistics, save_statistics, statistics_key
from rexport.calibration.tensorrt_cache import (DEFAULT_VERSION, algorithm_for, read_tensorrt_cache_header,
                                                read_tensorrt_scales, scale_hex, write_tensorrt_cache)

log = logging.getLogger(__name__)

# 2: entropy leaves exact zeros out; 3: the record holds per-tensor choices (methods mse and auto) and
# whether cached statistics were used (ranges of the other methods unchanged). Bumping it changes every key.
FORMAT_VERSION = 3
_REQUIRED = {"format": int, "key": str, "fp32_onnx_sha256": str, "data_fingerprint": str, "data_description": str,
             "synthetic": bool, "settings": dict, "ranges": dict, "minmax": dict, "samples": int, "created": str,
             "seconds": (int, float), "content_sha256": str, "choices": dict, "choice_criterion": str,
             "statistics_reused": bool}


@dataclass(frozen=True)
class CalibrationSettings:
    """How to calibrate. ``samples``, ``batch_size`` and ``seed`` are also what the reader is opened
    with (see ``open_reader_for``); calibration uses at most ``samples`` of what the reader yields."""

    method: str = "entropy"  # entropy | minmax | percentile | mse | auto (a method per tensor)
    samples: int = 512
    batch_size: int = 8
    percentile: float = 99.99
    num_bins: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown calibration method {self.method!r}", f"use one of {', '.join(METHODS)}")
        for name in ("samples", "batch_size", "num_bins", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"calibration {name} must be an integer, got {value!r}")
        if self.samples < 1 or self.batch_size < 1:
            raise InputError(f"calibration samples ({self.samples}) and batch size ({self.batch_size}) must be >= 1",
                             "pass --calib-samples and --calib-batch-size >= 1")
        if not isinstance(self.percentile, (int, float)) or not 0.0 < float(self.percentile) <= 100.0:
            raise InputError(f"calibration percentile must be in (0, 100], got {self.percentile!r}",
                             "pass --percentile in (0, 100], e.g. 99.99")
        if self.num_bins < 2 * INT8_LEVELS:
            raise InputError(f"calibration histograms need at least {2 * INT8_LEVELS} bins, got {self.num_bins}",
                             f"pass --num-bins {2 * INT8_LEVELS} or more (default 2048)")
        if self.seed < 0:
            raise InputError(f"calibration seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["percentile"] = float(d["percentile"])
        return d


@dataclass
class CalibrationResult:
    key: str
    ranges: dict[str, float]  # tensor name -> amax (> 0), graph input first, in graph order
    json_path: Path
    tensorrt_cache_path: Path
    reused: bool
    data_description: str
    synthetic: bool
    samples: int
    seconds: float  # wall time of this call (small when reused)
    minmax: dict[str, tuple[float, float]] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)  # tensor -> method chosen (method "auto" only)
    statistics_reused: bool = False  # computed from cached statistics: no pass over the data


def calibration_key(fp32_onnx_sha256: str, data_fingerprint: str, settings: CalibrationSettings) -> str:
    """16 hex digits naming a calibration: the model, the data and the settings."""
    return sha256_json({"format": FORMAT_VERSION, "fp32_onnx_sha256": fp32_onnx_sha256,
                        "data_fingerprint": data_fingerprint, "settings": settings.to_dict()})[:16]


def open_reader_for(source: str | os.PathLike, spec: PreprocessSpec, settings: CalibrationSettings, *,
                    input_name: str = "input") -> CalibrationReader:
    """``open_reader`` with the sample count, batch size and seed of ``settings``."""
    return open_reader(source, spec, input_name=input_name, samples=settings.samples,
                       batch_size=settings.batch_size, seed=settings.seed)


def _content_sha256(doc: dict) -> str:
    return sha256_json({k: v for k, v in doc.items() if k != "content_sha256"})


def load_calibration(json_path: str | os.PathLike) -> dict:
    """Read and validate a calibration file: its fields and types, its key, positive finite ranges and
    a content checksum, so a file edited by hand or cut short is refused (InputError), never used."""
    path = Path(json_path)
    bad = f"re-run calibration (delete {path} if it keeps failing)"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"calibration file {path} does not exist", "run 'rexport quantize --precision int8' first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"calibration file {path} is unreadable ({type(e).__name__})", bad) from None
    if not isinstance(doc, dict):
        raise InputError(f"calibration file {path} does not hold a JSON object", bad)
    for name, kind in _REQUIRED.items():
        if name not in doc or not isinstance(doc[name], kind) or (kind is int and isinstance(doc[name], bool)):
            raise InputError(f"calibration file {path}: field {name!r} is missing or of the wrong type", bad)
    if doc["format"] != FORMAT_VERSION:
        raise InputError(f"calibration file {path} has format {doc['format']}, this rexport reads {FORMAT_VERSION}", bad)
    if _content_sha256(doc) != doc["content_sha256"]:
        raise InputError(f"calibration file {path} was modified after it was written (checksum mismatch)", bad)
    try:
        settings = CalibrationSettings(**doc["settings"])
    except TypeError:
        raise InputError(f"calibration file {path}: unknown settings {sorted(doc['settings'])}", bad) from None
    if calibration_key(doc["fp32_onnx_sha256"], doc["data_fingerprint"], settings) != doc["key"]:
        raise InputError(f"calibration file {path}: its key does not match its model, data and settings", bad)
    ranges, minmax = doc["ranges"], doc["minmax"]
    if not ranges or set(ranges) != set(minmax):
        raise InputError(f"calibration file {path}: ranges and minmax name different tensors", bad)
    for name, amax in ranges.items():
        if not isinstance(amax, (int, float)) or isinstance(amax, bool) or not math.isfinite(amax) or amax <= 0:
            raise InputError(f"calibration file {path}: tensor {name!r} has invalid amax {amax!r}", bad)
        mm = minmax[name]
        if (not isinstance(mm, list) or len(mm) != 2 or not all(isinstance(v, (int, float)) for v in mm)
                or not mm[0] <= mm[1]):
            raise InputError(f"calibration file {path}: tensor {name!r} has invalid min/max {mm!r}", bad)
    for name, choice in doc["choices"].items():
        if (name not in ranges or not isinstance(choice, dict) or choice.get("method") not in SINGLE_METHODS
                or choice.get("amax") != ranges[name]):
            raise InputError(f"calibration file {path}: tensor {name!r} has an invalid per-tensor choice", bad)
    return doc


def _tensorrt_cache_matches(path: Path, ranges: dict[str, float], algorithm: str, version: int) -> bool:
    try:
        header = read_tensorrt_cache_header(path)
        scales = read_tensorrt_scales(path)
    except InputError:
        return False
    if header != (version, algorithm) or list(scales) != list(ranges):
        return False
    return all(scale_hex(ranges[name]) == scale_hex(scales[name] * 127.0) for name in ranges)


def _result(doc: dict, json_path: Path, trt_path: Path, reused: bool, seconds: float) -> CalibrationResult:
    return CalibrationResult(key=doc["key"], ranges=dict(doc["ranges"]), json_path=json_path,
                             tensorrt_cache_path=trt_path, reused=reused, data_description=doc["data_description"],
                             synthetic=doc["synthetic"], samples=doc["samples"], seconds=seconds,
                             minmax={k: (float(v[0]), float(v[1])) for k, v in doc["minmax"].items()},
                             choices={k: v["method"] for k, v in doc["choices"].items()})


def calibrate(fp32_onnx: str | os.PathLike, reader: CalibrationReader, settings: CalibrationSettings,
              cache_dir: str | os.PathLike, *, progress: bool = True,
              tensorrt_version: int = DEFAULT_VERSION, force: bool = False) -> CalibrationResult:
    """Activation ranges of ``fp32_onnx`` on ``reader``'s data, from ``cache_dir`` when the same model,
    data and settings were calibrated before (verified, not trusted), else computed and cached; from
    cached statistics (no pass over the data) when only the method or percentile changed. ``force``
    recomputes everything. Nothing is written unless calibration succeeds."""
    start = time.perf_counter()
    fp32_onnx, cache_dir = Path(fp32_onnx), Path(cache_dir)
    if not fp32_onnx.is_file():
        raise InputError(f"FP32 model {fp32_onnx} does not exist", "run 'rexport export' first")
    model_sha = sha256_file(fp32_onnx)
    fingerprint = reader.fingerprint()
    key = calibration_key(model_sha, fingerprint, settings)
    json_path, trt_path = cache_dir / f"{key}.json", cache_dir / f"{key}.tensorrt.cache"
    algorithm = algorithm_for(settings.method)

    if json_path.exists() and not force:
        try:
            doc = load_calibration(json_path)
            expected = (key, model_sha, fingerprint, settings.to_dict())
            if (doc["key"], doc["fp32_onnx_sha256"], doc["data_fingerprint"], doc["settings"]) != expected:
                raise InputError(f"calibration file {json_path} was made from a different model, data or settings")
        except InputError as e:
            warnings.warn(f"not reusing cached calibration: {e.message}; recomputing", UserWarning, stacklevel=2)
        else:
            if not _tensorrt_cache_matches(trt_path, doc["ranges"], algorithm, tensorrt_version):
                write_tensorrt_cache(doc["ranges"], trt_path, algorithm=algorithm, version=tensorrt_version)
            log.info("calibration %s reused from %s", key, json_path)
            return _result(doc, json_path, trt_path, True, time.perf_counter() - start)

    if reader.synthetic:
        log.warning("calibrating on synthetic data: INT8 ranges will not represent real images")
    histograms = settings.method != "minmax"
    stats_path = cache_dir / f"stats-{statistics_key(model_sha, fingerprint, settings)}.npz"
    stats: ActivationStatistics | None = load_statistics(stats_path) if histograms and not force else None
    statistics_reused = stats is not None
    if stats is None:
        stats = collect(fp32_onnx, reader, histograms=histograms, num_bins=settings.num_bins,
                        max_samples=settings.samples, progress=progress)
    if settings.method == "auto":
        choices = choose_ranges(stats, percentile=settings.percentile)
        ranges = {name: c.amax for name, c in choices.items()}
    else:
        choices = {}
        ranges = compute_ranges(stats, settings.method, percentile=settings.percentile)
    seconds = time.perf_counter() - start
    doc = {
        "format": FORMAT_VERSION,
        "key": key,
        "fp32_onnx_sha256": model_sha,
        "data_fingerprint": fingerprint,
        "data_description": reader.description,
        "synthetic": bool(reader.synthetic),
        "settings": settings.to_dict(),
        "ranges": ranges,
        "minmax": {name: [st.min, st.max] for name, st in stats.tensors.items()},
        "samples": stats.samples,
        "choices": {name: c.to_dict() for name, c in choices.items()},
        "choice_criterion": CRITERION if choices else "",
        "statistics_reused": statistics_reused,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }
    doc["content_sha256"] = _content_sha256(doc)
    write_tensorrt_cache(ranges, trt_path, algorithm=algorithm, version=tensorrt_version)
    if histograms and not statistics_reused:  # any other histogram method on this data then needs no pass
        save_statistics(stats_path, stats)
    atomic_write_json(json_path, doc)  # last: the JSON is what marks a calibration as complete
    log.info("calibrated %d tensors on %s in %.1f s -> %s", len(ranges), reader.description, seconds, json_path)
    result = _result(doc, json_path, trt_path, False, time.perf_counter() - start)
    result.statistics_reused = statistics_reused
    return result
