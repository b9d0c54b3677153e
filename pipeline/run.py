"""``rexport run`` / ``make engine``: every stage in order, one line each, a summary at the end.

A failed check (numerics out of tolerance) does not stop the chain: it is marked in the summary
and the report, and the run exits 1 at the end. Bad input stops it (exit 2), before any work.

``run`` takes every stage's options: ``run_stages()`` lists the stages and their settings classes,
and the CLI makes one option per field (rexport/cli/options.py), so a stage and ``run`` cannot drift.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rexport.core.errors import InputError
from rexport.core.settings import setting, settings_dict
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.summaries import BenchSummary

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class RunOptions:
    """What only ``run`` decides: which variants to make, on which engine backend."""

    precisions: tuple[str, ...] = setting(PRECISIONS, help="ONNX variants to make, from fp32,fp16,int8 (with fp32).")
    backend: str = setting("auto", help="Engine backend: auto, tensorrt or openvino.")

    def __post_init__(self) -> None:
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown or "fp32" not in self.precisions:
            raise InputError(f"bad --precisions {','.join(self.precisions)}",
                             "use a list from fp32,fp16,int8 including fp32")


def run_stages() -> tuple[tuple[str, type, str, bool], ...]:
    """(stage, settings class, prefix on ``run``, prefix every field), in run order. On ``run`` a field
    is named as on its stage command, prefixed with its stage's prefix when another stage has the same
    name, or always for stages whose fields only make sense with it (``--bench-min-time``). The first
    two (run's own options, export) keep their bare names. A stage ``run`` chains adds one entry here."""
    from rexport.pipeline.backends import BuildSettings
    from rexport.pipeline.bench import BenchSettings
    from rexport.pipeline.evaluate import EvaluateSettings
    from rexport.pipeline.export_options import ExportOptions
    from rexport.pipeline.quantize import QuantizeSettings
    from rexport.pipeline.validate import ValidateSettings

    return (("run", RunOptions, "run", False), ("export", ExportOptions, "export", False),
            ("validate", ValidateSettings, "validate", True), ("quantize", QuantizeSettings, "calib", False),
            ("build", BuildSettings, "build", False), ("evaluate", EvaluateSettings, "eval", True),
            ("bench", BenchSettings, "bench", True))


@dataclass
class RunSettings:
    """The user's values per stage ({stage: {field: value}}, what flags or a config file gave; the
    rest are the classes' defaults), and how to run."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    command: str = ""
    progress: bool = True

    def given(self, stage: str) -> dict[str, Any]:
        return dict(self.values.get(stage) or {})

    def stage(self, name: str, **fixed):
        """The settings object of stage ``name`` (None for evaluate without labelled data)."""
        cls = {s: c for s, c, *_ in run_stages()}[name]
        vals = {**self.given(name), **fixed}
        if name == "evaluate" and not vals.get("val_data"):
            return None
        if name == "validate" and "data" not in vals:
            vals["data"] = self.validation_data()
        if name == "quantize":
            vals = self.with_proof_data(vals)
        obj = cls(**vals)
        return obj.to_settings() if name == "export" else obj

    def validation_data(self) -> str:
        """Validate on real images when the user gave some (the labelled set, else the calibration
        folder, less the calibrated samples): INT8 ranges calibrated on images say little about how a
        model treats noise."""
        calib = self.given("quantize").get("calib_data")
        real = next((d for d in (self.given("evaluate").get("val_data"), calib) if d and Path(d).exists()
                     and (Path(d).is_dir() or Path(d).suffix in (".npz", ".npy"))), None)
        return real or "synthetic"

    def with_proof_data(self, vals: dict[str, Any]) -> dict[str, Any]:
        """The INT8 FP16-float proof runs on the validation inputs and, when given, the labelled set."""
        vals = dict(vals)
        vals.setdefault("int8_float_data", self.validation_data())
        vals.setdefault("int8_float_val_data", self.given("evaluate").get("val_data"))
        vals.setdefault("budget_val_data", self.given("evaluate").get("val_data"))  # an INT8 budget is proved on VAL
        return vals

    def effective(self) -> dict[str, dict[str, Any]]:
        """Every stage's settings as they will run, defaults included: {stage: {field: value}}."""
        out = {}
        for name, cls, *_ in run_stages():
            vals = self.given(name)
            if name == "validate" and "data" not in vals:
                vals["data"] = self.validation_data()
            if name == "quantize":
                vals["precision"] = "int8"
                vals = self.with_proof_data(vals)
            obj = None if (name == "evaluate" and not vals.get("val_data")) else cls(**vals)
            out[name] = settings_dict(obj) if obj is not None else {**vals, "val_data": None}
            if name == "quantize":
                out[name].pop("precision", None)
        return out


def engine_precisions(offered: tuple[str, ...], wanted: tuple[str, ...]) -> list[str]:
    """What a backend builds for the run's precisions: bf16 rides along with fp32 where offered."""
    return [p for p in offered if p in wanted or (p == "bf16" and "fp32" in wanted)]


def run_all(run: RunDir, s: RunSettings, echo: Callable[[str, dict], None], *,
            record: dict | None = None) -> dict:
    """Every stage in order; ``record`` (the effective settings and where they came from) goes into
    the manifest as ``run_settings``."""
    from rexport.pipeline.backends import backends, get_backend
    from rexport.pipeline.bench import run_bench_stage
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.evaluate import run_evaluate
    from rexport.pipeline.export import run_export
    from rexport.pipeline.quantize import run_quantize
    from rexport.pipeline.report import run_report_stage
    from rexport.pipeline.validate import run_validate
    from rexport.pipeline.variants import engine_dirs

    opts = s.stage("run")
    precisions = opts.precisions
    # every setting is checked before any work: bad input is exit 2 with nothing half made
    export_settings, vs, build_settings = s.stage("export"), s.stage("validate"), s.stage("build")
    quantize = {p: s.stage("quantize", precision=p) for p in ("fp16", "int8") if p in precisions}
    es, bench_settings = s.stage("evaluate"), s.stage("bench")

    failed: list[str] = []
    t_start = time.perf_counter()
    run.manifest["command"] = s.command
    run.manifest["run_settings"] = record if record is not None else {"settings": s.effective()}
    run.save()

    def note_checks(recs: list[dict]) -> None:
        for r in recs:
            echo(f"validate:{r['variant']}", r)
            if r.get("status") == "failed":
                failed.append(f"validate:{r['variant']}")

    if getattr(export_settings, "onnx", None):  # ImportSettings: the run starts from an ONNX file
        from rexport.pipeline.import_onnx import run_import

        echo("import", run_import(run, export_settings))
    else:
        echo("export", run_export(run, export_settings))
    # Quantize before validating anything: validation on real images leaves out the samples INT8
    # calibration used, so validate:fp32 run before quantize:int8 would change its inputs on a rerun.
    for p, q in quantize.items():
        rec = run_quantize(run, q, progress=s.progress)
        echo(f"quantize:{p}", rec)
        if rec.get("status") == "failed":  # an INT8 budget not met: carry on with the best file, exit 1 at the end
            failed.append(f"quantize:{p}")
    # quantize:int8 writes both INT8 forms (int8 for TensorRT, int8-openvino): validate every ONNX variant made
    note_checks(run_validate(run, vs, ["fp32", *(v for v in run.variants() if v.split("-", 1)[0] in quantize)]))

    chosen = get_backend(opts.backend)
    if opts.backend != "auto" and chosen.unavailable_reason():  # asked for by name: bad environment, exit 2
        raise chosen.missing_dependency()
    for name, b in backends().items():  # say plainly which engine backends did not run, and why
        reason = b.unavailable_reason()
        if name != chosen.name and reason:
            echo(f"build:{name}", run.record_skip(f"build:{name}", reason))
    builds = build_engines(run, backend=chosen.name, precisions=engine_precisions(chosen.precisions, precisions),
                           settings=build_settings, progress=s.progress, skip_unavailable=True)
    for r in builds:
        echo(r.get("name", f"build:{chosen.name}"), r)
    engines = [e for e in engine_dirs(run) if e.startswith(chosen.name + "-")]
    if engines:
        note_checks(run_validate(run, vs, engines))
    if es is not None:
        for r in run_evaluate(run, es):
            echo(f"evaluate:{r['variant']}", r)
    else:
        echo("evaluate", run.record_skip("evaluate", "no labelled data given (--val-data / VAL=)"))
    bench = run_bench_stage(run, bench_settings, progress=s.progress, force=False)
    echo("bench", bench)
    if (BenchSummary.from_stage(bench) or BenchSummary(rows={})).errors:
        failed.append("bench")
    echo("report", run_report_stage(run))
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
        bench = json.loads(results.read_text())
        unstable = [f"{r['variant']} b{r['batch']}" for r in bench.get("rows", [])
                    if r.get("status") == "ok" and r.get("stable") is False]
        if unstable:
            notes.append(f"latency did not settle for {', '.join(unstable)} (a busy machine?): "
                         "their speed-ups are rough; rerun 'rexport bench'")
    return notes
