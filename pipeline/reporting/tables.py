"""The summary table: its columns, its cells, and the plain-text version for the terminal."""
from __future__ import annotations

from rexport.pipeline.reporting.formatting import FORMATS, PREFERRED_LATENCY_BATCH, PREFERRED_THROUGHPUT_BATCH, fmt


def _columns(rows: list[dict], *, full: bool) -> list[tuple[str, str]]:
    lat_b = next((r["latency_batch"] for r in rows if r.get("latency_batch")), PREFERRED_LATENCY_BATCH)
    thr_b = next((r["throughput_batch"] for r in rows if r.get("throughput_batch")), PREFERRED_THROUGHPUT_BATCH)
    cols = [("variant", "variant"), ("backend", "backend"), ("precision", "precision"), ("size_mib", "size MiB"),
            ("max_abs", "max err vs FP32")]
    if full:
        cols += [("rel_to_range", "err / logit range"), ("cosine_min", "cosine min")]
    cols += [("top1_agreement", "top-1 agree"), ("accuracy_top1", "acc top-1")]
    if full:
        cols += [("accuracy_top5", "acc top-5")]
    cols += [("p50_ms", f"p50 ms @b{lat_b}"), ("images_per_s", f"img/s @b{thr_b}"),
             ("percent_of_probe", f"% of probe @b{thr_b}"),
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

