"""``rexport quantize``: the FP16 and INT8 ONNX variants."""
from __future__ import annotations


import click

from rexport.cli.common import Ctx, open_run, log_command, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.pipeline.quantize import QuantizeSettings
from rexport.pipeline.summaries import QuantizeSummary


@click.command()
@settings_options(QuantizeSettings)
@click.option("--quiet", "no_progress", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def quantize(c: Ctx, no_progress, force, out, **kwargs):
    """FP16 (mixed precision) or INT8 (explicit Q/DQ from our calibration) ONNX variants."""
    from rexport.pipeline.quantize import run_quantize

    settings = settings_from_kwargs(QuantizeSettings, kwargs)
    precision = settings.precision
    run = open_run(out)
    with run.locked():
        log_command(run)
        rec = run_quantize(run, settings, progress=not (c.quiet or c.json or no_progress), force=force)
    c.stage(f"quantize:{precision}", rec)
    q = QuantizeSummary.from_stage(rec) if precision == "int8" else None
    if q is not None:
        cal = q.calibration
        c.line(f"  calibration: {cal.method} on {cal.description}{' (cache reused)' if cal.reused else ''}")
        if cal.synthetic:
            c.line("  warning: synthetic calibration data: INT8 ranges are not representative of real images")
        for form, info in q.forms.items():  # int8: both INT8 forms, one calibration
            floats = f", float parts {q.int8_float}" if form == "int8" else ""
            c.line(f"wrote {run.file(info.file)} ({info.target} form{floats})")
        if q.int8_float_fallback_reason:
            c.line(f"  note: {q.int8_float_fallback_reason}; wrote FP32 float parts")
    if q is None or not q.forms:
        c.line(f"wrote {run.file(f'onnx/model.{precision}.onnx')}")
    if q is not None and q.budget:
        from rexport.pipeline.budget import budget_lines

        for text in budget_lines(q.budget):
            c.line(f"  {text}")
    c.emit(rec)
    if rec.get("status") == "failed":  # an INT8 budget not met: the best files are kept, marked in the manifest
        from rexport.core.errors import CheckFailed

        raise CheckFailed(rec.get("reason") or "quantize check failed")
