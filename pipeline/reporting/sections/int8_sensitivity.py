"""Report section: the per-layer INT8 sensitivity ranking of the budget search (issue 11), a table and
a bar plot: what quantizing each quantizer group alone costs (or leaving it in float regains)."""
from __future__ import annotations

from rexport.pipeline.reporting.sections import Section
from rexport.pipeline.reporting.sections.int8_budget import budget_summary

ORDER = 41
_MODES = {"alone": "quantized alone (everything else in float)",
          "leave-out": "left in float (everything else in INT8): the divergence it removes"}


def build_section(src, report):
    b = budget_summary(src)
    sens = (b or {}).get("sensitivity")
    if not sens:
        return None
    rows = [[str(i + 1), r["name"], ", ".join(r.get("layer_names") or r["consumers"]), f"{r['score']:.4g}",
             f"{100 * r['agreement_top1']:.2f}",
             "-" if r.get("accuracy_top1") is None else f"{100 * r['accuracy_top1']:.2f}"]
            for i, r in enumerate(sens["ranked"])]
    metric = "logit KL divergence (nats)" if sens["metric"] == "kl" else "logit mean squared error"
    text = [f"Each quantizer group (a tensor's Q/DQ pair and the weights of the layers it feeds), "
            f"{_MODES[sens['mode']]}; {metric} to FP32 on {sens['samples']} images of the selection split, "
            f"top-1 beside it. Measured in {sens['seconds']:.1f} s{' (cached result)' if sens['reused'] else ''}."]
    return Section(key="int8_sensitivity", title="INT8 sensitivity per quantizer group (ranked)",
                   headers=["rank", "group (tensor)", "layers", sens["metric"], "top-1 agree %", "top-1 %"],
                   rows=rows, text=text, data=sens)


def plot_sensitivity(report: dict) -> tuple[str | None, str]:
    sec = next((s for s in report.get("sections") or [] if s["key"] == "int8_sensitivity"), None)
    if sec is None:
        return None, ""
    from rexport.pipeline.reporting.plots import _figure, _png

    ranked = sec["data"]["ranked"][:20]
    fig = _figure(6.4, max(2.5, 0.25 * len(ranked) + 1))
    ax = fig.add_subplot()
    names = [", ".join(r.get("layer_names") or [r["name"]])[:40] for r in ranked][::-1]
    ax.barh(names, [max(r["score"], 1e-12) for r in ranked][::-1], color="C3")
    ax.set_xscale("log")
    ax.set_xlabel(sec["data"]["metric"] + " to FP32 (log scale)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("INT8 sensitivity per quantizer group")
    return _png(fig), f"(sensitivity) the {len(ranked)} most sensitive quantizer groups, selection split."


PLOTS = (plot_sensitivity,)
