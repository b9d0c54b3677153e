"""report.md."""
from __future__ import annotations

from rexport.pipeline.reporting.details import _details, _facts


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
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
    md += ["## Summary", ""] + md_table(report["table"]["columns"], report["table"]["rows"]) + [""]
    md += ["## Plots", "", "The plots are in report.html; their data are the tables here.", ""]
    md += [f"- {c}" for c in captions] + [""]
    for title, headers, rows, text in _details(report):
        md += [f"## {title}", ""] + [line for p in text for line in (_md_cell(p), "")]
        md += (md_table(headers, rows) + [""]) if headers else []
    md += [f"Built from: {', '.join(report['sources'])}.", ""]
    return "\n".join(md)

