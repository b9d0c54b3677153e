"""``rexport quantize``: the FP16 and INT8 ONNX variants."""
from __future__ import annotations


import click

from rexport.cli.common import Ctx, open_run, log_command, out_option


@click.command()
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True)
@click.option("--calib-data", default="synthetic", show_default=True,
              help="Image folder, .npy/.npz of preprocessed arrays, or 'synthetic'.")
@click.option("--calib-samples", type=int, default=512, show_default=True)
@click.option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile"]), default="entropy",
              show_default=True)
@click.option("--calib-batch-size", type=int, default=8, show_default=True)
@click.option("--exclude", multiple=True, help="Node name to leave in float (repeatable).")
@click.option("--skip-first-conv", is_flag=True, help="Leave the stem convolution in float.")
@click.option("--skip-classifier", is_flag=True, help="Leave the final fully connected layer in float.")
@click.option("--residual-qdq", type=click.Choice(["both", "residual"]), default="both", show_default=True,
              help="Q/DQ on both inputs of each residual Add (OpenVINO fuses Conv+Add), or on the residual "
                   "input only (TensorRT's recommended placement).")
@click.option("--quiet", "no_progress", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def quantize(c: Ctx, precision, calib_data, calib_samples, calib_method, calib_batch_size, exclude,
             skip_first_conv, skip_classifier, residual_qdq, no_progress, force, out):
    """FP16 (mixed precision) or INT8 (explicit Q/DQ from our calibration) ONNX variants."""
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    settings = QuantizeSettings(precision=precision, calib_data=calib_data, calib_samples=calib_samples,
                                calib_method=calib_method, calib_batch_size=calib_batch_size, exclude=exclude,
                                skip_first_conv=skip_first_conv, skip_classifier=skip_classifier,
                                residual_add=residual_qdq)
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
    c.line(f"wrote {run.file(f'onnx/model.{precision}.onnx')}")
    c.emit(rec)
