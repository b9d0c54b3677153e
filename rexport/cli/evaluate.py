"""``rexport evaluate``: accuracy on labelled data, here or sharded over a Ray cluster."""
from __future__ import annotations

import json

import click

from rexport.cli.common import Ctx, open_run, log_command, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.pipeline.evaluate import EvaluateSettings
from rexport.pipeline.summaries import EvaluateSummary

#: ``--ray`` alone: ray.init()'s own choice (a cluster started on this machine, else a local one)
RAY_DEFAULT = "default"


def ray_option(f):
    """``--ray [ADDRESS]``: an optional value, which the generated options cannot declare."""
    return click.option("--ray", "ray", is_flag=False, flag_value=RAY_DEFAULT, default=None, metavar="[ADDRESS]",
                        help="Spread the work over Ray: alone, the cluster on this machine (or a local one); "
                             "or a cluster address (host:6379). Needs pip install 'rexport[ray]'.")(f)


@click.command()
@settings_options(EvaluateSettings)
@ray_option
@click.option("--variant", "variants", multiple=True, help="Variant(s) to evaluate (default: every one present).")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def evaluate(c: Ctx, variants, force, out, ray, **kwargs):
    """Top-1/top-5 accuracy of every variant on labelled data, and the drop against FP32."""
    from rexport.pipeline.evaluate import run_evaluate

    settings = settings_from_kwargs(EvaluateSettings, kwargs, ray=ray)
    if ray is not None:
        from rexport.pipeline.distributed import import_ray

        import_ray()  # no Ray: exit 2 with the pip command, before anything runs
    run = open_run(out)
    with run.locked():
        log_command(run)
        recs = run_evaluate(run, settings, list(variants) or None, force=force)
    said_ray = False
    for r in recs:
        c.stage(f"evaluate:{r['variant']}", r)
        res = json.loads(run.file(f"eval/{r['variant']}.json").read_text())
        drop = res["drop_top1_vs_reference"]
        c.line(f"  {r['variant']}: top-1 {res['top1']:.2%}, top-5 {res['top5']:.2%} on {res['n']} images"
               + (f", drop vs {res.get('reference') or 'reference'} {drop * 100:+.2f} pt" if drop is not None and r['variant'] != 'pytorch' else ""))
        s = EvaluateSummary.from_stage(r, stage=f"evaluate:{r['variant']}")
        info = s.ray if s else None
        if info and not r.get("reused") and not said_ray:  # one pass for every variant: say it once
            said_ray = True
            c.line(f"  ray: {info['shards']} shards on {len(info['hosts'])} host(s), {info['retries']} retried")
    for w in (recs[0].get("warnings") if recs else []) or []:
        c.line(f"warning: {w}")
    c.emit([json.loads(run.file(f"eval/{r['variant']}.json").read_text()) for r in recs])
