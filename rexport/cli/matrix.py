"""``rexport matrix``: models (or config files) x precisions x backends, one run directory per cell
and one combined report. Every ``run`` option is accepted and applied to each cell (the options
are generated from the same settings dataclasses as ``run``'s)."""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from rexport.cli.common import Ctx, csv_list
from rexport.cli.evaluate import ray_option
from rexport.cli.options import run_names, run_options, run_values
from rexport.core.errors import CheckFailed
from rexport.pipeline.run import run_stages


@dataclasses.dataclass(frozen=True)
class _MatrixDecides:
    """Stands in for run's own options (--precisions, --backend): the matrix sets them per cell."""


STAGES = (("run", _MatrixDecides, "run", False), *run_stages()[1:])
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")


def _explicit(ctx: click.Context) -> dict[str, dict]:
    """{stage: {field: value}} of the run options the user set for the matrix (flags or its --config)."""
    names = run_names(STAGES)
    values = run_values(STAGES, dict(ctx.params))
    given = {p for p in ctx.params
             if ctx.get_parameter_source(p) in (ParameterSource.COMMANDLINE, ParameterSource.DEFAULT_MAP)}
    return {s: {f: v for f, v in vals.items() if names[(s, f)].replace("-", "_") in given}
            for s, vals in values.items()}


def _config_row(path: Path, explicit: dict[str, dict]):
    """A row from a run config file (its keys are run's option names), with the matrix's own flags on top."""
    from rexport.cli.config import config_to_default_map, read_config
    from rexport.cli.run import run_cmd
    from rexport.pipeline.matrix import Row

    defaults = config_to_default_map(run_cmd, read_config(path), path)
    with run_cmd.make_context("run", [], default_map=defaults) as sub:
        values = run_values(run_stages(), dict(sub.params))
    values.pop("run", None)
    for stage, vals in explicit.items():
        values.setdefault(stage, {}).update(vals)
    return Row(path.stem, values)


@click.command("matrix")
@run_options(STAGES)
@click.option("--models", required=True, callback=csv_list(str),
              help="Comma list of models (resnet18,resnet50,timm:...) or of run config files (.toml/.yaml), "
                   "one matrix row each; --models wins over --model.")
@click.option("--precisions", "cell_precisions", callback=csv_list(str), default="fp32,int8", show_default=True,
              help="One cell per precision: fp32, fp16, int8.")
@click.option("--backends", "cell_backends", callback=csv_list(str), default="openvino", show_default=True,
              help="One cell per engine backend: openvino, tensorrt.")
@ray_option
@click.option("--tensorrt-version", default=None,
              help="On Ray, the TensorRT version a TensorRT cell asks for (custom resource tensorrt:<version>; "
                   "default: the one installed here).")
@click.option("--cpus-per-cell", type=int, default=None,
              help="On Ray, CPUs a CPU cell asks for (default: the largest node's, so cells never share cores).")
@click.option("--out", required=True, help="Folder of the matrix: OUT/<model>/<backend>-<precision>/ and OUT/matrix.*")
@click.pass_context
def matrix(ctx: click.Context, models, cell_precisions, cell_backends, ray, tensorrt_version, cpus_per_cell, out,
           **kwargs):
    """Models x precisions x backends: a run directory per cell, one report matrix.{json,md,html}."""
    from rexport.pipeline.matrix import MatrixSettings, Row, label_of, run_matrix

    c: Ctx = ctx.obj
    explicit = _explicit(ctx)
    values = run_values(STAGES, kwargs)
    values.pop("run", None)
    rows = []
    for m in models:
        if Path(m).suffix.lower() in CONFIG_SUFFIXES:
            rows.append(_config_row(Path(m), explicit))
        else:
            rows.append(Row(label_of(m), {**values, "export": {**values.get("export", {}), "model": m}}))
    settings = MatrixSettings(precisions=cell_precisions, backends=cell_backends, ray=ray,
                              tensorrt_version=tensorrt_version, cpus_per_cell=cpus_per_cell)
    if ray is not None:
        from rexport.pipeline.distributed import import_ray

        import_ray()  # no Ray: exit 2 with the pip command, before anything runs
    command = "rexport " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def echo(r: dict) -> None:
        how = "reused" if r.get("reused") else r.get("status", "-")
        if r.get("status") == "ok" and not r.get("reused"):
            how = "made"
        c.line(f"{r['cell']:<32} {how:<8} {r.get('seconds', 0.0):7.1f} s" + (f"  ({r['note']})" if r.get("note") else ""))

    report = run_matrix(out, rows, settings, command=command, echo=echo)
    c.line(f"matrix: {Path(out) / 'matrix.html'}  (Pareto front: {', '.join(report['pareto']) or 'none'})")
    c.emit(report)
    bad = [r["cell"] for r in report["cells"] if r.get("failed") or r.get("status") == "error"]
    if bad:
        raise CheckFailed(f"cells with failed checks or errors: {', '.join(bad)} (see matrix.html)")
