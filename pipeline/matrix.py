"""``rexport matrix``: the model x precision x backend matrix a team compares before choosing.

Each cell is a normal run directory (``OUT/<model>/<backend>-<precision>``), made by ``run_all``
exactly as ``rexport run`` makes it, so an unchanged cell is reused stage by stage, and one
combined report (``OUT/matrix.{json,md,html}``) sets the cells side by side. On Ray each cell is a
task that asks for what its backend needs: TensorRT cells a GPU and the ``tensorrt:<version>``
custom resource, so an engine is built on the kind of node it is for; CPU cells a whole node's
CPUs, so two cells never share cores while their latency is measured.
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rexport.core.errors import InputError
from rexport.pipeline.manifest import RunDir

PRECISIONS = ("fp32", "fp16", "int8")
MATRIX_FILES = ("matrix.json", "matrix.md", "matrix.html")


@dataclass(frozen=True)
class Row:
    """One model line of the matrix: a label (its folder) and its run settings ({stage: {field: value}})."""

    label: str
    values: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Cell:
    row: str
    backend: str
    precision: str
    values: dict[str, dict[str, Any]] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.row}/{self.backend}-{self.precision}"

    @property
    def variant(self) -> str:
        """The variant that stands for the cell: its engine, or the ONNX file where the backend has
        no engine of that precision (OpenVINO fp16 runs in ONNX Runtime)."""
        return f"{self.backend}-{self.precision}"


@dataclass(frozen=True)
class MatrixSettings:
    precisions: tuple[str, ...] = ("fp32", "int8")
    backends: tuple[str, ...] = ("openvino",)
    ray: str | None = None             # None: cells one after the other here; "default" or an address: on Ray
    tensorrt_version: str | None = None  # the custom resource a TensorRT cell asks for (default: installed one)
    cpus_per_cell: int | None = None   # None on Ray: the CPUs of the largest node (cells never share a node)


def label_of(model: str) -> str:
    """A folder name for a model (``timm:resnet50`` -> ``timm-resnet50``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-") or "model"


def plan_cells(rows: list[Row], settings: MatrixSettings) -> list[Cell]:
    """Every row x backend x precision, checked before any work (bad input: exit 2)."""
    from rexport.pipeline.backends import backends

    known = backends()
    bad = [b for b in settings.backends if b not in known]
    if bad:
        raise InputError(f"unknown backend {bad[0]!r} in --backends", f"use: {', '.join(sorted(known))}")
    badp = [p for p in settings.precisions if p not in PRECISIONS]
    if badp or not settings.precisions:
        raise InputError(f"bad --precisions {','.join(settings.precisions)}", f"use a list from {','.join(PRECISIONS)}")
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels):
        raise InputError(f"two matrix rows share the name {sorted(l for l in labels if labels.count(l) > 1)[0]!r}",
                         "give each model (or config file) once")
    cells = []
    for r in rows:
        for b in settings.backends:
            for p in settings.precisions:
                values = copy.deepcopy(r.values)
                values["run"] = {**values.get("run", {}), "precisions": ("fp32",) if p == "fp32" else ("fp32", p),
                                 "backend": b}
                cells.append(Cell(r.label, b, p, values))
    return cells


def cell_dir(out: Path, cell: Cell) -> Path:
    return Path(out) / cell.row / f"{cell.backend}-{cell.precision}"


def run_cell(out: str, cell: Cell, command: str) -> dict:
    """Make (or reuse) one cell's run directory with run_all; return its row for the matrix."""
    from rexport.pipeline.run import RunSettings, run_all

    run = RunDir(cell_dir(Path(out), cell))
    stages: list[tuple[str, dict]] = []
    t0 = time.perf_counter()
    with run.locked():
        outcome = run_all(run, RunSettings(values=cell.values, command=command, progress=False),
                          lambda name, rec: stages.append((name, rec)))
    # reused: nothing but the (always rewritten) report had to be done again
    redone = [n for n, r in stages if n != "report" and not r.get("reused") and r.get("status") != "skipped"]
    return {**cell_row(run, cell), "failed": outcome["failed"], "reused": not redone, "redone": redone,
            "seconds": round(time.perf_counter() - t0, 3)}


def cell_row(run: RunDir, cell: Cell) -> dict:
    """The numbers of the cell's own variant, from its run's report rows."""
    from rexport.pipeline.report import summary_rows

    rows = {r["variant"]: r for r in summary_rows(run)}
    row, note = rows.get(cell.variant), None
    if row is None or row["status"] != "ok":
        why = (row or {}).get("reason") or f"{cell.backend} builds no {cell.precision} engine"
        row, note = rows.get(cell.precision), f"{cell.variant}: {why}; the row is the ONNX {cell.precision} file"
    row = row or {}
    return {"cell": cell.name, "model": cell.row, "backend": cell.backend, "precision": cell.precision,
            "variant": row.get("variant"), "run_dir": str(run.path), "status": row.get("status", "missing"),
            "accuracy_top1": row.get("accuracy_top1"), "accuracy_top5": row.get("accuracy_top5"),
            "top1_agreement": row.get("top1_agreement"), "size_mib": row.get("size_mib"),
            "p50_ms": row.get("p50_ms"), "latency_batch": row.get("latency_batch"),
            "images_per_s": row.get("images_per_s"), "throughput_batch": row.get("throughput_batch"),
            "percent_of_probe": row.get("percent_of_probe"),
            "validation": row.get("validation"), "note": note}


def cell_resources(cell: Cell, settings: MatrixSettings, node_cpus: int) -> dict:
    """The Ray task options of a cell: what its backend needs from a node."""
    if cell.backend == "tensorrt":
        version = settings.tensorrt_version or _installed_tensorrt()
        opts: dict = {"num_gpus": 1, "num_cpus": 1}
        if version:
            opts["resources"] = {f"tensorrt:{version}": 1}
        return opts
    return {"num_cpus": settings.cpus_per_cell or node_cpus}


def seed_from_sibling(dest: Path, sibling: Path | None) -> None:
    """A new cell starts as a copy of a finished cell of the same model: the stages they share (export,
    fp32 validation, fp32 engines...) are then reused by content, as run_all checks every stage's
    inputs and settings; what differs is made anew. On Ray cells stay independent (no seeding)."""
    import shutil

    if sibling is None or dest.exists() or not (sibling / "manifest.json").is_file():
        return
    shutil.copytree(sibling, dest, ignore=shutil.ignore_patterns(".lock"))
    RunDir(dest).log(f"matrix: started as a copy of {sibling} (same model and settings); stages reused by content")


def _installed_tensorrt() -> str | None:
    """major.minor of the TensorRT on this machine, if any (the version a cell's engine is for)."""
    from rexport.core.env import package_version

    v = package_version("tensorrt")
    return ".".join(v.split(".")[:2]) if v else None


def _cell_task(log, index: int, cwd: str, out: str, cell: Cell, command: str) -> dict:
    import ray

    from rexport.pipeline.distributed import enter_driver_cwd, register_attempt

    register_attempt(ray, log, index)
    enter_driver_cwd(cwd)
    return guarded_cell(out, cell, command)


def guarded_cell(out: str, cell: Cell, command: str) -> dict:
    """run_cell, with a cell's bad input or failed stage recorded in its row: the matrix goes on."""
    from rexport.core.errors import RexportError

    try:
        return run_cell(out, cell, command)
    except RexportError as e:
        return unmeasured_cell(out, cell, "error", str(e))


def unmeasured_cell(out: str, cell: Cell, status: str, note: str) -> dict:
    """The row of a cell that was skipped (backend not here) or failed: no numbers, the reason."""
    return {"cell": cell.name, "model": cell.row, "backend": cell.backend, "precision": cell.precision,
            "run_dir": str(cell_dir(Path(out), cell)), "status": status, "note": note, "failed": [],
            "reused": False, "redone": []}


def run_matrix(out: str | Path, rows: list[Row], settings: MatrixSettings, *, command: str = "",
               echo: Callable[[dict], None] = lambda row: None) -> dict:
    """Every cell (here, or on Ray), then the combined report; returns the report dict."""
    from rexport.pipeline.matrix_report import write_matrix_report

    out = Path(out)
    cells = plan_cells(rows, settings)
    t0 = time.perf_counter()
    ray_info = None
    if settings.ray is None:
        from rexport.pipeline.backends import get_backend

        results, seeds = [], {}
        for cell in cells:  # a backend this machine cannot run is skipped, with its reason (Ray would place it)
            reason = get_backend(cell.backend).unavailable_reason()
            if reason:
                results.append(unmeasured_cell(str(out), cell, "skipped", f"{cell.backend}: {reason}"))
            else:
                seed_from_sibling(cell_dir(out, cell), seeds.get(cell.row))
                results.append(guarded_cell(str(out), cell, command))
                if results[-1]["status"] == "ok":
                    seeds.setdefault(cell.row, cell_dir(out, cell))
            echo(results[-1])
    else:
        import os

        from rexport.pipeline.distributed import ray_session, run_tasks

        with ray_session(settings.ray) as ray:
            node_cpus = max([int(n.get("Resources", {}).get("CPU", 1)) for n in ray.nodes() if n.get("Alive")] or [1])
            calls = [(os.getcwd(), str(out.resolve()), cell, command) for cell in cells]
            results, ray_info = run_tasks(ray, _cell_task, calls, what="matrix cell",
                                          options=[cell_resources(c, settings, node_cpus) for c in cells])
        for r in results:
            echo(r)
    return write_matrix_report(out, results, {"command": command, "seconds": round(time.perf_counter() - t0, 3),
                                              "ray": ray_info, "precisions": list(settings.precisions),
                                              "backends": list(settings.backends)})
