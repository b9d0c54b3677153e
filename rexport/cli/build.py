"""``rexport build``: engines from the ONNX variants."""
from __future__ import annotations


import click

from rexport.cli.common import Ctx, open_run, log_command, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.pipeline.backends import BuildSettings


@click.command()
@click.option("--backend", default="auto", show_default=True, help="auto, tensorrt or openvino.")
@click.option("--precision", "precisions", multiple=True, help="Engine precision(s); default: all the backend offers.")
@settings_options(BuildSettings)
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def build(c: Ctx, backend, precisions, force, out, **kwargs):
    """Compile the ONNX variants into engines (TensorRT on a GPU, OpenVINO on a CPU)."""
    from rexport.pipeline.build import build_engines

    settings = settings_from_kwargs(BuildSettings, kwargs)
    from rexport.pipeline.backends import get_backend

    run = open_run(out)
    run.require_export()
    chosen = get_backend(backend)
    if chosen.unavailable_reason():  # refuse before touching the run directory
        raise chosen.missing_dependency()
    with run.locked():
        log_command(run)
        recs = build_engines(run, backend=backend, precisions=list(precisions) or None, settings=settings,
                             progress=not (c.quiet or c.json))
    for r in recs:
        c.stage(r.get("name", "build"), r)
    c.emit(recs)
