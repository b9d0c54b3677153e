"""The matrix's combined report, ``matrix.{json,md,html}``: accuracy, size, latency and throughput
per cell, the Pareto front of accuracy against throughput, and a plot of it. Built only from the
cells' run directories (their report rows), with the run report's renderers and number formats."""
from __future__ import annotations

from html import escape
from pathlib import Path

from rexport.core.fsio import atomic_write_json, atomic_write_text
from rexport.pipeline.reporting.formatting import fmt

#: '% of probe': throughput against the probe of the machine that measured it, comparable across machines
HEADERS = ["cell", "variant", "status", "acc top-1", "acc top-5", "size MiB", "p50 ms", "img/s", "% of probe",
           "numerics", "note"]
NUMERIC = {3, 4, 5, 6, 7, 8}


def quality_key(cells: list[dict]) -> tuple[str, str]:
    """Accuracy where every measured cell has it; else top-1 agreement with PyTorch (said so)."""
    ok = [c for c in cells if c.get("status") == "ok"]
    if ok and all(c.get("accuracy_top1") is not None for c in ok):
        return "accuracy_top1", "top-1 accuracy"
    return "top1_agreement", "top-1 agreement with PyTorch FP32 (no labelled data: not accuracy)"


def pareto_front(cells: list[dict], key: str) -> list[str]:
    """Cells no other cell beats on both quality and throughput (higher is better on each)."""
    pts = [(c["cell"], c.get(key), c.get("images_per_s")) for c in cells if c.get("status") == "ok"]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    front = []
    for name, q, t in pts:
        if not any((q2 >= q and t2 >= t) and (q2 > q or t2 > t) for _, q2, t2 in pts):
            front.append(name)
    return sorted(front, key=lambda n: next(t for m, _, t in pts if m == n))


def _plot(cells: list[dict], key: str, label: str, front: list[str]) -> tuple[str | None, str]:
    from rexport.pipeline.reporting.plots import _figure, _png

    pts = [(c["images_per_s"], c[key], c["cell"]) for c in cells
           if c.get("status") == "ok" and c.get(key) is not None and c.get("images_per_s") is not None]
    if not pts:
        return None, "No Pareto plot: no cell has both a throughput and a quality figure."
    fig = _figure(6.8, 4.4)
    ax = fig.add_subplot()
    for x, y, name in pts:
        on = name in front
        ax.scatter([x], [y], s=50 if on else 30, color="C3" if on else "C0", zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    fp = sorted((x, y) for x, y, n in pts if n in front)
    if len(fp) > 1:
        ax.plot([p[0] for p in fp], [p[1] for p in fp], color="C3", alpha=0.6, zorder=2)
    batch = next((c.get("throughput_batch") for c in cells if c.get("throughput_batch")), None)
    ax.set_xlabel(f"throughput at batch {batch} (images/s)")
    ax.set_ylabel(label.split(" (")[0])
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{label.split(' (')[0]} vs throughput")
    return _png(fig), (f"{label} against throughput at batch {batch}, one point per cell; the Pareto front "
                       f"(no cell better on both) in red: {', '.join(front) or 'none'}.")


def _table_rows(cells: list[dict]) -> list[list[str]]:
    return [[c["cell"], c.get("variant") or "-", c.get("status", "-"), fmt("accuracy_top1", c.get("accuracy_top1")),
             fmt("accuracy_top5", c.get("accuracy_top5")), fmt("size_mib", c.get("size_mib")),
             fmt("p50_ms", c.get("p50_ms")), fmt("images_per_s", c.get("images_per_s")),
             fmt("percent_of_probe", c.get("percent_of_probe")), c.get("validation") or "-", c.get("note") or ""] for c in cells]


def write_matrix_report(out: Path, cells: list[dict], meta: dict) -> dict:
    from rexport.pipeline.reporting.html import html_page, html_table
    from rexport.pipeline.reporting.markdown import md_table

    key, label = quality_key(cells)
    front = pareto_front(cells, key)
    png, caption = _plot(cells, key, label, front)
    report = {"schema_version": 1, "cells": cells, "quality": {"key": key, "label": label}, "pareto": front,
              "plot_caption": caption, **meta}
    atomic_write_json(out / "matrix.json", report)
    rows = _table_rows(cells)
    title = f"rexport matrix: {len(cells)} cells"
    lat = next((c.get("latency_batch") for c in cells if c.get("latency_batch")), None)
    facts = [f"Quality: {label}. p50 latency at batch {lat}; throughput as in the plot.",
             f"Pareto front (accuracy vs throughput): {', '.join(front) or 'none'}.",
             "Each cell is a run directory made by 'rexport run'; its own report has every variant."]
    md = [f"# {title}", "", *(f"- {f}" for f in facts), "", *md_table(HEADERS, rows), "", caption, ""]
    atomic_write_text(out / "matrix.md", "\n".join(md))
    body = [f"<h1>{escape(title)}</h1>", "<ul>" + "".join(f"<li>{escape(f)}</li>" for f in facts) + "</ul>",
            html_table(HEADERS, rows, numeric=NUMERIC)]
    if png:
        body.append(f'<figure><img alt="Pareto plot" src="data:image/png;base64,{png}"><figcaption>{escape(caption)}'
                    "</figcaption></figure>")
    else:
        body.append(f"<p>{escape(caption)}</p>")
    atomic_write_text(out / "matrix.html", html_page(title, body))
    return report
