"""``rexport run`` / ``make engine``: every stage in order, one line each, a summary at the end.

A failed check (numerics out of tolerance) does not stop the chain: it is marked in the summary
and the report, and the run exits 1 at the end. Bad input stops it (exit 2).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rexport.core.errors import InputError
from rexport.pipeline.manifest import RunDir


@dataclass
class RunSettings:
    export: "object"                                  # ExportSettings
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    backend: str = "auto"
    calib_data: str = "synthetic"
    calib_samples: int = 512
    calib_method: str = "entropy"
    val_data: str | None = None
    val_samples: int | None = None
    validate_samples: int = 16
    bench_batch_sizes: tuple[int, ...] = (1, 8)
    bench_min_time: float = 1.0
    command: str = ""
    progress: bool = True
    notes: list[str] = field(default_factory=list)


def engine_precisions(offered: tuple[str, ...], wanted: tuple[str, ...]) -> list[str]:
    """What a backend builds for the run's precisions: bf16 rides along with fp32 where offered."""
    return [p for p in offered if p in wanted or (p == "bf16" and "fp32" in wanted)]


def run_all(run: RunDir, s: RunSettings, echo: Callable[[str, dict], None]) -> dict:
    from rexport.pipeline.backends import BuildSettings, backends, get_backend
    from rexport.pipeline.bench import BenchSettings
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate
    from rexport.pipeline.export import run_export
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize
    from rexport.pipeline.validate import ValidateSettings, run_validate
    from rexport.pipeline.variants import engine_dirs

    unknown = set(s.precisions) - {"fp32", "fp16", "int8"}
    if unknown or "fp32" not in s.precisions:
        raise InputError(f"bad --precisions {','.join(s.precisions)}", "use a list from fp32,fp16,int8 including fp32")
    failed: list[str] = []
    t_start = time.perf_counter()
    run.manifest["command"] = s.command
    run.save()

    def note_checks(recs: list[dict]) -> None:
        for r in recs:
            echo(f"validate:{r['variant']}", r)
            if r.get("status") == "failed":
                failed.append(f"validate:{r['variant']}")

    rec = run_export(run, s.export)
    echo("export", rec)
    # Validate on real images when the user gave some (labelled set, else the calibration folder):
    # INT8 ranges calibrated on images say little about how a model treats noise.
    real = next((d for d in (s.val_data, s.calib_data) if d and Path(d).is_dir()), None)
    vs = ValidateSettings(data=real or "synthetic", samples=s.validate_samples)
    note_checks(run_validate(run, vs, ["fp32"]))
    for p in ("fp16", "int8"):
        if p in s.precisions:
            q = QuantizeSettings(precision=p, calib_data=s.calib_data, calib_samples=s.calib_samples,
                                 calib_method=s.calib_method)
            echo(f"quantize:{p}", run_quantize(run, q, progress=s.progress))
    onnx_low = [p for p in ("fp16", "int8") if p in s.precisions]
    if onnx_low:
        note_checks(run_validate(run, vs, onnx_low))

    chosen = get_backend(s.backend)
    if s.backend != "auto" and chosen.unavailable_reason():  # asked for by name: bad environment, exit 2
        raise chosen.missing_dependency()
    for name, b in backends().items():  # say plainly which engine backends did not run, and why
        reason = b.unavailable_reason()
        if name != chosen.name and reason:
            echo(f"build:{name}", run.record_skip(f"build:{name}", reason))
    builds = build_engines(run, backend=chosen.name, precisions=engine_precisions(chosen.precisions, s.precisions),
                           settings=BuildSettings(), progress=s.progress, skip_unavailable=True)
    for r in builds:
        echo(r.get("name", f"build:{chosen.name}"), r)
    engines = [e for e in engine_dirs(run) if e.startswith(chosen.name + "-")]
    if engines:
        note_checks(run_validate(run, vs, engines))
    if s.val_data:
        for r in run_evaluate(run, EvaluateSettings(val_data=s.val_data, samples=s.val_samples)):
            echo(f"evaluate:{r['variant']}", r)
    else:
        echo("evaluate", run.record_skip("evaluate", "no labelled data given (--val-data / VAL=)"))
    bench_settings = BenchSettings(batch_sizes=s.bench_batch_sizes, min_time=s.bench_min_time)
    bench = run.run_stage("bench", inputs=_artifact_inputs(run), settings=_bench_record(bench_settings),
                          action=lambda: _bench_action(run, bench_settings, s.progress))
    echo("bench", bench)
    if bench.get("summary", {}).get("errors"):
        failed.append("bench")
    echo("report", run.run_stage("report", inputs={}, settings={}, action=lambda: _report_action(run), force=True))
    return {"failed": failed, "seconds": time.perf_counter() - t_start}


def run_notes(run: RunDir, *, weights, calib_data: str, precisions, val_data) -> list[str]:
    """What a reader of the summary must know: made-up inputs, and timings that did not settle."""
    notes = []
    if not weights:
        notes.append("random weights (no --weights): accuracy and agreement figures say nothing about a trained model")
    if calib_data == "synthetic" and "int8" in precisions:
        notes.append("synthetic calibration data: INT8 ranges are not representative of real images")
    if not val_data:
        notes.append("no labelled data (--val-data): the accuracy stage did not run")
    results = run.file("bench/results.json")
    if results.exists():
        import json

        bench = json.loads(results.read_text())
        unstable = [f"{r['variant']} b{r['batch']}" for r in bench.get("rows", [])
                    if r.get("status") == "ok" and r.get("stable") is False]
        if unstable:
            notes.append(f"latency did not settle for {', '.join(unstable)} (a busy machine?): "
                         "their speed-ups are rough; rerun 'rexport bench'")
    return notes


def _artifact_inputs(run: RunDir) -> dict:
    from rexport.pipeline.manifest import VARIANT_FILES
    from rexport.pipeline.variants import engine_dirs

    inputs = {v: run.file(rel) for v, rel in VARIANT_FILES.items() if run.file(rel).exists()}
    inputs.update({e: d / "sidecar.json" for e, d in engine_dirs(run).items()})
    return inputs


def _bench_record(settings) -> dict:
    from dataclasses import asdict

    return asdict(settings)


def _bench_action(run: RunDir, settings, progress: bool):
    from rexport.pipeline.bench import bench_outcome, run_bench

    return bench_outcome(run_bench(run, settings, progress=progress))


def _report_action(run: RunDir):
    from rexport.pipeline.manifest import StageOutcome
    from rexport.pipeline.report import write_report

    write_report(run)
    return StageOutcome(outputs=["report/report.json", "report/report.md", "report/report.html"])
