"""Report section: the INT8 budget search (issue 11), each step with its layer, its accuracy on the
selection split and its OpenVINO latency, the final choice proved on the confirmation split, and
an accuracy-vs-latency plot of the steps. Built from the quantize:int8 record in the manifest."""
from __future__ import annotations

from rexport.pipeline.reporting.formatting import fmt
from rexport.pipeline.reporting.sections import Section

ORDER = 40


def budget_summary(src) -> dict | None:
    """The budget search's record in the INT8 quantization summary (None without a budget)."""
    q = src.summary("quantize:int8")
    return q.budget if q else None


def _pts(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def build_section(src, report):
    b = budget_summary(src)
    if not b:
        return None
    target = b["target"]
    goal = " and ".join(t for t in (
        f"top-1 drop <= {target['max_accuracy_drop_pts']} pt" if target["max_accuracy_drop_pts"] is not None else "",
        f"agreement loss <= {target['max_agreement_loss_pct']}%" if target["max_agreement_loss_pct"] is not None
        else "") if t)
    sp = b["splits"]
    chosen, conf = b["chosen"], b["chosen"]["confirmation"]
    ratio = b.get("search_over_calibration")
    text = [
        f"Budget: {goal}, against FP32 on the same images. Searched on the selection split "
        f"({sp['selection']['n']} images), proved on the disjoint confirmation split ({sp['confirmation']['n']} "
        f"images); both drawn from {sp['source']} with seed {sp['seed']}, leaving out "
        f"{sp['left_out_calibration']} calibration images.",
        f"Verdict ({'met' if b['met'] else 'NOT MET'}): {b['message']}.",
        f"Final choice: step {chosen['step']} ({chosen['fix']}; calibration {chosen['calibration_method']}; "
        f"layers in float: {', '.join(chosen['fallback_names']) or 'none'}). Confirmation split: "
        f"top-1 {_pts(conf.get('top1_pct'))}% (FP32 {_pts(conf.get('fp32_top1_pct'))}%), "
        f"agreement loss {_pts(conf['agreement_loss_pct'])}%.",
        f"Search time {b['search_seconds']:.1f} s" + (f", {ratio:.1f}x the calibration time "
                                                        f"({b['calibration_seconds']:.1f} s)." if ratio else "."),
        "Step figures are on the selection split (they chose the result); latency is the p50 at batch 1 of each "
        "step's OpenVINO INT8 engine, measured on this machine during the search.",
    ]
    for v, d in (report.get("evaluation") or {}).items():
        bs = d.get("budget_splits")
        if bs and bs["confirmation"]["n"]:
            c = bs["confirmation"]
            text.append(f"Evaluation of {v}: top-1 {100 * d['top1']:.2f}% on the full set* ({d['n']} images), "
                        f"{100 * c['top1']:.2f}% on the confirmation split ({c['n']} images, drop "
                        f"{100 * c['drop_top1_vs_reference']:.2f} pt vs reference)."
                        + (f" *includes {bs['selection']['n']} selection-split images." if
                           bs["full_set_includes_selection"] else ""))
    rows = []
    for s in b["steps"]:
        fig, lat = s["selection"], s["latency"]
        rows.append([str(s["step"]), s["fix"], s["layer"] or "-", ", ".join(s["fallback_names"]) or "-",
                     _pts(fig.get("top1_pct")), _pts(fig.get("drop_pts")), _pts(fig["agreement_loss_pct"]),
                     fmt("p50_ms", lat.get("p50_ms")) if "p50_ms" in lat else f"skipped: {lat.get('skipped')}",
                     "yes" if fig["meets"] else "no", "chosen" if s["step"] == chosen["step"] else ""])
    return Section(key="int8_budget", title="INT8 accuracy budget: search steps",
                   headers=["step", "fix", "group added", "layers in float", "top-1 % (selection)",
                            "drop pt (selection)", "agreement loss % (selection)", "OpenVINO p50 ms @b1",
                            "meets budget", ""], rows=rows, text=text, data=b)


def plot_budget_steps(report: dict) -> tuple[str | None, str]:
    """Accuracy (or agreement) against OpenVINO latency, one point per search step."""
    sec = next((s for s in report.get("sections") or [] if s["key"] == "int8_budget"), None)
    if sec is None:
        return None, ""
    steps = [s for s in sec["data"]["steps"] if "p50_ms" in s["latency"]]
    if not steps:
        return None, "No budget accuracy/latency plot: no step's OpenVINO latency was measured."
    from rexport.pipeline.reporting.plots import _figure, _png

    labelled = all("top1_pct" in s["selection"] for s in steps)
    key, label = ("top1_pct", "top-1 % (selection split)") if labelled else \
        ("agreement_loss_pct", "agreement loss % (selection split)")
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    xs, ys = [s["latency"]["p50_ms"] for s in steps], [s["selection"][key] for s in steps]
    ax.plot(xs, ys, "-o", color="C0")
    for s, x, y in zip(steps, xs, ys):
        ax.annotate(str(s["step"]), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("OpenVINO INT8 p50 latency at batch 1 (ms)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.set_title("INT8 budget search: accuracy vs latency per step")
    return _png(fig), "(budget) each search step's accuracy on the selection split against its OpenVINO latency."


PLOTS = (plot_budget_steps,)
