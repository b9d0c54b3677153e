"""One row per variant/engine (and per skipped build): the numbers of every stage side by side."""
from __future__ import annotations

from typing import Any

from rexport.pipeline.bench import variant_backend
from rexport.pipeline.manifest import VARIANT_FILES, RunDir
from rexport.pipeline.reporting.formatting import BACKEND_NAMES, PREFERRED_LATENCY_BATCH, PREFERRED_THROUGHPUT_BATCH
from rexport.pipeline.reporting.sources import Sources
from rexport.pipeline.variants import NO_PYTORCH, REFERENCE, list_variants, variant_precision


def _skipped_variants(src: Sources, present: set[str]) -> dict[str, dict]:
    """Variants a build/quantize stage did not make: variant -> {status, reason, stage}."""
    out = {}
    for name, st in src.stages.items():
        kind, _, target = name.partition(":")
        if kind in ("build", "quantize") and target and target not in present and st.get("status") != "ok":
            out[target] = {"status": "skipped" if st.get("status") == "skipped" else "error",
                           "reason": st.get("reason") or "no reason recorded", "stage": name}
    return out


def _size_mib(run: RunDir, variant: str, sidecar: dict | None) -> float | None:
    if variant in VARIANT_FILES:
        p = run.file(VARIANT_FILES[variant])
        return p.stat().st_size / 2**20 if p.is_file() else None
    if sidecar is not None:
        d = run.path / "engines" / variant
        files = [d / f for f in sidecar.get("engine_files", {})]
        if files and all(f.is_file() for f in files):
            return sum(f.stat().st_size for f in files) / 2**20
    return None


def _bench_batches(src: Sources) -> tuple[int | None, int | None]:
    """The batch of the latency column (1 if measured) and of the throughput column (8 if measured)."""
    if not src.bench:
        return None, None
    ok = sorted({r["batch"] for r in src.bench.get("rows", []) if r.get("status") == "ok"})
    if not ok:
        return None, None
    lat = PREFERRED_LATENCY_BATCH if PREFERRED_LATENCY_BATCH in ok else ok[0]
    thr = PREFERRED_THROUGHPUT_BATCH if PREFERRED_THROUGHPUT_BATCH in ok else ok[-1]
    return lat, thr


def rows_of(src: Sources) -> list[dict]:
    run = src.run
    present = list_variants(run)
    bench_rows = src.bench.get("rows", []) if src.bench else []
    seen = list(present)
    for v in [*src.validate, *src.evaluate, *(r["variant"] for r in bench_rows)]:
        if v not in seen:
            seen.append(v)
    skipped = _skipped_variants(src, set(present))
    if run.imported:  # no PyTorch model: the row says so, first, where the reference would be
        skipped[REFERENCE] = {"status": "skipped", "reason": NO_PYTORCH, "stage": "import"}
        seen = [REFERENCE] + [v for v in seen if v != REFERENCE]
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
            "size_mib": _size_mib(run, variant, sidecar),
            "max_abs": None, "max_rel": None, "rel_to_range": None, "cosine_min": None,
            "top1_agreement": None, "top5_agreement": None, "validation": None, "validation_failures": [],
            "against_source": None, "accuracy_top1": None, "accuracy_top5": None, "eval_n": None,
            "drop_top1_vs_reference": None, "latency_batch": lat_b, "p50_ms": None, "p90_ms": None, "p99_ms": None,
            "throughput_batch": thr_b, "images_per_s": None, "percent_of_probe": None, "speedup_vs_pytorch": None,
            "bench": {str(b): {k: r.get(k) for k in ("status", "reason", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                                                     "images_per_s", "percent_of_probe", "speedup_vs_pytorch")}
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
                       drop_top1_vs_reference=ev.get("drop_top1_vs_reference"))
        lr, tr = by_batch.get(lat_b), by_batch.get(thr_b)
        if lr and lr.get("status") == "ok":
            row.update(p50_ms=lr.get("p50_ms"), p90_ms=lr.get("p90_ms"), p99_ms=lr.get("p99_ms"),
                       speedup_vs_pytorch=lr.get("speedup_vs_pytorch"))
        if tr and tr.get("status") == "ok":
            row["images_per_s"] = tr.get("images_per_s")
            row["percent_of_probe"] = tr.get("percent_of_probe")  # the machine's yardstick: see its section
        if row["status"] == "ok":
            bad = sorted({r.get("reason") or r.get("status") for r in by_batch.values() if r.get("status") != "ok"})
            for reason in bad:
                row["notes"].append(f"bench: {reason}")
        rows.append(row)
    return rows


def summary_rows(run: RunDir) -> list[dict]:
    """One row per variant/engine (and per skipped build), as in the report."""
    return rows_of(Sources(run))

