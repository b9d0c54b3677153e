"""The build stage: compile the run's ONNX variants into engines, one folder per backend and precision.

Every precision is fixed in ONNX before this stage; a backend only compiles the file that
carries it (``source_variant``). Each engine is one manifest stage (``build:<backend>-<precision>``),
built into a temporary folder that replaces ``engines/<backend>-<precision>/`` only when the
build and its sidecar are complete. The caller holds the run lock.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from rexport.core.errors import InputError, MissingDependency
from rexport.core.fsio import atomic_dir
from rexport.pipeline.backends import Backend, BuildSettings, get_backend
from rexport.pipeline.backends.sidecar import SIDECAR_NAME, write_sidecar
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.summaries import BuildSummary, QuantizeSummary

def engine_dir_name(backend: str, precision: str) -> str:
    return f"{backend}-{precision}"


def _source_hint(variant: str) -> str:
    precision = variant.split("-", 1)[0]  # int8-openvino is made by quantize --precision int8
    return "run 'rexport export' first" if variant == "fp32" else f"run 'rexport quantize --precision {precision}' first"


def _calibration_cache(run: RunDir, b: Backend, precision: str) -> Path | None:
    """The TensorRT calibration cache that 'quantize:int8' wrote beside the Q/DQ model (legacy TensorRT 8.x builds)."""
    if b.name != "tensorrt" or precision != "int8":
        return None
    q = QuantizeSummary.of(run)
    rel = q.tensorrt_cache if q else None
    if rel and run.file(rel).is_file():
        return run.file(rel)
    return None


def build_engines(run: RunDir, *, backend: str = "auto", precisions: Sequence[str] | None = None,
                  settings: BuildSettings = BuildSettings(), progress: bool = True,
                  skip_unavailable: bool = False) -> list[dict]:
    """Build (or reuse) one engine per precision; return the stage records, each with its stage ``name``.

    ``precisions`` None means everything ``backend`` offers on this machine; what it cannot build
    here (a precision the CPU lacks, a variant not yet quantized) is recorded as skipped. Asked
    for explicitly, the same gaps are errors (exit 2), raised before anything is built.
    ``skip_unavailable`` (``rexport run``) records all of these as skipped instead of raising,
    the backend itself included when it cannot run here. An unknown precision always raises.
    """
    run.require_export()
    b = get_backend(backend)
    reason = b.unavailable_reason()
    if reason:
        if skip_unavailable:
            name = f"build:{b.name}"
            return [{**run.record_skip(name, reason, {"backend": b.name}), "name": name}]
        raise b.missing_dependency()

    explicit = precisions is not None
    wanted = list(dict.fromkeys(precisions)) if explicit else list(b.precisions)
    if explicit and not wanted:
        raise InputError("no precision given", f"use one or more of {', '.join(b.precisions)}")
    # Check every request up front so that a bad one leaves nothing half-built.
    plan: list[tuple[str, Path | None, str | None]] = []  # (precision, source onnx, why skipped)
    for p in wanted:
        if p not in b.precisions:
            note = b.precision_notes.get(p)
            raise InputError(f"{b.name} does not build {p!r} engines" + (f": {note}" if note else ""),
                             f"use {', '.join(b.precisions[:-1])} or {b.precisions[-1]}" if len(b.precisions) > 1
                             else f"use {b.precisions[0]}")
        why = b.precision_unavailable_reason(p)
        variant = b.source_variant(p, settings)
        src = run.file(VARIANT_FILES[variant])
        if why is None and not src.is_file():
            why = f"{VARIANT_FILES[variant]} not found ({_source_hint(variant)})"
            if explicit and not skip_unavailable:
                raise InputError(f"{src} not found: the {b.name}-{p} engine is built from the {variant} ONNX",
                                 _source_hint(variant))
        elif why is not None and explicit and not skip_unavailable:
            raise MissingDependency(f"{b.name}-{p}: {why}", f"leave out --precision {p}")
        plan.append((p, src, why))

    records = []
    base_settings = dataclasses.asdict(settings)
    for p, src, why in plan:
        name = f"build:{engine_dir_name(b.name, p)}"
        stage_settings = {**base_settings, "precision": p, "backend": b.name}
        if why is not None:
            records.append({**run.record_skip(name, why, stage_settings), "name": name})
            continue
        cache = _calibration_cache(run, b, p)
        inputs = {"onnx": src}
        if cache is not None:
            inputs["calibration_cache"] = cache
            intent = cache.with_name(cache.name + ".layers.json")    # the INT8 file's per-layer precisions
            if intent.is_file():     # a changed float choice must rebuild a weak-typed INT8 engine
                inputs["layer_intent"] = intent
        action = _build_action(run, b, p, src, settings, cache, progress)
        records.append({**run.run_stage(name, inputs=inputs, settings=stage_settings, action=action), "name": name})
    return records


def _build_action(run: RunDir, b: Backend, precision: str, src: Path, settings: BuildSettings,
                  cache: Path | None, progress: bool):
    def action() -> StageOutcome:
        folder = engine_dir_name(b.name, precision)
        final = run.path / "engines" / folder
        with atomic_dir(final) as tmp:
            sidecar = b.build(src, tmp, precision, settings, calibration_cache=cache, progress=progress)
            write_sidecar(tmp, sidecar)
        files = [*sidecar["engine_files"], SIDECAR_NAME]
        size = sum((final / f).stat().st_size for f in sidecar["engine_files"])
        return StageOutcome(
            outputs=[f"engines/{folder}/{f}" for f in files],
            summary=BuildSummary(backend=b.name, precision=precision, engine_dir=f"engines/{folder}",
                                 # which file the engine was compiled from (int8 for TensorRT, int8-openvino
                                 # for OpenVINO)
                                 source_onnx=sidecar["source_onnx"]["file"],
                                 source_variant=sidecar["source_onnx"]["variant"],
                                 size_mib=round(size / 2**20, 2), build_seconds=sidecar["build_seconds"]).to_json())
    return action
