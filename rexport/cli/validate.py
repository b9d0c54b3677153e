"""``rexport validate``: each variant against the PyTorch FP32 reference."""
from __future__ import annotations

import json

import click

from rexport.cli.common import Ctx, open_run, log_command, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.core.errors import CheckFailed
from rexport.pipeline.summaries import ExportSummary
from rexport.pipeline.validate import ValidateSettings


@click.command()
@click.option("--variant", "variants", multiple=True, help="Variant(s) to check (default: every one present).")
@click.option("--onnx", "onnx_file", type=str, default=None, help="Check this ONNX file instead of a run variant.")
@settings_options(ValidateSettings)
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def validate(c: Ctx, variants, onnx_file, force, out, **kwargs):
    """Compare variants with the PyTorch FP32 reference (exit 1 when out of tolerance)."""
    from rexport.pipeline.validate import run_validate, validate_onnx_file

    settings = settings_from_kwargs(ValidateSettings, kwargs)
    run = open_run(out)
    if onnx_file:
        res = validate_onnx_file(onnx_file, run, settings)
        _print_validation(c, res["variant"], res)
        c.emit(res)
        if not res["passed"]:
            raise CheckFailed(f"{res['variant']}: out of tolerance: {'; '.join(res['failures'])}")
        return
    with run.locked():
        log_command(run)
        recs = run_validate(run, settings, list(variants) or None, force=force)
    if ExportSummary.of(run).random_weights:
        c.line("note: the model has seeded random weights (no --weights): agreement figures are not a trained model's")
    failed = []
    for rec in recs:
        c.stage(f"validate:{rec['variant']}", rec)
        res = json.loads(run.file(f"validate/{rec['variant']}.json").read_text())
        _print_validation(c, rec["variant"], res)
        if not res["passed"]:
            failed.append(rec["variant"])
    c.emit([json.loads(run.file(f"validate/{r['variant']}.json").read_text()) for r in recs])
    if failed:
        raise CheckFailed(f"out of tolerance: {', '.join(failed)} (see {run.path / 'validate'})")


def _print_validation(c: Ctx, name: str, res: dict) -> None:
    m = res["metrics"]
    c.line(f"  {name}: max abs {m['max_abs']:.3g}, err/max {m['err_over_max']:.3g}, err/range {m['rel_to_range']:.3g}, "
           f"cosine {m['cosine_min']:.6f}, top-1 agree {m['top1_agreement']:.1%} "
           f"[{res['inputs']['kind']}, {res['inputs']['samples']} samples] -> {'PASS' if res['passed'] else 'FAIL'}")
    if res.get("against_source"):
        a = res["against_source"]
        c.line(f"    vs its {a['variant']} ONNX: err/range {a['metrics']['rel_to_range']:.3g}, "
               f"cosine {a['metrics']['cosine_min']:.6f} -> {'PASS' if a['passed'] else 'FAIL'}")
    for f in res["failures"]:
        c.line(f"    {f}")
