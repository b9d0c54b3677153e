"""``rexport bench``: latency and throughput."""
from __future__ import annotations

import json

import click

from rexport.cli.common import Ctx, csv_list, open_run, log_command, out_option


@click.command()
@click.option("--backends", callback=csv_list(str), default=None, help="Filter: pytorch,onnxruntime,openvino,tensorrt.")
@click.option("--precisions", callback=csv_list(str), default=None, help="Filter: fp32,fp16,bf16,int8.")
@click.option("--batch-sizes", callback=csv_list(int), default="1,8", show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--min-time", type=float, default=1.0, show_default=True, help="Seconds of timed runs per row, at least.")
@click.option("--threads", type=int, default=None)
@out_option
@click.pass_obj
def bench(c: Ctx, backends, precisions, batch_sizes, warmup, min_time, threads, out):
    """Latency (p50/p90/p99, mean, std) and throughput per variant x batch size."""
    from rexport.pipeline.bench import BenchSettings
    from rexport.pipeline.run import _artifact_inputs, _bench_action, _bench_record

    settings = BenchSettings(backends=backends, precisions=precisions, batch_sizes=batch_sizes, warmup=warmup,
                             min_time=min_time, threads=threads)
    run = open_run(out)
    run.require_export()
    with run.locked():
        log_command(run)
        rec = run.run_stage("bench", inputs=_artifact_inputs(run), settings=_bench_record(settings),
                            action=lambda: _bench_action(run, settings, not (c.quiet or c.json)), force=True)
    c.stage("bench", rec)
    results = json.loads(run.file("bench/results.json").read_text())
    for r in results["rows"]:
        if r.get("status") == "ok":
            c.line(f"  {r['variant']:<16} b{r['batch']:<3} p50 {r['p50_ms']:8.2f} ms  {r['images_per_s']:8.1f} img/s")
        else:
            c.line(f"  {r['variant']:<16} b{r.get('batch', '-')!s:<3} {r.get('status')}: {r.get('reason')}")
    c.emit(results)
