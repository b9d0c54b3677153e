"""``rexport bundle``: a folder or archive to copy to a device, or a server's own layout."""
from __future__ import annotations

from pathlib import Path

import click

from rexport.cli.common import Ctx, csv_list, open_run, log_command, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.pipeline.bundle import BundleSettings


@click.command()
@click.option("--variants", callback=csv_list(str), default=None, help="Variants to bundle (default: see README).")
@click.option("--dest", type=str, default=None, help="Bundle folder or .tar.gz path (default RUN/bundle).")
@click.option("--archive", is_flag=True, help="Write a .tar.gz instead of a folder.")
@click.option("--build-on-device", is_flag=True, help="Carry ONNX + calibration caches + a build script, not plans.")
@settings_options(BundleSettings)
@out_option
@click.pass_obj
def bundle(c: Ctx, variants, dest, archive, build_on_device, out, **kwargs):
    """A folder or .tar.gz to copy to a device, or a Triton / DeepStream / OVMS layout (--format)."""
    from rexport.pipeline.bundle import make_bundle

    s = settings_from_kwargs(BundleSettings, kwargs)
    run = open_run(out)
    run.require_export()
    with run.locked():
        log_command(run)
        path = make_bundle(run, variants=variants, dest=Path(dest) if dest else None, archive=archive,
                           build_on_device=build_on_device, format=s.format, queue_delay_us=s.queue_delay_us,
                           check_images=s.check_images)
    c.line(f"wrote {path}")
    c.emit({"bundle": str(path), "format": s.format})
