"""``rexport infer``: classify images with any artifact."""
from __future__ import annotations


import click

from rexport.cli.common import Ctx


@click.command()
@click.argument("artifact")
@click.argument("images", nargs=-1)
@click.option("--topk", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--model", "model", default=None,
              help="In a bundle folder: the served model to load (default: the first; see its README).")
@click.pass_obj
def infer(c: Ctx, artifact, images, topk, model):
    """Classify image files with an .onnx, a .plan, an OpenVINO .xml, an engine folder, or a bundle
    folder (loaded the way its server would: Triton, DeepStream, OVMS or our runner)."""
    from rexport.pipeline.infer import infer_images

    results = infer_images(artifact, list(images), topk=topk, model=model)
    if results and results[0].get("served"):
        c.line(f"model {results[0]['model']}: {results[0]['served']}")
    if results and results[0]["random_weights"]:
        c.line("note: this model has seeded random weights (exported without --weights): its classes mean nothing")
    for r in results:
        c.line(r["image"])
        for t in r["top"]:
            name = f" {t['label']}" if t["label"] else ""
            c.line(f"  {t['probability']:7.2%}  class {t['class']}{name}")
    c.emit(results)
