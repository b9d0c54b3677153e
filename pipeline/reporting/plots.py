"""The report's plots, as base64 PNGs drawn with matplotlib's Agg canvas (no pyplot state)."""
from __future__ import annotations

import base64
import io

from rexport.pipeline.variants import REFERENCE


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
        if report["weights"]["random_weights"]:
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
