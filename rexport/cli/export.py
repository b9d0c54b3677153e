"""``rexport export``: PyTorch -> ONNX."""
from __future__ import annotations

import click

from rexport.cli.common import Ctx, log_command, new_run_guard, open_run, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.pipeline.export_options import ExportOptions
from rexport.pipeline.summaries import ExportSummary


@click.command()
@settings_options(ExportOptions)
@click.option("--force", is_flag=True, help="Redo even if unchanged.")
@out_option
@click.pass_obj
def export(c: Ctx, force, out, **kwargs):
    """PyTorch -> ONNX (onnx/model.fp32.onnx), with the preprocessing in its metadata."""
    from rexport.pipeline.export import run_export

    options = settings_from_kwargs(ExportOptions, kwargs)
    settings = options.to_settings()
    model, seed = options.model, options.seed
    run = open_run(out, model, must_exist=False)
    with new_run_guard(run), run.locked():
        log_command(run)
        rec = run_export(run, settings, force=force)
    c.stage("export", rec)
    if ExportSummary.from_stage(rec, stage="export").random_weights:
        c.line(f"note: no --weights given: seeded random init (seed {seed}); accuracy figures mean nothing")
    c.line(f"wrote {run.file('onnx/model.fp32.onnx')}")
    c.emit(rec)
