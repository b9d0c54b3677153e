"""The report stage: report/report.{json,md,html}, built only from manifest.json and the stage
result files (validate/, eval/, bench/, engine sidecars), so every number in it can be traced to a
stage. The pieces live in rexport.pipeline.reporting (rows, tables, plots, Markdown, HTML, sections).

report.json, report.md and report.html are rendered from one dict, and every number passes
through ``fmt`` so the three files (and the summary table of ``rexport run``) agree digit for digit.
"""
from __future__ import annotations

from rexport.core.fsio import atomic_write_json, atomic_write_text
from rexport.pipeline.manifest import RunDir, StageOutcome
from rexport.pipeline.reporting.assembly import SCHEMA_VERSION, SYNTHETIC_CALIBRATION_WARNING, build_report
from rexport.pipeline.reporting.formatting import FORMATS, fmt
from rexport.pipeline.reporting.html import render_html
from rexport.pipeline.reporting.markdown import render_markdown
from rexport.pipeline.reporting.plots import PLOTS
from rexport.pipeline.reporting.rows import summary_rows
from rexport.pipeline.reporting.tables import format_table

__all__ = ["FORMATS", "PLOTS", "REPORT_FILES", "SCHEMA_VERSION", "SYNTHETIC_CALIBRATION_WARNING", "build_report",
           "fmt", "format_table", "run_report_stage", "summary_rows", "write_report"]

REPORT_DIR = "report"
REPORT_FILES = ("report/report.json", "report/report.md", "report/report.html")


def write_report(run: RunDir) -> dict:
    """Write report/report.json, report.md and report.html atomically; return the report dict."""
    report = build_report(run)
    from rexport.pipeline.reporting.sections import section_plots

    funcs = [*PLOTS, *section_plots()]
    drawn = [(f, f(report)) for f in funcs]
    drawn = [(f, pc) for f, pc in drawn if f in PLOTS or pc[1]]  # a section plot with nothing to show is left out
    plots = [pc for _, pc in drawn]
    report["plots"] = [{"name": f.__name__.removeprefix("plot_"), "drawn": png is not None, "caption": cap}
                       for f, (png, cap) in drawn]
    md = render_markdown(report, [cap for _, cap in plots])
    page = render_html(report, plots)
    atomic_write_json(run.file(REPORT_FILES[0]), report)
    atomic_write_text(run.file(REPORT_FILES[1]), md)
    atomic_write_text(run.file(REPORT_FILES[2]), page)
    return report


def run_report_stage(run: RunDir) -> dict:
    """The report stage as the CLI and ``rexport run`` call it: always redone (it is cheap and reads
    everything), recorded in the manifest; returns the stage record."""
    run.require_export()

    def action() -> StageOutcome:
        write_report(run)
        return StageOutcome(outputs=list(REPORT_FILES))

    return run.run_stage("report", inputs={}, settings={}, action=action, force=True)
