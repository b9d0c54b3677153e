"""``rexport build``: engines from the ONNX variants."""
from __future__ import annotations


import click

from rexport.cli.common import Ctx, open_run, log_command, out_option


@click.command()
@click.option("--backend", default="auto", show_default=True, help="auto, tensorrt or openvino.")
@click.option("--precision", "precisions", multiple=True, help="Engine precision(s); default: all the backend offers.")
@click.option("--min-batch", type=int, default=1, show_default=True)
@click.option("--opt-batch", type=int, default=8, show_default=True)
@click.option("--max-batch", type=int, default=32, show_default=True)
@click.option("--workspace", type=int, default=None, help="TensorRT workspace limit in MiB.")
@click.option("--timing-cache", type=str, default=None, help="TensorRT timing cache file, reused across builds.")
@click.option("--builder-opt-level", type=int, default=None, help="TensorRT builder optimization level (0-5).")
@click.option("--legacy", is_flag=True, help="TensorRT: weak-typed network with precision flags (automatic on 8.x).")
@click.option("--dla-core", type=int, default=None, help="TensorRT legacy path: build for this DLA core.")
@click.option("--version-compatible", is_flag=True, help="TensorRT >= 8.6: a plan for later TensorRT versions.")
@click.option("--hardware-compatible", is_flag=True, help="TensorRT >= 8.6: a plan for all Ampere+ GPUs.")
@click.option("--threads", type=int, default=None, help="OpenVINO inference threads (default: all cores).")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def build(c: Ctx, backend, precisions, min_batch, opt_batch, max_batch, workspace, timing_cache, builder_opt_level,
          legacy, dla_core, version_compatible, hardware_compatible, threads, force, out):
    """Compile the ONNX variants into engines (TensorRT on a GPU, OpenVINO on a CPU)."""
    from rexport.pipeline.backends import BuildSettings
    from rexport.pipeline.build import build_engines

    settings = BuildSettings(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_mib=workspace,
                             timing_cache=timing_cache, builder_opt_level=builder_opt_level, legacy=legacy,
                             dla_core=dla_core, version_compatible=version_compatible,
                             hardware_compatible=hardware_compatible, threads=threads)
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
