"""Evaluation decodes once: total evaluate time with every variant against the sum of the variants'
pure inference time, on the same images, in the same run, with the same thread settings.

Generates N JPEGs of ImageNet-like sizes (sides 300-500 px, quality 90) in 10 class folders, makes a
ResNet-18 run at 224 with every variant this machine builds (7 without BF16 hardware, 8 with), then:
  - pure: each variant over the images preloaded as arrays (decoded beforehand, not timed), before
    and after the evaluate passes, averaged;
  - evaluate: ``run_evaluate(force=True)`` with 0, 1, 2... decode worker processes (0: in process);
    ratio = evaluate wall time / sum of pure times; the winning worker count is reported;
  - memory: peak RSS of an evaluate process (and of its decode workers) at two set sizes, to show it
    is flat in the number of images; and the decode count per image (the decoder's hook).
The machine's load average is recorded before and after; figures go to benchmarks/results/evaluate.json.

    .venv/bin/python benchmarks/bench_evaluate.py [--images 5000] [--memory-sizes 1000,5000] [--workers 0,1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "evaluate.json"
TARGET_RATIO = 1.15  # issue 13: total <= 1.15 x the sum of pure inference times


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs, sides 300-500 px, quality 90, smooth content plus noise (ImageNet-like file sizes)."""
    from PIL import Image

    marker = root / f".made-{n}-{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(300, 501, 2))
        base = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        px = np.clip(np.asarray(base, np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        d = root / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(px).save(d / f"{i:05d}.jpg", quality=90)
    marker.touch()
    return root


def make_run(root: Path):
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.export import ExportSettings, run_export
    from rexport.pipeline.manifest import RunDir
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    run = RunDir(root / "resnet18")
    with run.locked():
        run_export(run, ExportSettings(model="resnet18"))
        run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
        run_quantize(run, QuantizeSettings(precision="int8", calib_samples=32, calib_method="minmax"), progress=False)
        build_engines(run, backend="openvino", precisions=["fp32", "bf16", "int8"], progress=False,
                      skip_unavailable=True)
    return run


def pure_inference(run, data, variants: list[str], batch: int) -> dict[str, float]:
    """Seconds per variant over the preloaded images (same batches as evaluate, same default threads)."""
    from rexport.pipeline.decode import BatchDecoder
    from rexport.pipeline.variants import open_variant

    groups = data.groups(batch)
    with BatchDecoder(data.spec, 0) as dec:
        xs = [x for _, x in data.batches(groups, dec)]
    out = {}
    for v in variants:
        with open_variant(run, v) as r:
            r.infer(xs[0])  # warm-up, as the evaluate pass's first batch also pays it
            t0 = time.perf_counter()
            for x in xs:
                r.infer(x)
            out[v] = time.perf_counter() - t0
    return out


def timed_evaluate(run, val: Path, workers: int, batch: int) -> tuple[float, dict]:
    from rexport.pipeline import decode
    from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate

    counts: dict[str, int] = {}
    hook = lambda p: counts.__setitem__(str(p), counts.get(str(p), 0) + 1)  # noqa: E731
    decode.DECODE_HOOKS.append(hook)
    t0 = time.perf_counter()
    try:
        run_evaluate(run, EvaluateSettings(val_data=str(val), batch_size=batch, decode_workers=workers), force=True)
    finally:
        decode.DECODE_HOOKS.remove(hook)
    return time.perf_counter() - t0, {"decodes": sum(counts.values()), "images": len(counts)}


_MEMORY_CHILD = """
import json, resource, sys
from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate
from rexport.pipeline.manifest import RunDir
run_evaluate(RunDir(sys.argv[1]), EvaluateSettings(val_data=sys.argv[2], samples=int(sys.argv[3]),
             decode_workers=int(sys.argv[4])), ["fp32"], force=True)
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_bytes": hwm,
                  "workers_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def peak_memory(run, val: Path, n: int, workers: int) -> dict:
    """Peak RSS of a fresh evaluate process over n images (pytorch + fp32), and of its decode workers."""
    r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(run.path), str(val), str(n), str(workers)],
                       capture_output=True, text=True, check=True)
    return {"images": n, **json.loads(r.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--memory-sizes", default="1000,5000")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work-dir", default=None, help="Keep generated images and the run here (default: a temp dir).")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    from rexport.core.env import environment
    from rexport.core.machine import machine_fingerprint
    from rexport.pipeline.evaluate import EvaluateSettings, open_labelled_set
    from rexport.pipeline.variants import list_variants

    sizes = [int(s) for s in a.memory_sizes.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work_dir or tmp)
        val = make_jpegs(work / "val", max([a.images, *sizes]))
        run = make_run(work)
        variants = list_variants(run)
        sub = work / f"val{a.images}"
        if not sub.exists():  # the first --images files, as their own folder (evaluate reads a folder)
            for i in range(a.images):
                p = val / f"c{i % 10}" / f"{i:05d}.jpg"
                (sub / p.parent.name).mkdir(parents=True, exist_ok=True)
                os.link(p, sub / p.parent.name / p.name)
        data = open_labelled_set(run, EvaluateSettings(val_data=str(sub)))
        # pure inference before and after the evaluate passes, averaged: a load that changes during the
        # run (a shared machine) then weighs on both sides of the ratio alike
        before = pure_inference(run, data, variants, a.batch)
        timed = {}
        for w in (int(x) for x in a.workers.split(",")):
            timed[w] = (*timed_evaluate(run, sub, w, a.batch), os.getloadavg()[0])
        after = pure_inference(run, data, variants, a.batch)
        pure = {v: (before[v] + after[v]) / 2 for v in variants}
        pure_sum = sum(pure.values())
        by_workers = {str(w): {"seconds": round(sec, 3), "ratio_to_pure": round(sec / pure_sum, 4),
                               "decodes_per_image": counts["decodes"] / max(1, counts["images"]), "load_after": load}
                      for w, (sec, counts, load) in timed.items()}
        best = min(by_workers, key=lambda k: by_workers[k]["seconds"])
        memory = [peak_memory(run, val, n, int(best)) for n in sizes]
    result = {
        "benchmark": "evaluate decodes once (issue 13 item 2)",
        "leading_ratio": {"best_workers": int(best), "total_over_pure_inference": by_workers[best]["ratio_to_pure"],
                          "target": TARGET_RATIO, "met": by_workers[best]["ratio_to_pure"] <= TARGET_RATIO},
        "images": a.images, "image_sides_px": [300, 500], "jpeg_quality": 90, "batch": a.batch,
        "model": "resnet18 at 224 (random weights)", "variants": variants,
        "pure_inference_s": {k: round(v, 3) for k, v in pure.items()}, "pure_inference_sum_s": round(pure_sum, 3),
        "pure_inference_sum_before_after_s": [round(sum(before.values()), 3), round(sum(after.values()), 3)],
        "evaluate_by_decode_workers": by_workers,
        "memory": memory,
        "memory_growth_ratio": round(memory[-1]["peak_rss_bytes"] / memory[0]["peak_rss_bytes"], 3),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "machine": machine_fingerprint(), "environment": environment(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "peak_rss_this_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    lr = result["leading_ratio"]
    print(f"evaluate / pure inference: {lr['total_over_pure_inference']:.3f}x with {best} decode workers "
          f"(target <= {TARGET_RATIO}x: {'met' if lr['met'] else 'NOT met'}); {len(variants)} variants, {a.images} images")
    for w, r in by_workers.items():
        print(f"  workers {w}: {r['seconds']:.1f} s, {r['ratio_to_pure']:.3f}x, {r['decodes_per_image']:.2f} decodes/image")
    for m in memory:
        print(f"  peak RSS at {m['images']} images: {m['peak_rss_bytes'] / 2**20:.0f} MiB "
              f"(decode workers {m['workers_peak_rss_bytes'] / 2**20:.0f} MiB)")
    print(f"  load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; wrote {a.out}")


if __name__ == "__main__":
    main()
