"""The report dict (what report.json holds): rows, weights, calibration, warnings, skips, sections."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from rexport.core.env import environment
from rexport.core.fsio import sha256_file
from rexport.pipeline.bench import LATENCY_DEFINITION, RESULTS_FILE
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.reporting.formatting import BACKEND_NAMES
from rexport.pipeline.reporting.rows import rows_of
from rexport.pipeline.reporting.sections import build_sections
from rexport.pipeline.reporting.sources import Sources
from rexport.pipeline.reporting.tables import _columns, _display_cells

SCHEMA_VERSION = 1
SYNTHETIC_CALIBRATION_WARNING = "INT8 ranges from synthetic data are not representative"


def _weights(src: Sources) -> dict:
    ex = src.export
    s = ex.get("settings", {})
    seed = s.get("seed", 0)
    if src.random_weights:
        return {"random_weights": True, "seed": seed, "path": None, "sha256": None,
                "text": f"random init (seed {seed}): accuracy numbers are meaningless"}
    inp = ex.get("inputs", {}).get("weights") or ex.get("inputs", {}).get("onnx") or {}  # onnx: imported
    path, sha = inp.get("path") or s.get("weights"), inp.get("sha256")
    return {"random_weights": False, "seed": None, "path": path, "sha256": sha,
            "text": f"{path} (sha256 {sha or 'not recorded'})"}


def _calibration(src: Sources) -> dict | None:
    q = src.stages.get("quantize:int8")
    if not q:
        return None
    summary = src.summary("quantize:int8")
    if summary is None:
        return {"status": q.get("status"), "reason": q.get("reason"), "text": "no calibration recorded"}
    cal = summary.calibration.to_json()
    cal["tensorrt_cache"] = summary.tensorrt_cache
    if cal.get("synthetic"):
        cal["warning"] = SYNTHETIC_CALIBRATION_WARNING
    parts = [f"{cal.get('method', '?')} on {cal.get('samples', '?')} samples from {cal.get('data', '?')}"]
    if cal.get("key"):
        parts.append(f"key {cal['key']}")
    if cal.get("reused"):
        parts.append("ranges reused from an earlier run")
    cal["text"] = ", ".join(parts)
    return cal


def _stage_label(name: str) -> str:
    kind, _, target = name.partition(":")
    if kind == "build":
        backend, _, precision = target.partition("-")
        return f"{BACKEND_NAMES.get(backend, backend)} {precision.upper()}".strip()
    if kind == "quantize":
        return f"{target.upper()} quantization"
    of = f" of {target}" if target else ""
    return {"validate": f"validation{of}", "evaluate": f"evaluation{of}",
            "bench": "benchmark", "export": "export", "report": "report"}.get(kind, name)


def _skipped(src: Sources, rows: list[dict]) -> list[dict]:
    out = [{"stage": name, "reason": st.get("reason") or "no reason recorded",
            "text": f"{_stage_label(name)}: skipped, {st.get('reason') or 'no reason recorded'}"}
           for name, st in src.stages.items() if st.get("status") == "skipped"]
    build_skips = {r["variant"] for r in rows if r["status"] != "ok"}
    seen = set()
    for r in (src.bench or {}).get("rows", []):
        if r.get("status") == "skipped" and r["variant"] not in build_skips and r["variant"] not in seen:
            seen.add(r["variant"])
            out.append({"stage": "bench", "variant": r["variant"], "reason": r.get("reason"),
                        "text": f"benchmark of {r['variant']}: skipped, {r.get('reason')}"})
    return out


def _integrity_warnings(src: Sources) -> list[str]:
    """Result files edited after their stage recorded them, and stages made from older inputs."""
    recorded: dict[str, str | None] = {}
    for st in src.stages.values():
        recorded.update(st.get("outputs") or {})
    out = []
    for rel in src.used_files:
        if rel not in recorded:
            out.append(f"{rel} is not recorded in manifest.json (made outside rexport?)")
        elif recorded[rel] and sha256_file(src.run.file(rel)) != recorded[rel]:
            out.append(f"{rel} changed after its stage recorded it")
    for name, st in src.stages.items():
        if st.get("status") != "ok":
            continue
        for inp in (st.get("inputs") or {}).values():
            p = (inp or {}).get("path")
            if not p:
                continue
            for rel, sha in recorded.items():
                if p == rel or Path(p).as_posix().endswith("/" + rel):
                    if sha and inp.get("sha256") and inp["sha256"] != sha:
                        out.append(f"{name} was made from an older {rel}; re-run it")
                    break
    return out


def _warnings(src: Sources, rows: list[dict], weights: dict, calibration: dict | None) -> list[str]:
    w = []
    if weights["random_weights"]:
        w.append(weights["text"])
    if calibration and calibration.get("warning"):
        w.append(calibration["warning"])
    if not src.manifest.get("command"):
        w.append("the command that made this run was not recorded in manifest.json")
    for name, st in src.stages.items():
        if st.get("status") in ("failed", "error"):
            w.append(f"{name}: {st['status']}: {st.get('reason') or 'no reason recorded'}")
    for r in rows:
        if r["validation"] == "FAIL":
            w.append(f"{r['variant']}: numerics check FAILED ({'; '.join(r['validation_failures']) or 'see validate'})")
    if src.bench is None:
        w.append("no bench results: latency and throughput are not measured (run 'rexport bench')")
    else:
        load = src.bench.get("load_average") or {}
        cores = ((src.bench.get("environment") or {}).get("cpu") or {}).get("cores") or 0
        if cores and (load.get("before") or 0) > 1.5 * cores:
            w.append(f"the machine was busy when the bench started (load average {load['before']} on {cores} cores): "
                     "latencies include competition from other work")
        for r in src.bench.get("rows", []):
            if r.get("status") == "error":
                w.append(f"bench {r['variant']} @b{r['batch']}: error: {r.get('reason')}")
            elif r.get("status") == "ok" and r.get("stable") is False:
                w.append(f"bench {r['variant']} @b{r['batch']}: p50 not stable within "
                         f"{src.bench.get('settings', {}).get('stability', 0.05):.0%} after "
                         f"{r.get('timed_s')} s: treat this latency with care")
    if src.evaluate and weights["random_weights"]:
        w.append("accuracy was evaluated on a randomly initialised model: it says nothing about the real model")
    w += src.problems
    w += _integrity_warnings(src)
    return w


def build_report(run: RunDir) -> dict:
    """The report as a dict (what report.json holds), without writing anything."""
    src = Sources(run)
    rows = rows_of(src)
    weights, calibration = _weights(src), _calibration(src)
    if src.bench and src.bench.get("environment"):
        env = {**src.bench["environment"], "load_average": src.bench.get("load_average"),
               "source": f"{RESULTS_FILE} (the machine that measured the latencies)"}
    else:
        env = {**environment(), "source": "report time (no bench results)"}
    cols = _columns(rows, full=True)
    val_inputs = {v: d.get("inputs") for v, d in src.validate.items()}
    per_layer = (src.validate.get("int8") or {}).get("per_layer") or []
    export_settings = src.export.get("settings", {})
    report = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run.path),
        "model": src.manifest.get("model") or export_settings.get("model"),
        "num_classes": getattr(src.export_summary, "num_classes", None) or export_settings.get("num_classes"),
        "preprocess": export_settings.get("preprocess"),
        "command": src.manifest.get("command"),
        "environment": env,
        "machine": (src.bench or {}).get("machine"),   # the probe behind '% of probe' (rexport.core.machine)
        "weights": weights,
        "calibration": calibration,
        "warnings": _warnings(src, rows, weights, calibration),
        "skipped": _skipped(src, rows),
        "latency_definition": (src.bench or {}).get("latency_definition")
        or f"{LATENCY_DEFINITION} (no bench results: not measured)",
        "throughput_definition": (src.bench or {}).get("throughput_definition"),
        "speedup_definition": (src.bench or {}).get("speedup_definition"),
        "size_definition": "MiB = 2^20 bytes of the ONNX file or the engine files; '-' for the PyTorch model",
        "rows": rows,
        "table": {"columns": [h for _, h in cols] + ["notes"], "keys": [k for k, _ in cols] + ["notes"],
                  "rows": [_display_cells(r, cols) for r in rows]},
        "validation_inputs": val_inputs,
        "validation": {v: {k: d.get(k) for k in ("batches", "metrics", "tolerances", "passed", "failures",
                                                 "against_source")} for v, d in src.validate.items()},
        "evaluation": src.evaluate,
        "bench": None if src.bench is None else {k: src.bench.get(k) for k in ("created", "settings", "input", "rows")},
        "engines": {n: {k: sc.get(k) for k in ("backend", "precision", "source_onnx", "runtime", "device",
                                               "load_settings", "build_settings")} for n, sc in src.sidecars.items()},
        "per_layer_int8": per_layer,
        "sources": ["manifest.json", *src.used_files],
    }
    report["sections"] = build_sections(src, report)
    report["sources"] = ["manifest.json", *src.used_files]  # a section may have read more files
    return report

