"""``rexport quantize``: the FP16 and INT8 ONNX variants."""
from __future__ import annotations


import click

from rexport.cli.common import Ctx, open_run, log_command, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.pipeline.quantize import QuantizeSettings


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
    cal = rec.get("summary", {}).get("calibration")
    if cal:
        c.line(f"  calibration: {cal['method']} on {cal['description']}"
               f"{' (cache reused)' if cal.get('reused') else ''}")
        if cal.get("synthetic"):
            c.line("  warning: synthetic calibration data: INT8 ranges are not representative of real images")
    summary = rec.get("summary", {})
    for form, info in (summary.get("forms") or {}).items():  # int8: both INT8 forms, one calibration
        floats = f", float parts {summary.get('int8_float')}" if form == "int8" else ""
        c.line(f"wrote {run.file(info['file'])} ({info['target']} form{floats})")
    if summary.get("int8_float_fallback_reason"):
        c.line(f"  note: {summary['int8_float_fallback_reason']}; wrote FP32 float parts")
    if not summary.get("forms"):
        c.line(f"wrote {run.file(f'onnx/model.{precision}.onnx')}")
    if summary.get("budget"):
        from rexport.pipeline.budget import budget_lines

        for text in budget_lines(summary["budget"]):
            c.line(f"  {text}")
    c.emit(rec)
    if rec.get("status") == "failed":  # an INT8 budget not met: the best files are kept, marked in the manifest
        from rexport.core.errors import CheckFailed

        raise CheckFailed(rec.get("reason") or "quantize check failed")
