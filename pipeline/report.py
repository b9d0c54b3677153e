"""The report users pick an engine from: built only from manifest.json and the stage result files
(validate/, eval/, bench/, engine sidecars), so every number in it can be traced to a stage.

report.json, report.md and report.html are rendered from one dict, and every number passes
through ``fmt`` so the three files (and the summary table of ``rexport run``) agree digit for digit.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from pathlib import Path
from typing import Any, Callable

from rexport.core.env import environment
from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json, atomic_write_text, read_json, sha256_file
from rexport.pipeline.bench import LATENCY_DEFINITION, RESULTS_FILE, variant_backend
from rexport.pipeline.manifest import VARIANT_FILES, RunDir
from rexport.pipeline.variants import REFERENCE, engine_dirs, list_variants, variant_precision

SCHEMA_VERSION = 1
REPORT_DIR = "report"
REPORT_FILES = ("report/report.json", "report/report.md", "report/report.html")
SYNTHETIC_CALIBRATION_WARNING = "INT8 ranges from synthetic data are not representative"
BACKEND_NAMES = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT",
                 "openvino": "OpenVINO"}
PREFERRED_LATENCY_BATCH = 1
PREFERRED_THROUGHPUT_BATCH = 8

# --- number formatting: the one place ---------------------------------------------------------

_PERCENT = "{:.2%}".format
_SCI = "{:.3e}".format
FORMATS: dict[str, Callable[[Any], str]] = {
    "size_mb": "{:.1f}".format,
    "max_abs": _SCI, "max_rel": _SCI, "rel_to_range": _SCI, "rel_error": _SCI,
    "cosine_min": "{:.6f}".format, "cosine_mean": "{:.6f}".format, "cosine": "{:.6f}".format,
    "top1_agreement": _PERCENT, "top5_agreement": _PERCENT,
    "accuracy_top1": _PERCENT, "accuracy_top5": _PERCENT, "top1": _PERCENT, "top5": _PERCENT,
    "drop_top1_vs_fp32": lambda v: f"{v * 100:+.2f} pp",
    "p50_ms": "{:.3f}".format, "p90_ms": "{:.3f}".format, "p99_ms": "{:.3f}".format,
    "mean_ms": "{:.3f}".format, "std_ms": "{:.3f}".format, "min_ms": "{:.3f}".format,
    "images_per_s": "{:.1f}".format, "speedup_vs_pytorch": "{:.2f}x".format,
}


def fmt(field: str, value: Any) -> str:
    """How ``value`` of ``field`` is written in every table: '-' when it was not measured."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    if isinstance(value, (int, float)) and field in FORMATS:
        return FORMATS[field](value)
    return str(value)


# --- reading the sources ----------------------------------------------------------------------

class _Sources:
    """Everything the report is built from, read once; ``problems`` collects what could not be read."""

    def __init__(self, run: RunDir) -> None:
        if not run.exists():
            raise InputError(f"no manifest.json in {run.path}", "run 'rexport export' first (or pass --out)")
        self.run = run
        self.manifest = run.manifest
        self.stages: dict[str, dict] = self.manifest.get("stages", {})
        self.problems: list[str] = []
        self.used_files: list[str] = []
        self.validate = self._read_dir("validate")
        self.evaluate = self._read_dir("eval")
        self.bench = self._read(RESULTS_FILE) if run.file(RESULTS_FILE).exists() else None
        self.sidecars = {}
        for name, d in engine_dirs(run).items():
            sc = self._read(str((d / "sidecar.json").relative_to(run.path)))
            if sc is not None:
                self.sidecars[name] = sc

    def _read(self, rel: str) -> dict | None:
        try:
            data = read_json(self.run.file(rel))
        except (OSError, ValueError) as e:
            self.problems.append(f"{rel} is unreadable ({type(e).__name__}); its numbers are left out")
            return None
        if not isinstance(data, dict):
            self.problems.append(f"{rel} is not a JSON object; its numbers are left out")
            return None
        self.used_files.append(rel)
        return data

    def _read_dir(self, folder: str) -> dict[str, dict]:
        out = {}
        d = self.run.file(folder)
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                data = self._read(f"{folder}/{p.name}")
                if data is not None:
                    out[data.get("variant") or p.stem] = data
        return out

    @property
    def export(self) -> dict:
        return self.stages.get("export") or {}

    @property
    def random_weights(self) -> bool:
        ex = self.export
        return bool(ex.get("summary", {}).get("random_weights", ex.get("settings", {}).get("weights") is None))


def _skipped_variants(src: _Sources, present: set[str]) -> dict[str, dict]:
    """Variants a build/quantize stage did not make: variant -> {status, reason, stage}."""
    out = {}
    for name, st in src.stages.items():
        kind, _, target = name.partition(":")
        if kind in ("build", "quantize") and target and target not in present and st.get("status") != "ok":
            out[target] = {"status": "skipped" if st.get("status") == "skipped" else "error",
                           "reason": st.get("reason") or "no reason recorded", "stage": name}
    return out


def _size_mb(run: RunDir, variant: str, sidecar: dict | None) -> float | None:
    if variant in VARIANT_FILES:
        p = run.file(VARIANT_FILES[variant])
        return p.stat().st_size / 1e6 if p.is_file() else None
    if sidecar is not None:
        d = run.path / "engines" / variant
        files = [d / f for f in sidecar.get("engine_files", {})]
        if files and all(f.is_file() for f in files):
            return sum(f.stat().st_size for f in files) / 1e6
    return None


def _bench_batches(src: _Sources) -> tuple[int | None, int | None]:
    """The batch of the latency column (1 if measured) and of the throughput column (8 if measured)."""
    if not src.bench:
        return None, None
    ok = sorted({r["batch"] for r in src.bench.get("rows", []) if r.get("status") == "ok"})
    if not ok:
        return None, None
    lat = PREFERRED_LATENCY_BATCH if PREFERRED_LATENCY_BATCH in ok else ok[0]
    thr = PREFERRED_THROUGHPUT_BATCH if PREFERRED_THROUGHPUT_BATCH in ok else ok[-1]
    return lat, thr


def _rows(src: _Sources) -> list[dict]:
    run = src.run
    present = list_variants(run)
    bench_rows = src.bench.get("rows", []) if src.bench else []
    seen = list(present)
    for v in [*src.validate, *src.evaluate, *(r["variant"] for r in bench_rows)]:
        if v not in seen:
            seen.append(v)
    skipped = _skipped_variants(src, set(present))
    lat_b, thr_b = _bench_batches(src)

    rows = []
    for variant in seen + [v for v in skipped if v not in seen]:
        sidecar = src.sidecars.get(variant)
        backend = sidecar.get("backend") if sidecar else variant_backend(variant)
        known = variant == REFERENCE or variant in VARIANT_FILES or "-" in variant  # "tensorrt" alone has none
        precision = sidecar.get("precision") if sidecar else (variant_precision(variant) if known else None)
        val, ev = src.validate.get(variant), src.evaluate.get(variant)
        by_batch = {r["batch"]: r for r in bench_rows if r.get("variant") == variant}
        row: dict[str, Any] = {
            "variant": variant, "backend": backend, "backend_name": BACKEND_NAMES.get(backend, backend),
            "precision": precision, "status": "ok", "reason": None,
            "size_mb": _size_mb(run, variant, sidecar),
            "max_abs": None, "max_rel": None, "rel_to_range": None, "cosine_min": None,
            "top1_agreement": None, "top5_agreement": None, "validation": None, "validation_failures": [],
            "against_source": None, "accuracy_top1": None, "accuracy_top5": None, "eval_n": None,
            "drop_top1_vs_fp32": None, "latency_batch": lat_b, "p50_ms": None, "p90_ms": None, "p99_ms": None,
            "throughput_batch": thr_b, "images_per_s": None, "speedup_vs_pytorch": None,
            "bench": {str(b): {k: r.get(k) for k in ("status", "reason", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                                                     "images_per_s", "speedup_vs_pytorch")}
                      for b, r in sorted(by_batch.items())},
            "notes": [],
        }
        if variant in skipped and variant not in present:
            row.update(status=skipped[variant]["status"], reason=skipped[variant]["reason"])
        elif variant not in present:
            row["notes"].append("artifact no longer in the run directory; numbers are from earlier result files")
        if variant == REFERENCE:
            row["validation"] = "reference"
        if val is not None:
            m = val.get("metrics", {})
            row.update({k: m.get(k) for k in ("max_abs", "max_rel", "rel_to_range", "cosine_min",
                                              "top1_agreement", "top5_agreement")})
            row["validation"] = "pass" if val.get("passed") else "FAIL"
            row["validation_failures"] = list(val.get("failures") or [])
            if val.get("against_source"):
                a = val["against_source"]
                row["against_source"] = {"variant": a.get("variant"), "passed": a.get("passed"),
                                         "max_abs": a.get("metrics", {}).get("max_abs"),
                                         "top1_agreement": a.get("metrics", {}).get("top1_agreement")}
                if a.get("passed") is False:
                    row["notes"].append(f"differs from its source {a.get('variant')} beyond tolerance")
            if row["validation"] == "FAIL":
                row["notes"].append("numerics FAIL: " + "; ".join(row["validation_failures"] or ["see validate"]))
        if ev is not None:
            row.update(accuracy_top1=ev.get("top1"), accuracy_top5=ev.get("top5"), eval_n=ev.get("n"),
                       drop_top1_vs_fp32=ev.get("drop_top1_vs_fp32"))
        lr, tr = by_batch.get(lat_b), by_batch.get(thr_b)
        if lr and lr.get("status") == "ok":
            row.update(p50_ms=lr.get("p50_ms"), p90_ms=lr.get("p90_ms"), p99_ms=lr.get("p99_ms"),
                       speedup_vs_pytorch=lr.get("speedup_vs_pytorch"))
        if tr and tr.get("status") == "ok":
            row["images_per_s"] = tr.get("images_per_s")
        if row["status"] == "ok":
            bad = sorted({r.get("reason") or r.get("status") for r in by_batch.values() if r.get("status") != "ok"})
            for reason in bad:
                row["notes"].append(f"bench: {reason}")
        rows.append(row)
    return rows


def summary_rows(run: RunDir) -> list[dict]:
    """One row per variant/engine (and per skipped build), as in the report."""
    return _rows(_Sources(run))


# --- tables -----------------------------------------------------------------------------------

def _columns(rows: list[dict], *, full: bool) -> list[tuple[str, str]]:
    lat_b = next((r["latency_batch"] for r in rows if r.get("latency_batch")), PREFERRED_LATENCY_BATCH)
    thr_b = next((r["throughput_batch"] for r in rows if r.get("throughput_batch")), PREFERRED_THROUGHPUT_BATCH)
    cols = [("variant", "variant"), ("backend", "backend"), ("precision", "precision"), ("size_mb", "size MB"),
            ("max_abs", "max err vs FP32")]
    if full:
        cols += [("rel_to_range", "err / logit range"), ("cosine_min", "cosine min")]
    cols += [("top1_agreement", "top-1 agree"), ("accuracy_top1", "acc top-1")]
    if full:
        cols += [("accuracy_top5", "acc top-5")]
    cols += [("p50_ms", f"p50 ms @b{lat_b}"), ("images_per_s", f"img/s @b{thr_b}"),
             ("speedup_vs_pytorch", f"speed-up @b{lat_b}"), ("validation", "numerics")]
    return cols


def _cells(row: dict, cols: list[tuple[str, str]]) -> list[str]:
    return [fmt(key, row.get(key)) for key, _ in cols]


def _skip_text(row: dict) -> str:
    return f"{row['status']}: {row['reason']}"


def _display_cells(row: dict, cols: list[tuple[str, str]]) -> list[str]:
    """A row of the report table: formatted values, or a skipped row's reason in the first measured column."""
    cells = _cells(row, cols)
    if row["status"] != "ok":
        cells = cells[:3] + [_skip_text(row)] + [""] * (len(cells) - 4)
    return cells + ["; ".join(row["notes"])]


def format_table(rows: list[dict]) -> str:
    """A plain-text table of ``summary_rows`` for the terminal; skipped rows spell out their reason."""
    cols = _columns(rows, full=False)
    headers = [h for _, h in cols]
    body = []
    for r in rows:
        cells = _cells(r, cols)
        body.append(cells[:3] + [_skip_text(r)] if r["status"] != "ok" else cells)
    widths = [len(h) for h in headers]
    for cells in body:
        if len(cells) == len(headers):
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]
        else:
            widths[:3] = [max(w, len(c)) for w, c in zip(widths[:3], cells[:3])]
    numeric = {i for i, (k, _) in enumerate(cols) if k in FORMATS}

    def line(cells: list[str]) -> str:
        parts = [c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in body]
    notes = [f"  {r['variant']}: {n}" for r in rows if r["status"] == "ok" for n in r["notes"]]
    if notes:
        out += ["notes:", *notes]
    return "\n".join(out)


# --- the report dict --------------------------------------------------------------------------

def _weights(src: _Sources) -> dict:
    ex = src.export
    s = ex.get("settings", {})
    seed = s.get("seed", 0)
    if src.random_weights:
        return {"random_init": True, "seed": seed, "path": None, "sha256": None,
                "text": f"random init (seed {seed}): accuracy numbers are meaningless"}
    inp = ex.get("inputs", {}).get("weights") or {}
    path, sha = inp.get("path") or s.get("weights"), inp.get("sha256")
    return {"random_init": False, "seed": None, "path": path, "sha256": sha,
            "text": f"{path} (sha256 {sha or 'not recorded'})"}


def _calibration(src: _Sources) -> dict | None:
    q = src.stages.get("quantize:int8")
    if not q:
        return None
    cal = dict(q.get("summary", {}).get("calibration") or {})
    if not cal:
        return {"status": q.get("status"), "reason": q.get("reason"), "text": "no calibration recorded"}
    cal["tensorrt_cache"] = q.get("summary", {}).get("tensorrt_cache")
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


def _skipped(src: _Sources, rows: list[dict]) -> list[dict]:
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


def _integrity_warnings(src: _Sources) -> list[str]:
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


def _warnings(src: _Sources, rows: list[dict], weights: dict, calibration: dict | None) -> list[str]:
    w = []
    if weights["random_init"]:
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
    if src.evaluate and weights["random_init"]:
        w.append("accuracy was evaluated on a randomly initialised model: it says nothing about the real model")
    w += src.problems
    w += _integrity_warnings(src)
    return w


def build_report(run: RunDir) -> dict:
    """The report as a dict (what report.json holds), without writing anything."""
    src = _Sources(run)
    rows = _rows(src)
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
    return {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run.path),
        "model": src.manifest.get("model") or export_settings.get("model"),
        "num_classes": src.export.get("summary", {}).get("num_classes") or export_settings.get("num_classes"),
        "preprocess": export_settings.get("preprocess"),
        "command": src.manifest.get("command"),
        "environment": env,
        "weights": weights,
        "calibration data": calibration,
        "warnings": _warnings(src, rows, weights, calibration),
        "skipped": _skipped(src, rows),
        "latency_definition": (src.bench or {}).get("latency_definition")
        or f"{LATENCY_DEFINITION} (no bench results: not measured)",
        "throughput_definition": (src.bench or {}).get("throughput_definition"),
        "speedup_definition": (src.bench or {}).get("speedup_definition"),
        "size_definition": "MB = 10^6 bytes of the ONNX file or the engine files; '-' for the PyTorch model",
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


# --- plots ------------------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float):
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    return Figure(figsize=(w, h))


def _color(report: dict, variant: str) -> str:
    """The same colour for a variant in every plot."""
    names = [r["variant"] for r in report["rows"]]
    return f"C{names.index(variant) % 10}" if variant in names else "C9"


def plot_accuracy_latency(report: dict) -> tuple[str | None, str]:
    """(a) top-1 accuracy (or top-1 agreement with FP32) against p50 latency: (png base64 | None, caption/why)."""
    rows = [r for r in report["rows"] if r["status"] == "ok" and r["p50_ms"] is not None]
    if not rows:
        return None, "No accuracy/latency plot: no variant has a measured latency (run 'rexport bench')."
    lat_b = rows[0]["latency_batch"]
    if any(r["accuracy_top1"] is not None for r in rows):
        key, label = "accuracy_top1", "top-1 accuracy"
        if report["weights"]["random_init"]:
            label += " (random weights: meaningless)"
    else:
        key, label = "top1_agreement", "top-1 agreement with PyTorch FP32 (not accuracy: nothing evaluated)"
    pts = [(r["p50_ms"], 1.0 if key == "top1_agreement" and r["variant"] == REFERENCE else r[key], r["variant"])
           for r in rows]
    missing = [v for _, y, v in pts if y is None]
    pts = [p for p in pts if p[1] is not None]
    if not pts:
        return None, f"No accuracy/latency plot: no variant has both a latency and a {label}."
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for x, y, v in pts:
        ax.scatter([x], [y], s=40, color=_color(report, v))
        ax.annotate(v, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel(f"p50 latency at batch {lat_b} (ms)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{label.split(' (')[0]} vs latency")
    caption = f"(a) {label} against p50 latency at batch {lat_b}, one point per variant."
    if key == "top1_agreement":
        caption += " PyTorch is the reference (agreement 1 by definition)."
    if missing:
        caption += f" Not plotted (no {label.split(' (')[0]}): {', '.join(missing)}."
    return _png(fig), caption


def plot_throughput(report: dict) -> tuple[str | None, str]:
    """(b) images/s against batch size, one line per variant."""
    bench = report.get("bench")
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in (bench or {}).get("rows") or []:
        if r.get("status") == "ok" and r.get("images_per_s") is not None:
            lines.setdefault(r["variant"], []).append((r["batch"], r["images_per_s"]))
    if not lines:
        return None, "No throughput plot: no bench results with a measured row (run 'rexport bench')."
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    batches = sorted({b for pts in lines.values() for b, _ in pts})
    for v, pts in lines.items():
        pts.sort()
        ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=v, color=_color(report, v))
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (images/s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("throughput vs batch size")
    return _png(fig), "(b) throughput (images/s = batch x 1000 / mean ms) against batch size, one line per variant."


def plot_per_layer(report: dict) -> tuple[str | None, str]:
    """(c) relative error of each INT8 layer output against FP32."""
    layers = [d for d in report.get("per_layer_int8") or [] if d.get("rel_error") is not None]
    if not layers:
        why = ("the INT8 validation recorded no per-layer errors" if "int8" in report.get("validation", {})
               else "no INT8 model was validated (run 'rexport quantize --precision int8' and 'rexport validate')")
        return None, f"No per-layer plot: {why}."
    fig = _figure(7.0, max(2.5, 0.22 * len(layers) + 1.2))
    ax = fig.add_subplot()
    names = [d.get("layer") or d.get("tensor") for d in layers]
    ax.barh(range(len(layers)), [d["rel_error"] for d in layers], color="#c0504d")
    ax.set_yticks(range(len(layers)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("relative error of the layer output vs FP32")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("INT8 per-layer error")
    return _png(fig), "(c) relative error of each INT8 layer output against FP32, in network order."


PLOTS = (plot_accuracy_latency, plot_throughput, plot_per_layer)


# --- markdown and html ------------------------------------------------------------------------

def _details(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The detail tables (title, headers, cells) shared by report.md and report.html."""
    out = []
    bench = report.get("bench")
    if bench and bench.get("rows"):
        keys = ["p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "images_per_s", "speedup_vs_pytorch"]
        rows = []
        for r in bench["rows"]:
            rs = r.get("runner_settings") or {}
            setting = ", ".join(f"{k}={v}" for k, v in rs.items()) or "-"
            if r.get("status") != "ok":
                rows.append([r["variant"], str(r["batch"]), f"{r['status']}: {r.get('reason')}"]
                            + ["" for _ in keys] + ["-", setting])
            else:
                rows.append([r["variant"], str(r["batch"]), "ok"] + [fmt(k, r.get(k)) for k in keys]
                            + [str(r.get("iterations")), setting])
        out.append(("Benchmark (every row)", ["variant", "batch", "status", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                                              "std ms", "img/s", "speed-up", "calls", "runner settings"], rows))
    if report.get("validation"):
        keys = ["max_abs", "max_rel", "rel_to_range", "cosine_min", "cosine_mean", "top1_agreement", "top5_agreement"]
        rows = []
        for v, d in report["validation"].items():
            for b, m in sorted((d.get("batches") or {}).items(), key=lambda kv: int(kv[0])):
                rows.append([v, b] + [fmt(k, m.get(k)) for k in keys] + [""])
            rows.append([v, "worst"] + [fmt(k, (d.get("metrics") or {}).get(k)) for k in keys]
                        + [fmt("passed", d.get("passed"))])
        out.append(("Numerics against PyTorch FP32", ["variant", "batch", "max abs", "max rel", "err / range",
                                                      "cosine min", "cosine mean", "top-1 agree", "top-5 agree",
                                                      "check"], rows))
    if report.get("evaluation"):
        rows = [[v, fmt("top1", d.get("top1")), fmt("top5", d.get("top5")), str(d.get("n")),
                 fmt("drop_top1_vs_fp32", d.get("drop_top1_vs_fp32")),
                 fmt("top1_agreement", d.get("agreement_top1_vs_fp32")),
                 str((d.get("dataset") or {}).get("source"))] for v, d in report["evaluation"].items()]
        out.append(("Accuracy", ["variant", "top-1", "top-5", "images", "top-1 drop vs FP32",
                                 "top-1 agree vs FP32", "dataset"], rows))
    if report.get("per_layer_int8"):
        rows = [[str(d.get("layer")), str(d.get("tensor")), fmt("rel_error", d.get("rel_error")),
                 fmt("cosine", d.get("cosine"))] for d in report["per_layer_int8"]]
        out.append(("INT8 per-layer error against FP32", ["layer", "tensor", "rel error", "cosine"], rows))
    if report.get("engines"):
        rows = [[n, json.dumps(e.get("runtime"), sort_keys=True), json.dumps(e.get("device"), sort_keys=True),
                 json.dumps(e.get("source_onnx"), sort_keys=True), json.dumps(e.get("build_settings"), sort_keys=True)]
                for n, e in report["engines"].items()]
        out.append(("Engines", ["engine", "runtime", "device", "source ONNX", "build settings"], rows))
    return out


def _facts(report: dict) -> list[tuple[str, str]]:
    env = report["environment"]
    cpu, gpu = env.get("cpu") or {}, env.get("gpu")
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    cal = report["calibration data"]
    load = env.get("load_average") or {}
    busy = f"; load average {load.get('before')} at bench start" if load.get("before") is not None else ""
    isa = ", ".join(cpu.get("isa") or []) or "no ISA flags"
    val_inputs = "; ".join(f"{v}: {i.get('kind')} ({i.get('source')}), {i.get('samples')} samples"
                           for v, i in report["validation_inputs"].items() if i) or "-"
    return [
        ("model", f"{report['model']} ({report['num_classes']} classes)"),
        ("weights", report["weights"]["text"]),
        ("calibration data", "-" if cal is None else cal.get("text", "-") + (
            f" — {cal['warning']}" if cal.get("warning") else "")),
        ("environment", f"CPU {cpu.get('model')} ({cpu.get('cores')} cores, {isa}); "
                        f"GPU {gpu['name'] if gpu else 'none'}; Python {env.get('python')}; {env.get('os')}; "
                        f"{versions}{busy}; source: {env.get('source')}"),
        ("validation inputs", val_inputs),
        ("latency", report["latency_definition"]),
        ("throughput", report["throughput_definition"] or "-"),
        ("speed-up", report["speedup_definition"] or "-"),
        ("size", report["size_definition"]),
    ]


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        r = r + [""] * (len(headers) - len(r))
        out.append("| " + " | ".join(_md_cell(c) for c in r) + " |")
    return out


def render_markdown(report: dict, captions: list[str]) -> str:
    md = [f"# rexport report: {report['model']}", ""]
    md += ["Reproduce with:", "", "```", report["command"] or "(command not recorded)", "```", ""]
    md += [f"- **{k}**: {_md_cell(v)}" for k, v in _facts(report)] + [""]
    md += ["## Warnings", ""] + ([f"- {w}" for w in report["warnings"]] or ["- none"]) + [""]
    md += ["## Skipped", ""] + ([f"- {s['text']}" for s in report["skipped"]] or ["- nothing"]) + [""]
    md += ["## Summary", ""] + _md_table(report["table"]["columns"], report["table"]["rows"]) + [""]
    md += ["## Plots", "", "The plots are in report.html; their data are the tables here.", ""]
    md += [f"- {c}" for c in captions] + [""]
    for title, headers, rows in _details(report):
        md += [f"## {title}", ""] + _md_table(headers, rows) + [""]
    md += [f"Built from: {', '.join(report['sources'])}.", ""]
    return "\n".join(md)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.skipped td{color:#777;background:#fafafa} td.fail{color:#b00;font-weight:bold}
.warn{background:#fff4d6;border:1px solid #e0c060;padding:.5em 1em}
.skip{background:#f4f4f4;border:1px solid #ccc;padding:.5em 1em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto} figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
figcaption{font-size:13px;max-width:640px} p.missing{border:1px dashed #aaa;padding:1em;color:#555;max-width:600px}
"""

# Marks each image as decoded (naturalWidth > 0) once the page has loaded: lets a headless browser check it.
_SCRIPT = """window.addEventListener('load',function(){var ok=0;document.querySelectorAll('img').forEach(function(i){
var d=i.complete&&i.naturalWidth>0;if(d)ok++;i.setAttribute('data-loaded',d?'yes':'no');
i.setAttribute('data-natural-width',String(i.naturalWidth));});
document.body.setAttribute('data-images-decoded',String(ok));});"""


def _h(s: Any) -> str:
    return html.escape(str(s))


def _html_table(headers: list[str], rows: list[list[str]], *, numeric: set[int] = frozenset(),
                row_classes: list[str] | None = None) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{_h(h)}</th>" for h in headers) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        tds = []
        for j, c in enumerate(r):
            kls = "num" if j in numeric and not (row_classes and row_classes[i]) else ""
            if c == "FAIL":
                kls = "fail"
            tds.append(f'<td class="{kls}">{_h(c)}</td>' if kls else f"<td>{_h(c)}</td>")
        out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_list(items: list[str], cls: str, empty: str) -> str:
    return f'<div class="{cls}"><ul>' + "".join(f"<li>{_h(i)}</li>" for i in items or [empty]) + "</ul></div>"


def render_html(report: dict, plots: list[tuple[str | None, str]]) -> str:
    keys = report["table"]["keys"]
    numeric = {i for i, k in enumerate(keys) if k in FORMATS}
    body = [f"<h1>rexport report: {_h(report['model'])}</h1>",
            "<p>Reproduce with:</p>", f"<pre><code>{_h(report['command'] or '(command not recorded)')}</code></pre>",
            "<ul>" + "".join(f"<li><b>{_h(k)}</b>: {_h(v)}</li>" for k, v in _facts(report)) + "</ul>",
            "<h2>Warnings</h2>", _html_list(report["warnings"], "warn", "none"),
            "<h2>Skipped</h2>", _html_list([s["text"] for s in report["skipped"]], "skip", "nothing"),
            "<h2>Summary</h2>",
            _html_table(report["table"]["columns"], report["table"]["rows"], numeric=numeric,
                        row_classes=["skipped" if r["status"] != "ok" else "" for r in report["rows"]]),
            "<h2>Plots</h2>"]
    for png, caption in plots:
        if png is None:
            body.append(f'<p class="missing">{_h(caption)}</p>')
        else:
            body.append(f'<figure><img alt="{_h(caption)}" src="data:image/png;base64,{png}">'
                        f"<figcaption>{_h(caption)}</figcaption></figure>")
    for title, headers, rows in _details(report):
        body += [f"<h2>{_h(title)}</h2>", _html_table(headers, rows)]
    body.append(f"<p>Built from: {_h(', '.join(report['sources']))}.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>rexport report: {_h(report['model'])}</title><style>{_CSS}</style>"
            f"<script>{_SCRIPT}</script></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run: RunDir) -> dict:
    """Write report/report.json, report.md and report.html atomically; return the report dict."""
    report = build_report(run)
    plots = [p(report) for p in PLOTS]
    report["plots"] = [{"name": p.__name__.removeprefix("plot_"), "drawn": png is not None, "caption": cap}
                       for p, (png, cap) in zip(PLOTS, plots)]
    md = render_markdown(report, [cap for _, cap in plots])
    page = render_html(report, plots)
    atomic_write_json(run.file(REPORT_FILES[0]), report)
    atomic_write_text(run.file(REPORT_FILES[1]), md)
    atomic_write_text(run.file(REPORT_FILES[2]), page)
    return report
