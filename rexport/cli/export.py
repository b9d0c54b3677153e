"""``rexport export``: PyTorch -> ONNX."""
from __future__ import annotations

import shutil

import click

from rexport.cli.common import Ctx, MODEL_NAMES, floats3, open_run, log_command, out_option


@click.command()
@click.option("--model", default="resnet18", show_default=True, help=f"One of: {', '.join(MODEL_NAMES)}.")
@click.option("--weights", type=str, default=None, help="Checkpoint (.pth/.pt/.safetensors); none = seeded random init.")
@click.option("--num-classes", type=int, default=None, help="Head size (default: from the checkpoint, else 1000).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickles that run code. Only for files you trust.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random init.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 17: TensorRT 8.5 and later).")
@click.option("--input-size", type=int, default=224, show_default=True)
@click.option("--resize", type=int, default=None, help="Shorter side before the centre crop (default input*256/224).")
@click.option("--mean", callback=floats3, default=None, help="Per-channel mean (default ImageNet).")
@click.option("--std", callback=floats3, default=None, help="Per-channel std (default ImageNet).")
@click.option("--bgr", is_flag=True, help="The model expects BGR channel order.")
@click.option("--labels", type=str, default=None, help="Text file with one class name per line.")
@click.option("--batch", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--force", is_flag=True, help="Redo even if unchanged.")
@out_option
@click.pass_obj
def export(c: Ctx, model, weights, num_classes, trust_checkpoint, seed, opset, input_size, resize, mean, std,
           bgr, labels, batch, force, out):
    """PyTorch -> ONNX (onnx/model.fp32.onnx), with the preprocessing in its metadata."""
    from rexport.pipeline.export import export_settings_from_options, run_export

    settings = export_settings_from_options(model=model, weights=weights, num_classes=num_classes,
                                            trust_checkpoint=trust_checkpoint, seed=seed, opset=opset,
                                            input_size=input_size, resize=resize, mean=mean, std=std, bgr=bgr,
                                            labels=labels, batch=batch)
    run = open_run(out, model, must_exist=False)
    created = not run.path.exists()
    try:
        with run.locked():
            log_command(run)
            rec = run_export(run, settings, force=force)
    except BaseException:
        if created:  # leave nothing behind for a run that never produced a model
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    c.stage("export", rec)
    if rec["summary"].get("random_weights"):
        c.line(f"note: no --weights given: seeded random init (seed {seed}); accuracy figures mean nothing")
    c.line(f"wrote {run.file('onnx/model.fp32.onnx')}")
    c.emit(rec)
