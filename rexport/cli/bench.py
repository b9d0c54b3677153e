"""``rexport bench``: latency and throughput."""
from __future__ import annotations

import json

import click

from rexport.cli.common import Ctx, open_run, log_command, out_option
from rexport.cli.options import settings_from_kwargs, settings_options
from rexport.pipeline.bench import BenchSettings


@click.command()
@settings_options(BenchSettings)
@out_option
@click.pass_obj
def bench(c: Ctx, out, **kwargs):
    """Latency (p50/p90/p99, mean, std) and throughput per variant x batch size."""
    from rexport.pipeline.bench import run_bench_stage

    settings = settings_from_kwargs(BenchSettings, kwargs)
    run = open_run(out)
    run.require_export()
    with run.locked():
        log_command(run)
        rec = run_bench_stage(run, settings, progress=not (c.quiet or c.json), force=True)
    c.stage("bench", rec)
    results = json.loads(run.file("bench/results.json").read_text())
    for r in results["rows"]:
        if r.get("status") == "ok":
            gpu = r.get("gpu_compute_ms")    # TensorRT: printed only when CUDA events measured it
            extra = f"  GPU compute p50 {gpu['p50_ms']:.3f} ms" if isinstance(gpu, dict) else ""
            extra += f"  CUDA graphs {r['cuda_graphs']}" if r.get("cuda_graphs") is not None else ""
            c.line(f"  {r['variant']:<16} b{r['batch']:<3} p50 {r['p50_ms']:8.2f} ms  {r['images_per_s']:8.1f} img/s"
                   + extra)
        else:
            c.line(f"  {r['variant']:<16} b{r.get('batch', '-')!s:<3} {r.get('status')}: {r.get('reason')}")
    c.emit(results)
