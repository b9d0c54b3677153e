"""``rexport evaluate``: accuracy on labelled data."""
from __future__ import annotations

import json

import click

from rexport.cli.common import Ctx, open_run, log_command, out_option


@click.command()
@click.option("--val-data", required=True, help="Labelled data: class_name/*.jpg folder or .npz with x and y.")
@click.option("--samples", type=int, default=None, help="Evaluate a seeded random subset of this size.")
@click.option("--variant", "variants", multiple=True, help="Variant(s) to evaluate (default: every one present).")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def evaluate(c: Ctx, val_data, samples, variants, force, out):
    """Top-1/top-5 accuracy of every variant on labelled data, and the drop against FP32."""
    from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate

    run = open_run(out)
    with run.locked():
        log_command(run)
        recs = run_evaluate(run, EvaluateSettings(val_data=val_data, samples=samples), list(variants) or None,
                            force=force)
    for r in recs:
        c.stage(f"evaluate:{r['variant']}", r)
        res = json.loads(run.file(f"eval/{r['variant']}.json").read_text())
        drop = res["drop_top1_vs_fp32"]
        c.line(f"  {r['variant']}: top-1 {res['top1']:.2%}, top-5 {res['top5']:.2%} on {res['n']} images"
               + (f", drop vs FP32 {drop * 100:+.2f} pt" if drop is not None and r['variant'] != 'pytorch' else ""))
    for w in (recs[0].get("warnings") if recs else []) or []:
        c.line(f"warning: {w}")
    c.emit([json.loads(run.file(f"eval/{r['variant']}.json").read_text()) for r in recs])
