"""``rexport report``: the run's report files."""
from __future__ import annotations

import json

import click

from rexport.cli.common import Ctx, open_run, log_command, out_option


@click.command()
@out_option
@click.pass_obj
def report(c: Ctx, out):
    """Write report/report.{json,md,html} from the manifest and the stage results."""
    from rexport.pipeline.report import run_report_stage

    run = open_run(out)
    run.require_export()
    with run.locked():
        log_command(run)
        rec = run_report_stage(run)
    c.stage("report", rec)
    c.line(f"report: {run.file('report/report.html')}")
    c.emit(json.loads(run.file("report/report.json").read_text()))
