"""The facts list and detail tables shared by report.md and report.html."""
from __future__ import annotations

import json

from rexport.pipeline.reporting.formatting import fmt


def _details(report: dict) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """The detail tables (title, headers, cells, paragraphs) shared by report.md and report.html:
    the built-in ones, then the extra sections (reporting/sections/)."""
    out = []
    bench = report.get("bench")
    if bench and bench.get("rows"):
        keys = ["p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "images_per_s", "percent_of_probe",
                "speedup_vs_pytorch"]
        rows = []
        for r in bench["rows"]:
            rs = r.get("runner_settings") or {}
            setting = ", ".join(f"{k}={v}" for k, v in rs.items()) or "-"
            if r.get("status") != "ok":
                rows.append([r["variant"], str(r["batch"]), f"{r['status']}: {r.get('reason')}"]
                            + ["" for _ in keys] + ["-", setting])
            else:
                rows.append([r["variant"], str(r["batch"]), "ok"] + [fmt(k, r.get(k)) for k in keys]
                            + [str(r.get("iterations")), setting])
        out.append(("Benchmark (every row)", ["variant", "batch", "status", "p50 ms", "p90 ms", "p99 ms", "mean ms",
                                              "std ms", "img/s", "% of probe", "speed-up", "calls",
                                              "runner settings"], rows))
    if report.get("validation"):
        keys = ["max_abs", "max_rel", "rel_to_range", "cosine_min", "cosine_mean", "top1_agreement", "top5_agreement"]
        rows = []
        for v, d in report["validation"].items():
            for b, m in sorted((d.get("batches") or {}).items(), key=lambda kv: int(kv[0])):
                rows.append([v, b] + [fmt(k, m.get(k)) for k in keys] + [""])
            rows.append([v, "worst"] + [fmt(k, (d.get("metrics") or {}).get(k)) for k in keys]
                        + [fmt("passed", d.get("passed"))])
        out.append(("Numerics against PyTorch FP32", ["variant", "batch", "max abs", "max rel", "err / range",
                                                      "cosine min", "cosine mean", "top-1 agree", "top-5 agree",
                                                      "check"], rows))
    if report.get("evaluation"):
        rows = [[v, fmt("top1", d.get("top1")), fmt("top5", d.get("top5")), str(d.get("n")),
                 fmt("drop_top1_vs_reference", d.get("drop_top1_vs_reference")),
                 fmt("top1_agreement", d.get("agreement_top1_vs_reference")),
                 str((d.get("dataset") or {}).get("source"))] for v, d in report["evaluation"].items()]
        out.append(("Accuracy", ["variant", "top-1", "top-5", "images", "top-1 drop vs reference",
                                 "top-1 agree vs reference", "dataset"], rows))
    if report.get("per_layer_int8"):
        rows = [[str(d.get("layer")), str(d.get("tensor")), fmt("rel_error", d.get("rel_error")),
                 fmt("cosine", d.get("cosine"))] for d in report["per_layer_int8"]]
        out.append(("INT8 per-layer error against FP32", ["layer", "tensor", "rel error", "cosine"], rows))
    if report.get("engines"):
        rows = [[n, json.dumps(e.get("runtime"), sort_keys=True), json.dumps(e.get("device"), sort_keys=True),
                 json.dumps(e.get("source_onnx"), sort_keys=True), json.dumps(e.get("build_settings"), sort_keys=True)]
                for n, e in report["engines"].items()]
        out.append(("Engines", ["engine", "runtime", "device", "source ONNX", "build settings"], rows))
    out = [(title, headers, rows, []) for title, headers, rows in out]
    out += [(s["title"], s["headers"], s["rows"], s["text"]) for s in report.get("sections") or []]
    return out


def machine_text(machine: dict | None) -> str:
    """The machine the latencies were measured on and its probe figures, the yardstick of '% of probe'."""
    if not machine:
        return "not recorded (no bench results, or a bench from before the machine was recorded)"
    cpu, peaks = machine.get("cpu") or {}, machine.get("peaks") or {}
    parts = [f"id {machine.get('id')}: {cpu.get('model_name')}, {cpu.get('cores_usable')} usable cores"
             + (", under a hypervisor" if cpu.get("hypervisor") else "")]
    probe = []
    for key, unit, name in (("fp32_gflops", "GFLOP/s", "FP32"), ("int8_gops", "GOP/s", "INT8")):
        value = peaks.get(key)
        kernel = peaks.get(f"{key}_kernel")
        probe.append(f"{name} {value} {unit}" + (f" ({kernel})" if kernel else "") if value is not None else
                     f"{name} not measured ({peaks.get(key + '_error') or 'no probe recorded'})")
    load = peaks.get("loadavg_1m")
    parts.append("probe (the peak measured on ResNet-shaped convolutions, not a datasheet figure): " + ", ".join(probe)
                 + (f", measured {peaks['measured_at']}" if peaks.get("measured_at") else "")
                 + (f" at load average {load:.2f}" if load is not None else "")
                 + (" (machine busy)" if peaks.get("busy") else "") + (" (cached)" if peaks.get("cached") else ""))
    if peaks.get("method"):
        parts.append(f"probe: {peaks['method']}")
    ops = machine.get("ops_per_image")
    parts.append(f"'% of probe' = {ops / 1e9:.3f} GOP per image x images/s / the probe figure (INT8 rows "
                 "against INT8, the rest against FP32; TensorRT rows none)" if ops else
                 f"no '% of probe': {machine.get('ops_per_image_error') or 'operations per image not counted'}")
    return "; ".join(parts)


def _facts(report: dict) -> list[tuple[str, str]]:
    env = report["environment"]
    cpu, gpu = env.get("cpu") or {}, env.get("gpu")
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    cal = report["calibration"]
    load = env.get("load_average") or {}
    busy = f"; load average {load.get('before')} at bench start" if load.get("before") is not None else ""
    isa = ", ".join(cpu.get("isa") or []) or "no ISA flags"
    val_inputs = "; ".join(f"{v}: {i.get('kind')} ({i.get('source')}), {i.get('samples')} samples"
                           for v, i in report["validation_inputs"].items() if i) or "-"
    return [
        ("model", f"{report['model']} ({report['num_classes']} classes)"),
        ("weights", report["weights"]["text"]),
        ("calibration data", "-" if cal is None else cal.get("text", "-") + (
            f" — {cal['warning']}" if cal.get("warning") else "")),
        ("environment", f"CPU {cpu.get('model')} ({cpu.get('cores')} cores, {isa}); "
                        f"GPU {gpu['name'] if gpu else 'none'}; Python {env.get('python')}; {env.get('os')}; "
                        f"{versions}{busy}; source: {env.get('source')}"),
        ("machine", machine_text(report.get("machine"))),
        ("validation inputs", val_inputs),
        ("latency", report["latency_definition"]),
        ("throughput", report["throughput_definition"] or "-"),
        ("speed-up", report["speedup_definition"] or "-"),
        ("size", report["size_definition"]),
    ]

