"""``rexport run``: every stage in order (what ``make engine`` calls). Its options are generated from
the stage settings dataclasses (pipeline.run.run_stages), so they match the stage commands'."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from rexport.cli.common import Ctx, log_command, new_run_guard, open_run, out_option
from rexport.cli.config import sources, to_toml
from rexport.cli.options import run_names, run_options, run_values
from rexport.core.errors import CheckFailed
from rexport.core.settings import setting_specs
from rexport.pipeline.run import run_stages

STAGES = run_stages()


def flat_settings(effective: dict[str, dict]) -> dict[str, object]:
    """{run option name: value} from RunSettings.effective(): what --print-config writes."""
    names = run_names(STAGES)
    out = {}
    for stage, cls, *_ in STAGES:
        for spec in setting_specs(cls):
            name = names.get((stage, spec.field))
            if name is None or spec.field not in effective.get(stage, {}):
                continue
            v = effective[stage][spec.field]
            if isinstance(v, dict):  # --tol a=1 --tol b=2 -> ["a=1", "b=2"]
                v = [f"{k}={x}" for k, x in v.items()]
            out[name] = v
    return out


@click.command("run")
@run_options(STAGES)
@click.option("--print-config", is_flag=True,
              help="Print the effective settings as a TOML file for --config, and stop.")
@out_option
@click.pass_context
def run_cmd(ctx: click.Context, print_config, out, **kwargs):
    """Every stage: export, validate, fp16, int8, engines, evaluate, bench, report."""
    from rexport.pipeline.report import format_table, summary_rows
    from rexport.pipeline.run import RunSettings, run_all, run_notes

    c: Ctx = ctx.obj
    values = run_values(STAGES, kwargs, ctx)
    command = "rexport " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    settings = RunSettings(values=values, command=command, progress=not (c.quiet or c.json))
    effective = settings.effective()  # checks every setting: a bad one is exit 2 before any work
    flat = flat_settings(effective)
    onnx = effective["export"].get("onnx")  # --onnx FILE: the run starts from an imported file
    model = Path(onnx).stem if onnx else effective["export"]["model"]
    if print_config:
        click.echo(to_toml({"out": out, **flat}, header=[f"rexport run --config FILE  (written by: {command})",
                                                         "keys are run's long option names; flags win"]), nl=False)
        return
    record = {"settings": flat, "config": ctx.meta.get("rexport.config"), "sources": sources(ctx)}
    run = open_run(out, model, must_exist=False)
    made = lambda: run.exists() and (run.stage("export") or run.stage("import") or {}).get("status") == "ok"  # noqa: E731
    with new_run_guard(run, made=made), run.locked():  # nothing usable made: leave nothing behind
        log_command(run)
        outcome = run_all(run, settings, c.stage, record=record)
    say = (lambda text: None) if c.json else click.echo   # the summary shows even with -q
    say("")
    say(format_table(summary_rows(run)))
    for note in run_notes(run, weights=effective["export"]["weights"] or onnx,
                          calib_data=effective["quantize"]["calib_data"], precisions=effective["run"]["precisions"],
                          val_data=effective["evaluate"].get("val_data")):
        say(f"note: {note}")
    say(f"report: {run.file('report/report.html')}  ({outcome['seconds']:.0f} s)")
    c.emit({"failed": outcome["failed"], "report": str(run.file("report/report.json"))})
    if outcome["failed"]:
        raise CheckFailed(f"checks failed: {', '.join(outcome['failed'])} (see the report)")
