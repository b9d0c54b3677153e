"""Latency and throughput of every variant on identical inputs, with the statistics and settings
needed to reproduce them: the numbers users pick an engine by.

One row per variant x batch size. A row that cannot run keeps its reason and the bench goes on
(Ultralytics-benchmark style); a build that was skipped (``build:tensorrt``: no CUDA device) is
shown as a skipped row, never silently dropped.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rexport.core.env import environment
from rexport.core.errors import InputError, MissingDependency, first_line
from rexport.core.settings import setting
from rexport.core.fsio import atomic_write_json
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.summaries import BenchSummary
from rexport.pipeline.variants import (NO_PYTORCH, REFERENCE, list_variants, open_variant, reference_variant,
                                       variant_precision)

SCHEMA_VERSION = 1
RESULTS_FILE = "bench/results.json"

LATENCY_DEFINITION = (
    "model execution on preprocessed input, host arrays in and out, on the CPU (TensorRT: on the GPU, "
    "including host<->device copies); one synchronous call per batch, timed with the host wall clock "
    "(time.perf_counter) around runner.infer; excludes image decoding/preprocessing")
THROUGHPUT_DEFINITION = "images_per_s = batch * 1000 / mean_ms (sustained rate of back-to-back synchronous calls)"
SPEEDUP_DEFINITION = "speedup_vs_pytorch = p50_ms of pytorch / p50_ms of the row, at the same batch size"
GPU_COMPUTE_DEFINITION = (
    "gpu_compute_ms: TensorRT only, the GPU time of the engine's enqueue per call between two CUDA events on "
    "its stream (trtexec's 'GPU Compute Time'); the row's p50_ms is the host end-to-end latency (copies included); "
    "cuda_graphs says whether the enqueue was replayed as a recorded CUDA graph")
GPU_COMPUTE_NOT_MEASURED = ("not measured: the runner reports no device-side time "
                            "(a TensorRT runner may set .last_device_ms from CUDA events)")

_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class BenchSettings:
    """What to time and for how long; every field is recorded in bench/results.json."""

    variants: tuple[str, ...] | None = setting(None, run=False, help="Variants to time (default: every one present).")
    backends: tuple[str, ...] | None = setting(None, help="Filter: pytorch,onnxruntime,openvino,tensorrt.")
    precisions: tuple[str, ...] | None = setting(None, help="Filter: fp32,fp16,bf16,int8.")
    batch_sizes: tuple[int, ...] = (1, 8)
    warmup: int = 5
    min_time: float = setting(1.0, help="Seconds of timed runs per row, at least.")
    max_time: float = setting(10.0, help="Seconds of timed runs per row, at most (even if the p50 is not stable).")
    min_iters: int = 10
    threads: int | None = None
    seed: int = 0              # input for batch b is standard normal drawn with seed + b
    stability: float = 0.05    # p50 of first and second half of the samples within this fraction

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise InputError(f"bad batch sizes {self.batch_sizes}", "pass --batch-sizes 1,8 (positive integers)")
        if self.warmup < 0 or self.min_iters < 1 or self.min_time < 0 or self.max_time < self.min_time:
            raise InputError("bad bench timing settings",
                             "need --warmup >= 0, --min-iters >= 1 and 0 <= --min-time <= --max-time")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"bad thread count {self.threads}", "pass --threads N with N >= 1, or leave it out")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("variants", "backends", "precisions", "batch_sizes"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d


def variant_backend(variant: str) -> str:
    """pytorch for the reference, onnxruntime for the ONNX files, the prefix for engines."""
    if variant == REFERENCE:
        return "pytorch"
    if variant in VARIANT_FILES:
        return "onnxruntime"
    return variant.split("-", 1)[0]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _row(variant: str, backend: str, precision: str | None, batch: int, status: str, reason: str | None) -> dict:
    return {"variant": variant, "backend": backend, "precision": precision, "batch": batch,
            "status": status, "reason": reason, "p50_ms": None, "p90_ms": None, "p99_ms": None,
            "mean_ms": None, "std_ms": None, "min_ms": None, "max_ms": None, "images_per_s": None, "iterations": 0,
            "timed_s": None, "stable": None, "stop": None, "runner_settings": {},
            "gpu_compute_ms": None, "cuda_graphs": None, "speedup_vs_pytorch": None}


def _stats(samples_s: list[float]) -> dict:
    a = np.asarray(samples_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = (float(v) for v in np.percentile(a, _PERCENTILES))
    return {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(a.mean()),
            "std_ms": float(a.std()), "min_ms": float(a.min()), "max_ms": float(a.max())}


def _is_stable(samples: list[float], tol: float) -> bool:
    half = len(samples) // 2
    first, second = float(np.median(samples[:half])), float(np.median(samples[half:]))
    return abs(first - second) <= tol * float(np.median(samples))


def time_runner(runner, x: np.ndarray, settings: BenchSettings) -> dict:
    """Warm up, then repeat synchronous calls until min_time and min_iters are both reached and,
    beyond that, until the p50 is stable or max_time has passed (min_iters wins over max_time).
    Returns the timing part of a row."""
    for _ in range(settings.warmup):
        runner.infer(x)
    samples: list[float] = []
    device_ms: list[float] = []
    next_check = settings.min_iters
    start = time.perf_counter()
    stop, stable = "max_time", False
    while True:
        t0 = time.perf_counter()
        runner.infer(x)
        t1 = time.perf_counter()
        samples.append(t1 - t0)
        dev = getattr(runner, "last_device_ms", None)
        if dev is not None:
            device_ms.append(float(dev))
        elapsed = t1 - start
        if len(samples) >= next_check and elapsed >= settings.min_time:
            # checking every call would cost O(n log n) per call for fast models
            next_check = len(samples) + max(1, len(samples) // 10)
            if _is_stable(samples, settings.stability):
                stop, stable = "stable", True
                break
        if elapsed >= settings.max_time and len(samples) >= settings.min_iters:
            stable = len(samples) >= 2 and _is_stable(samples, settings.stability)
            break
    out = _stats(samples)
    out.update(iterations=len(samples), timed_s=round(elapsed, 4), stable=stable, stop=stop)
    if device_ms:
        d = np.asarray(device_ms)
        p50, p90, p99 = (float(v) for v in np.percentile(d, _PERCENTILES))
        out["gpu_compute_ms"] = {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(d.mean()),
                                 "iterations": len(device_ms)}
    return out


def _selected(variant: str, settings: BenchSettings) -> bool:
    if settings.backends is not None and variant_backend(variant) not in settings.backends:
        return False
    if settings.precisions is not None and variant_precision(variant) not in settings.precisions:
        return False
    return True


def _skipped_builds(run: RunDir, present: set[str]) -> dict[str, str]:
    """Variants whose producing stage (build:*, quantize:*) did not run or failed: variant -> reason."""
    out = {}
    for name, st in run.manifest.get("stages", {}).items():
        kind, _, target = name.partition(":")
        if kind not in ("build", "quantize") or not target or target in present:
            continue
        status = st.get("status")
        if status == "ok":
            continue
        reason = st.get("reason") or "no reason recorded"
        out[target] = reason if status == "skipped" else f"{name} {status}: {reason}"
    return out


def _inputs(run: RunDir, settings: BenchSettings) -> tuple[dict[int, np.ndarray], dict]:
    spec = PreprocessSpec.from_onnx(run.require(VARIANT_FILES["fp32"], "rexport export"))
    xs = {}
    for b in settings.batch_sizes:
        rng = np.random.default_rng(settings.seed + b)
        xs[b] = rng.standard_normal((b, *spec.input_shape), dtype=np.float32)
    info = {"shape_per_sample": list(spec.input_shape), "dtype": "float32", "layout": "NCHW",
            "data": f"standard normal, seeded with seed + batch (seed {settings.seed}); same tensors for every row"}
    return xs, info


def _bench_variant(run: RunDir, variant: str, xs: dict[int, np.ndarray], settings: BenchSettings,
                   progress: bool) -> list[dict]:
    backend, precision = variant_backend(variant), variant_precision(variant)
    rows = [_row(variant, backend, precision, b, "ok", None) for b in settings.batch_sizes]
    try:
        runner = open_variant(run, variant, threads=settings.threads)
        runner.__enter__()
    except Exception as e:  # any load failure becomes this variant's rows, the bench goes on
        status = "skipped" if isinstance(e, MissingDependency) else "error"
        for r in rows:
            r.update(status=status, reason=f"cannot load: {first_line(e, 300)}")
        _say(progress, f"bench {variant}: {status}: cannot load: {first_line(e, 300)}")
        return rows
    try:
        for r in rows:
            x = xs[r["batch"]]
            r["runner_settings"] = dict(getattr(runner, "settings", {}) or {})
            try:
                y = np.asarray(runner.infer(x))
                if y.ndim != 2 or y.shape[0] != x.shape[0]:
                    raise InputError(f"output shape {tuple(y.shape)} for a batch of {x.shape[0]}")
                r.update(time_runner(runner, x, settings))
            except Exception as e:  # e.g. a batch outside an engine's profile
                r.update(status="error", reason=f"inference failed: {first_line(e, 300)}")
                _say(progress, f"bench {variant} b{r['batch']}: error: {r['reason']}")
                continue
            r["runner_settings"] = dict(getattr(runner, "settings", {}) or {})
            r["images_per_s"] = r["batch"] * 1000.0 / r["mean_ms"]
            gpu = ""
            if backend == "tensorrt":
                r["cuda_graphs"] = r["runner_settings"].get("cuda_graphs")
                if r["gpu_compute_ms"] is None:
                    r["gpu_compute_ms"] = GPU_COMPUTE_NOT_MEASURED
                else:
                    gpu = f", GPU compute p50 {r['gpu_compute_ms']['p50_ms']:.3f} ms"
                gpu += f", CUDA graphs {r['cuda_graphs']}" if r["cuda_graphs"] is not None else ""
            _say(progress, f"bench {variant} b{r['batch']}: p50 {r['p50_ms']:.3f} ms"
                           f"{' host end-to-end' if backend == 'tensorrt' else ''}{gpu}, "
                           f"{r['images_per_s']:.1f} img/s ({r['iterations']} calls, {r['stop']})")
    finally:
        runner.__exit__(None, None, None)
    return rows


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def _say(progress: bool, msg: str) -> None:
    from rexport.core.progress import say

    say(msg, enabled=progress)


def run_bench(run: RunDir, settings: BenchSettings, *, progress: bool = True) -> dict:
    """Time every selected variant at every batch size; write bench/results.json atomically and return it.

    Does not take the run lock nor touch the manifest: the CLI wraps this in ``run.run_stage("bench", ...)``
    (see ``bench_outcome``).
    """
    run.require_export()
    load_before = _load_average()
    xs, input_info = _inputs(run, settings)
    present = list_variants(run)
    if settings.variants is not None:  # the reference first: it is the baseline of speedup_vs_pytorch
        asked = sorted(dict.fromkeys(settings.variants), key=lambda v: v != reference_variant(run))
        wanted = [v for v in asked if _selected(v, settings)]
    else:
        wanted = [v for v in present if _selected(v, settings)]
    skipped_builds = _skipped_builds(run, set(present))

    rows: list[dict] = []
    for variant in wanted:
        if variant not in present:
            reason = skipped_builds.pop(variant, None) or (NO_PYTORCH if variant == REFERENCE and run.imported
                                                           else f"not in {run.path} (build or quantize it first)")
            rows += [_row(variant, variant_backend(variant), variant_precision(variant), b, "skipped", reason)
                     for b in settings.batch_sizes]
            continue
        rows += _bench_variant(run, variant, xs, settings, progress)
    for variant, reason in skipped_builds.items():
        if settings.variants is not None and variant not in settings.variants:
            continue
        backend = variant_backend(variant)
        precision = variant_precision(variant) if "-" in variant or variant in VARIANT_FILES else None
        if settings.backends is not None and backend not in settings.backends:
            continue
        if settings.precisions is not None and precision is not None and precision not in settings.precisions:
            continue
        rows += [_row(variant, backend, precision, b, "skipped", reason) for b in settings.batch_sizes]

    base = {r["batch"]: r["p50_ms"] for r in rows if r["variant"] == reference_variant(run) and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and base.get(r["batch"]):
            r["speedup_vs_pytorch"] = base[r["batch"]] / r["p50_ms"]

    machine = _percent_of_probe(run, rows)

    results = {
        "schema_version": SCHEMA_VERSION, "created": _now(), "machine": machine,
        "latency_definition": LATENCY_DEFINITION, "throughput_definition": THROUGHPUT_DEFINITION,
        "speedup_definition": SPEEDUP_DEFINITION, "gpu_compute_definition": GPU_COMPUTE_DEFINITION, "percentiles": "numpy.percentile, linear interpolation; "
        "std is the population standard deviation of the per-call times",
        "settings": settings.to_dict(), "input": input_info, "environment": environment(),
        "load_average": {"before": load_before, "after": _load_average(),
                         "note": "1-minute load average of the machine; above its core count other work competed"},
        "rows": rows,
    }
    atomic_write_json(run.file(RESULTS_FILE), results)
    return results


def _percent_of_probe(run: RunDir, rows: list[dict]) -> dict:
    """Each CPU row's throughput as a percent of this machine's probe (INT8 rows against the INT8 Q/DQ
    convolution, the rest against the FP32 one): a figure two machines of one kind can compare."""
    from rexport.core.machine import machine_fingerprint, percent_of_probe
    from rexport.pipeline.model_ops import macs_per_image

    machine = machine_fingerprint(probe=True)
    peaks = machine.get("peaks") or {}
    try:
        ops = 2 * macs_per_image(run.file(VARIANT_FILES["fp32"]), PreprocessSpec.from_onnx(
            run.file(VARIANT_FILES["fp32"])).input_size)
    except Exception as e:  # an imported graph shape inference cannot follow: no share of peak, said why
        machine["ops_per_image_error"] = first_line(e, 300)
        ops = 0
    machine["ops_per_image"] = ops
    for r in rows:
        r["percent_of_probe"] = None
        if r["status"] != "ok" or r.get("backend") == "tensorrt" or not ops:
            continue
        peak = peaks.get("int8_gops") if r.get("precision") == "int8" else peaks.get("fp32_gflops")
        r["percent_of_probe"] = percent_of_probe(ops, r["images_per_s"], peak)
    return machine


def bench_outcome(results: dict) -> StageOutcome:
    """The manifest record of a bench run: its file and a count of rows by status."""
    counts: dict[str, Any] = {}
    for r in results["rows"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    errors = sorted({f"{r['variant']}: {r['reason']}" for r in results["rows"] if r["status"] == "error"})
    return StageOutcome(outputs=[RESULTS_FILE], summary=BenchSummary(rows=counts, errors=errors).to_json())


def bench_inputs(run: RunDir) -> dict:
    """What a bench result depends on: every ONNX variant and every engine's sidecar."""
    from rexport.pipeline.variants import engine_dirs

    inputs = {v: run.file(rel) for v, rel in VARIANT_FILES.items() if run.file(rel).exists()}
    inputs.update({e: d / "sidecar.json" for e, d in engine_dirs(run).items()})
    return inputs


def run_bench_stage(run: RunDir, settings: BenchSettings, *, progress: bool = True, force: bool = True) -> dict:
    """The bench stage as the CLI (always redone: timings are of now) and ``rexport run`` (reused when
    nothing changed) call it; returns the stage record."""
    run.require_export()
    return run.run_stage("bench", inputs=bench_inputs(run), settings=settings.to_dict(),
                         action=lambda: bench_outcome(run_bench(run, settings, progress=progress)), force=force)
