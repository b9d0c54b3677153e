"""``rexport import``: an ONNX image classifier becomes the run's FP32 model (in place of export)."""
from __future__ import annotations

import shutil
from pathlib import Path

import click

from rexport.cli.common import Ctx, log_command, open_run, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.core.errors import InputError
from rexport.pipeline.export_options import ExportOptions
from rexport.pipeline.summaries import ImportSummary

#: the PyTorch model's options, which an imported ONNX file has no use for
PYTORCH_ONLY = ("model", "weights", "num_classes", "trust_checkpoint", "seed")


def run_dir_name(onnx: str) -> str:
    """The default run directory's name for an imported file: artifacts/<file stem>."""
    return Path(onnx).stem


@click.command("import")
@settings_options(ExportOptions, exclude=PYTORCH_ONLY)
@click.option("--force", is_flag=True, help="Redo even if unchanged.")
@out_option
@click.pass_obj
def import_cmd(c: Ctx, force, out, **kwargs):
    """ONNX classifier -> onnx/model.fp32.onnx (the run's reference in ONNX Runtime); every later
    stage then works as after export."""
    from rexport.pipeline.import_onnx import run_import

    options = settings_from_kwargs(ExportOptions, kwargs)
    if not options.onnx:
        raise InputError("rexport import needs the model file", "pass --onnx FILE")
    settings = options.to_settings()
    run = open_run(out, run_dir_name(options.onnx), must_exist=False)
    created = not run.path.exists()
    try:
        with run.locked():
            log_command(run)
            rec = run_import(run, settings, force=force)
    except BaseException:
        if created:  # leave nothing behind for a run that never produced a model
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    c.stage("import", rec)
    s = ImportSummary.from_stage(rec, stage="import")
    change = "-" if s.smoke_max_abs_error is None else f"{s.smoke_max_abs_error:.3g}"
    c.line(f"imported {s.source} (opset {s.source_opset} -> {s.opset}, {s.batch_note}, "
           f"{s.num_classes} classes, max abs change {change})")
    for note in s.notes:
        c.line(f"note: {note}")
    c.line(f"wrote {run.file('onnx/model.fp32.onnx')}")
    c.emit(rec)
