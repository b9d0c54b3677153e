"""Our INT8 files on the CPU engine (OpenVINO) against NNCF's own INT8, ONNX Runtime's quantizer and FP32.

Builds random-weight ResNets at 224 (BatchNorm statistics filled from a few random batches so the folded
model has realistic biases and activation ranges), calibrates min-max ranges with ONNX Runtime, writes
both INT8 forms the quantize stage writes (``int8-openvino``: "ours", and the TensorRT form) with
``insert_qdq``, compiles them as ``rexport build`` does (its INT8 pass, and each file as-is beside),
quantizes the same model with NNCF (the anchor: OpenVINO's own INT8) and with ONNX Runtime's quantizer,
and times everything with OpenVINO on the CPU next to ORT/OpenVINO FP32.

    .venv/bin/python benchmarks/bench_int8_placement.py            # resnet18+resnet50, batch 1 and 8
    .venv/bin/python benchmarks/bench_int8_placement.py --models resnet18 --batches 8 --rounds 2

Two clocks, both round-robin over the configurations (``--rounds`` rounds of ``--seconds`` each) so that
background load hits every configuration alike:
* wall clock, all cores, one synchronous request, PERFORMANCE_HINT=LATENCY, static shape per batch;
  img/s = batch / the best round's median latency (every round's median is in the JSON);
* CPU time (process_time) on one thread (INFERENCE_NUM_THREADS=1 / intra_op_num_threads=1); img per
  CPU-second = batch / median CPU time per batch. This one measures the work itself and stays within
  ~2 % on a shared, loaded machine, where wall clock does not; placement decisions use it.
FP32 rows use INFERENCE_PRECISION_HINT=f32; the INT8 rows keep OpenVINO's default for the layers left in
float (bf16 on CPUs with AVX512-BF16), the same for ours and NNCF's. Needs nncf (bench extra).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from rexport.core.fsio import atomic_write_json
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.export import ExportSettings, export_onnx
from rexport.pipeline.quantization import QdqSettings, insert_qdq, tensors_to_calibrate
from rexport.pipeline.quantization.forms import OPENVINO_FORM, TENSORRT_FORM, form_settings

RESULTS = Path(__file__).resolve().parent / "results" / "int8_placement.json"
SIZE = 224

#: our files: the two INT8 forms the quantize stage writes (rexport.pipeline.quantization.forms)
VARIANTS: dict[str, QdqSettings] = {
    "ours": form_settings(QdqSettings(), OPENVINO_FORM),
    "ours-tensorrt-form": form_settings(QdqSettings(), TENSORRT_FORM),
}
#: timed as ``rexport build`` compiles them (prepare_int8: unsigned post-ReLU quantizers, and 7-bit weights
#: after signed activations on a CPU without VNNI); "<name>-file-as-is" is the same file without that pass
BUILDER_PASS = ("ours", "ours-tensorrt-form")


def export_fp32(name: str, path: Path, seed: int = 0) -> None:
    """The model as the export stage writes it, from a checkpoint whose BN statistics come from a few
    random batches: the folded Convs get realistic scales and biases."""
    import torch

    from rexport.models.resnet import MODELS

    torch.manual_seed(seed)
    model = MODELS[name](num_classes=1000)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, SIZE, SIZE))
    ckpt = path.with_suffix(".pth")
    torch.save(model.state_dict(), ckpt)
    export_onnx(ExportSettings(model=name, weights=str(ckpt), preprocess=PreprocessSpec(input_size=SIZE)), path)


def calibration_batches(n: int = 4, batch: int = 8, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32) for _ in range(n)]


def minmax_ranges(fp32: Path, tensors: list[str], batches: list[np.ndarray]) -> dict[str, float]:
    """amax of each tensor over the batches (ORT with the tensors added as graph outputs)."""
    m = onnx.load(str(fp32))
    have = {o.name for o in m.graph.output}
    m.graph.output.extend([onnx.ValueInfoProto(name=t) for t in tensors if t not in have])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    amax: dict[str, float] = {}
    for x in batches:
        feeds = {"input": x}
        outs = dict(zip(names, sess.run(None, feeds)))
        outs["input"] = x
        for t in tensors:
            amax[t] = max(amax.get(t, 0.0), float(np.abs(outs[t]).max()))
    return amax


def nncf_int8(fp32: Path, batches: list[np.ndarray]):
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32))
    samples = [x[i:i + 1] for x in batches for i in range(x.shape[0])]
    return nncf.quantize(model, nncf.Dataset(samples), preset=nncf.QuantizationPreset.PERFORMANCE,
                         subset_size=len(samples))


def ort_quantizer_int8(fp32: Path, out: Path, batches: list[np.ndarray]) -> Path:
    """ONNX Runtime's own static Q/DQ quantizer, symmetric, per-channel: a second peer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": x} for x in batches])

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out


def as_builder_compiles(path: Path) -> tuple[object, dict]:
    """The OpenVINO model ``rexport build`` makes from an INT8 file (rexport.pipeline.backends.openvino),
    and what its INT8 pass did."""
    import openvino as ov

    from rexport.core.env import cpu_info
    from rexport.pipeline.backends.openvino import prepare_int8

    model = ov.convert_model(str(path))
    return model, prepare_int8(model, cpu_info()["isa"])


def _compiled_openvino(model, batch: int, config: dict):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(model)) if isinstance(model, (str, Path)) else model.clone()
    model.reshape({model.inputs[0].get_any_name(): [batch, 3, SIZE, SIZE]})
    return core.compile_model(model, "CPU", config).create_infer_request()


def openvino_runner(model, batch: int, config: dict):
    """A compiled model at a static batch size; returns a no-argument callable that runs one batch."""
    request = _compiled_openvino(model, batch, config)
    x = np.random.default_rng(2).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
    return lambda: request.infer({0: x})


def ort_runner(path: Path, batch: int, threads: int = 0):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
    return lambda: sess.run(None, {"input": x})


def time_interleaved(runners: dict[str, object], batch: int, seconds: float, rounds: int,
                     clock=time.perf_counter) -> dict[str, list[float]]:
    """Round-robin over the configurations, ``seconds`` each per round, so background load hits them
    alike; returns each configuration's per-round median time per batch (seconds of ``clock``)."""
    for fn in runners.values():
        for _ in range(3):
            fn()
    medians: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for label, fn in runners.items():
            lat = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or len(lat) < 3:
                t0 = clock()
                fn()
                lat.append(clock() - t0)
            medians[label].append(statistics.median(lat))
    return medians


def openvino_logits(model, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(model)) if isinstance(model, (str, Path)) else model.clone()
    model.reshape({model.inputs[0].get_any_name(): list(x.shape)})
    return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})({0: x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def environment() -> dict:
    import nncf
    import openvino as ov

    from rexport.core.machine import machine_fingerprint

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"machine": machine_fingerprint(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "openvino": ov.__version__,
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "nncf": nncf.__version__,
            "ov_default_inference_precision": str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))}


def main(argv: list[str] | None = None) -> int:
    import openvino as ov

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seconds", type=float, default=0.75, help="timed seconds per configuration and round")
    ap.add_argument("--rounds", type=int, default=6, help="round-robin rounds over the configurations")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of our placements to time")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the ONNX files here (default: a temp dir)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    variants = {k: VARIANTS[k] for k in args.variants.split(",") if k}

    fp32_cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    int8_cfg = {"PERFORMANCE_HINT": "LATENCY"}
    rows: list[dict] = []
    env = environment()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            fp32 = work / f"{name}.fp32.onnx"
            t0 = time.perf_counter()
            export_fp32(name, fp32)
            print(f"[{name}] exported in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            calib = calibration_batches()
            needed = sorted({t for s in variants.values() for t in tensors_to_calibrate(fp32, s)})
            ranges = minmax_ranges(fp32, needed, calib)
            models: dict[str, object] = {}
            reports: dict[str, dict] = {}
            for vname, settings in variants.items():
                rep = insert_qdq(fp32, ranges, work / f"{name}.{vname}.onnx", settings)
                models[vname] = rep.path
                reports[vname] = {"settings": asdict(settings), "qdq_pairs": rep.qdq_pairs,
                                  "activation_qdq": len(rep.activation_amax), "size_bytes": rep.size_bytes}
            t0 = time.perf_counter()
            for v in BUILDER_PASS:
                if v in models:
                    models[f"{v}-file-as-is"] = models[v]
                    models[v], reports[v]["builder_pass"] = as_builder_compiles(models[v])
            models["ort-quantizer"] = ort_quantizer_int8(fp32, work / f"{name}.ort-quantizer.onnx", calib)
            models["nncf"] = nncf_int8(fp32, calib)
            print(f"[{name}] peers quantized in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

            x = np.random.default_rng(3).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
            ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            cos = {v: round(cosine(ref, openvino_logits(m, x)), 5) for v, m in models.items()}

            for batch in batches:
                # wall clock, all cores (PERFORMANCE_HINT=LATENCY): the best round counts
                runners = {"ort-fp32": ort_runner(fp32, batch), "ov-fp32": openvino_runner(fp32, batch, fp32_cfg)}
                runners.update({f"ov-{v}": openvino_runner(m, batch, int8_cfg) for v, m in models.items()})
                wall = time_interleaved(runners, batch, args.seconds, args.rounds)
                # CPU time on one thread: the work itself, robust to other processes on a shared machine
                one = {"INFERENCE_NUM_THREADS": 1}
                runners = {"ort-fp32": ort_runner(fp32, batch, threads=1),
                           "ov-fp32": openvino_runner(fp32, batch, {**fp32_cfg, **one})}
                runners.update({f"ov-{v}": openvino_runner(m, batch, {**int8_cfg, **one}) for v, m in models.items()})
                cpu = time_interleaved(runners, batch, args.seconds, args.rounds, clock=time.process_time)
                del runners
                for label in wall:
                    variant = label.removeprefix("ov-")
                    best, cpu_med = min(wall[label]), statistics.median(cpu[label])
                    row = {"model": name, "batch": batch, "config": label,
                           "img_per_s": round(batch / best, 1), "median_ms": round(best * 1e3, 2),
                           "round_medians_ms": [round(v * 1e3, 2) for v in wall[label]],
                           "cpu_ms_1thread": round(cpu_med * 1e3, 2),
                           "img_per_cpu_s": round(batch / cpu_med, 1)}
                    if variant in cos:
                        row["cosine_vs_fp32"] = cos[variant]
                    if variant in reports:
                        row.update({k: v for k, v in reports[variant].items() if k != "settings"})
                    rows.append(row)
                    print(f"[{name} b{batch}] {label:22s} {row['img_per_s']:8.1f} img/s wall  "
                          f"{row['img_per_cpu_s']:8.1f} img/CPU-s  rounds {row['round_medians_ms']} ms",
                          file=sys.stderr)

    for metric in ("img_per_s", "img_per_cpu_s"):
        base = {(r["model"], r["batch"], r["config"]): r[metric] for r in rows}
        suffix = "" if metric == "img_per_s" else "_cpu"
        for row in rows:
            key = (row["model"], row["batch"])
            row[f"x_ort_fp32{suffix}"] = round(row[metric] / base[(*key, "ort-fp32")], 2)
            if (*key, "ov-nncf") in base:
                row[f"x_nncf{suffix}"] = round(row[metric] / base[(*key, "ov-nncf")], 3)
    result = {"what": "OpenVINO CPU speed of INT8 Q/DQ placements vs NNCF's INT8, ONNX Runtime's quantizer and FP32",
              "environment": env,
              "timing": {"wall": "img_per_s: all cores, 1 sync request, PERFORMANCE_HINT=LATENCY, static shape per "
                                 "batch; batch / best round's median latency",
                         "cpu": "img_per_cpu_s: 1 thread, batch / median process CPU time per batch (robust to "
                                "other load on a shared machine; placement decisions use it)",
                         "interleaving": "configurations timed round-robin, each round seconds_per_round long",
                         "seconds_per_round": args.seconds, "rounds": args.rounds,
                         "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
                         "fp32_config": fp32_cfg, "int8_config": int8_cfg},
              "calibration": "min-max amax over 4 random-normal batches of 8 (ours, NNCF and ONNX Runtime's quantizer "
                             "see the same 32 images)",
              "variants": {k: asdict(v) for k, v in variants.items()},
              "rows": rows}
    atomic_write_json(args.out, result)
    print_table(rows)
    print(f"\nwritten {args.out}")
    return 0


def print_table(rows: list[dict]) -> None:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    keys = list(dict.fromkeys((r["model"], r["batch"]) for r in rows))
    cell = {(r["model"], r["batch"], r["config"]): r for r in rows}
    for metric, suffix, title in (("img_per_s", "", "img/s, wall clock, all cores (x ORT FP32, x NNCF)"),
                                  ("img_per_cpu_s", "_cpu", "img per CPU-second, 1 thread (x ORT FP32, x NNCF)")):
        print(f"\n{title}")
        print(f"{'config':34s}" + "".join(f"{m + ' b' + str(b):>26s}" for m, b in keys) + "   cosine vs FP32")
        for c in configs:
            line = f"{c:34s}"
            for m, b in keys:
                r = cell.get((m, b, c))
                nncf = f" x{r[f'x_nncf{suffix}']:.2f}" if r and f"x_nncf{suffix}" in r else ""
                line += f"{r[metric]:>9.1f} (x{r[f'x_ort_fp32{suffix}']:.2f}{nncf})".rjust(26) if r else f"{'-':>26s}"
            models = dict.fromkeys(m for m, _ in keys)
            coss = [f"{m}:{cell[(m, b, c)]['cosine_vs_fp32']:.4f}" for m in models for mm, b in keys
                    if mm == m and "cosine_vs_fp32" in cell.get((m, b, c), {})][:len(models) * len(keys)]
            print(line + "   " + " ".join(dict.fromkeys(coss)))


if __name__ == "__main__":
    sys.exit(main())
