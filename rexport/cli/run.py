"""``rexport run``: every stage in order (what ``make engine`` calls)."""
from __future__ import annotations

import shlex
import shutil
import sys

import click

from rexport.core.errors import CheckFailed
from rexport.cli.common import Ctx, csv_list, floats3, open_run, log_command, out_option


@click.command("run")
@click.option("--model", default="resnet18", show_default=True)
@click.option("--weights", type=str, default=None)
@click.option("--num-classes", type=int, default=None)
@click.option("--trust-checkpoint", is_flag=True)
@click.option("--labels", type=str, default=None)
@click.option("--input-size", type=int, default=224, show_default=True)
@click.option("--resize", type=int, default=None, help="Shorter side before the centre crop (default input*256/224).")
@click.option("--mean", callback=floats3, default=None, help="Per-channel mean (default ImageNet).")
@click.option("--std", callback=floats3, default=None, help="Per-channel std (default ImageNet).")
@click.option("--opset", type=int, default=None)
@click.option("--calib-data", default="synthetic", show_default=True)
@click.option("--calib-samples", type=int, default=512, show_default=True)
@click.option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile"]), default="entropy",
              show_default=True)
@click.option("--val-data", default=None, help="Labelled data for the accuracy stage.")
@click.option("--val-samples", type=int, default=None)
@click.option("--precisions", callback=csv_list(str), default="fp32,fp16,int8", show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--bench-min-time", type=float, default=1.0, show_default=True)
@out_option
@click.pass_obj
def run_cmd(c: Ctx, model, weights, num_classes, trust_checkpoint, labels, input_size, resize, mean, std, opset,
            calib_data,
            calib_samples, calib_method, val_data, val_samples, precisions, backend, bench_min_time, out):
    """Every stage: export, validate, fp16, int8, engines, evaluate, bench, report."""
    from rexport.pipeline.export import export_settings_from_options
    from rexport.pipeline.report import format_table, summary_rows
    from rexport.pipeline.run import RunSettings, run_all, run_notes

    export_settings = export_settings_from_options(
        model=model, weights=weights, num_classes=num_classes, trust_checkpoint=trust_checkpoint, seed=0,
        opset=opset, input_size=input_size, resize=resize, mean=mean, std=std, bgr=False, labels=labels,
        batch="dynamic")
    settings = RunSettings(export=export_settings, precisions=precisions, backend=backend, calib_data=calib_data,
                           calib_samples=calib_samples, calib_method=calib_method, val_data=val_data,
                           val_samples=val_samples, bench_min_time=bench_min_time,
                           command="rexport " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                           progress=not (c.quiet or c.json))
    run = open_run(out, model, must_exist=False)
    created = not run.path.exists()
    try:
        with run.locked():
            log_command(run)
            outcome = run_all(run, settings, c.stage)
    except BaseException:
        if created and (run.stage("export") or {}).get("status") != "ok":
            shutil.rmtree(run.path, ignore_errors=True)  # nothing usable was made: leave nothing behind
        raise
    say = (lambda text: None) if c.json else click.echo   # the summary shows even with -q
    say("")
    say(format_table(summary_rows(run)))
    for note in run_notes(run, weights=weights, calib_data=calib_data, precisions=precisions, val_data=val_data):
        say(f"note: {note}")
    say(f"report: {run.file('report/report.html')}  ({outcome['seconds']:.0f} s)")
    c.emit({"failed": outcome["failed"], "report": str(run.file("report/report.json"))})
    if outcome["failed"]:
        raise CheckFailed(f"checks failed: {', '.join(outcome['failed'])} (see the report)")
