#!/usr/bin/env bash
# The one command to run when a CUDA GPU with TensorRT is at hand (a few minutes on a data-centre GPU).
# For ResNet-18 and ResNet-50 (224 px, seeded random weights: the check is numerics, not accuracy) it
# exports, then builds four TensorRT engines: FP16, INT8 with FP16 float parts, INT8 with FP32 float
# parts, and the legacy (weak-typed) INT8 from the FP32 file + the cache and layer intent written for the
# INT8 file. Each engine is validated against PyTorch FP32 (the validate stage) and against its own
# source ONNX in ONNX Runtime (drift check), and benchmarked (host end-to-end and GPU compute time).
# Everything goes to one JSON: $OUT/gpu_check.json when OUT is set, else benchmarks/results/gpu_check.json.
# On a machine without a CUDA device or TensorRT it says so in one line and exits 0.
#   bash scripts/gpu_check.sh            MODELS="resnet18" SIZE=128 bash scripts/gpu_check.sh
# Works from a bare checkout: rexport need not be installed (a symlink shim maps the repo's folders to
# the rexport.* namespace, as pyproject's package-dir does).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
PY="$(command -v "$PY")"
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/rexport-gpu-check.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT
if ! "$PY" -c "import rexport.pipeline" 2>/dev/null; then
    mkdir -p "$SHIM/rexport"
    for entry in "$REPO"/rexport/*; do ln -s "$entry" "$SHIM/rexport/$(basename "$entry")"; done
    for sub in models pipeline calibration; do ln -s "$REPO/$sub" "$SHIM/rexport/$sub"; done
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
RESULT="${OUT:-$REPO/benchmarks/results}/gpu_check.json"
mkdir -p "$(dirname "$RESULT")"

cd "$SHIM"
RESULT="$RESULT" WORK="$SHIM/work" MODELS="${MODELS:-resnet18 resnet50}" SIZE="${SIZE:-224}" \
PYTHONUNBUFFERED=1 "$PY" - <<'EOF'
import ctypes, importlib.util, json, os, shutil, sys, time
from pathlib import Path

# First, with the standard library only: is there a CUDA driver with a device, and TensorRT?
missing = []
try:
    cuda = ctypes.CDLL("libcuda.so.1")
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        missing.append("no CUDA device")
except OSError:
    missing.append("no CUDA device (no NVIDIA driver)")
if importlib.util.find_spec("tensorrt") is None:
    missing.append("tensorrt not installed")
if missing:
    print(f"gpu_check: skipped: {', '.join(missing)} (this check needs a CUDA GPU and TensorRT)")
    sys.exit(0)
try:
    import numpy as np
    from rexport.pipeline.backends import get_backend
    trt = get_backend("tensorrt")
except ImportError as e:
    print(f"gpu_check: cannot run: {e} (install rexport's dependencies: pip install -e '.[tensorrt]')")
    sys.exit(2)

from rexport.core.errors import RexportError
from rexport.core.machine import machine_fingerprint
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.backends import BuildSettings
from rexport.pipeline.backends import trt_engine as te
from rexport.pipeline.backends.sidecar import load_engine, read_sidecar
from rexport.pipeline.bench import BenchSettings, run_bench
from rexport.pipeline.build import build_engines
from rexport.pipeline.export import ExportSettings, run_export
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.quantize import QuantizeSettings, run_quantize
from rexport.pipeline.runners import OnnxRuntimeRunner
from rexport.pipeline.validate import ValidateSettings, run_validate

version = trt.tensorrt_version()
major = te.major_minor(version)[0]
work, size = Path(os.environ["WORK"]), int(os.environ["SIZE"])
BUILD = BuildSettings(min_batch=1, opt_batch=8, max_batch=8)
CASES = [  # name, quantize settings, engine precision, build settings
    ("fp16", QuantizeSettings(precision="fp16"), "fp16", BUILD),
    ("int8-fp16-floats", QuantizeSettings(calib_samples=64, int8_float="fp16", int8_float_samples=32), "int8", BUILD),
    ("int8-fp32-floats", QuantizeSettings(calib_samples=64, int8_float="fp32"), "int8", BUILD),
    ("int8-legacy", QuantizeSettings(calib_samples=64, int8_float="fp16", int8_float_samples=32), "int8",
     BuildSettings(min_batch=1, opt_batch=8, max_batch=8, legacy=True)),
]


def drift(engine_dir: Path, onnx_path: Path) -> dict:
    """The engine against its own source ONNX in ONNX Runtime, on the same seeded inputs."""
    x = np.random.default_rng(0).standard_normal((16, 3, size, size), dtype=np.float32)
    with OnnxRuntimeRunner(onnx_path) as ref, load_engine(engine_dir) as eng:
        a = np.concatenate([ref.infer(x[i:i + 8]) for i in (0, 8)]).astype(np.float64)
        b = np.concatenate([eng.infer(x[i:i + 8]) for i in (0, 8)]).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"against": onnx_path.name, "samples": 16, "cosine_min": float(cos.min()),
            "max_abs": float(np.abs(a - b).max()), "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean())}


def one_case(base: RunDir, model: str, name: str, qs, precision: str, bs) -> dict:
    out = {"model": model, "case": name, "tensorrt": version}
    if name == "int8-legacy" and major >= 11:
        return {**out, "status": "skipped", "reason": f"TensorRT {version} has no weak-typed INT8 (removed in 11)"}
    run = RunDir(shutil.copytree(base.path, work / f"{model}-{name}"))
    t0 = time.perf_counter()
    try:
        with run.locked():
            q = run_quantize(run, qs, progress=False)
            out["quantize"] = {"status": q["status"], "int8_float": (q.get("summary") or {}).get("int8_float"),
                               "tensorrt_cache_tensors": (q.get("summary") or {}).get("tensorrt_cache_tensors")}
            recs = build_engines(run, backend="tensorrt", precisions=[precision], settings=bs, progress=False)
            variant = f"tensorrt-{precision}"
            sc = read_sidecar(run.path / "engines" / variant)
            out["build"] = {"status": recs[0]["status"], "seconds": sc["build_seconds"],
                            "path": sc["build_settings"]["build_path"], "flags": sc["build_settings"]["builder_flags"],
                            "source": sc["source_onnx"]["file"], "layer_intent": sc["build_settings"].get("layer_intent")}
            val = run_validate(run, ValidateSettings(samples=16, batch_sizes=(8,)), [variant])
            out["validate_vs_pytorch"] = {"status": val[0]["status"], "summary": val[0].get("summary")}
            out["drift_vs_own_onnx"] = drift(run.path / "engines" / variant, run.file(f"onnx/{sc['source_onnx']['file']}"))
            bench = run_bench(run, BenchSettings(variants=(variant,), batch_sizes=(1, 8), min_time=1.0, max_time=3.0),
                              progress=True)
            out["bench"] = [{k: r.get(k) for k in ("batch", "status", "reason", "p50_ms", "p99_ms", "images_per_s",
                                                   "gpu_compute_ms", "cuda_graphs")} for r in bench["rows"]]
            out["status"] = "ok"
    except RexportError as e:       # recorded, and the check goes on with the next case
        out.update(status="error", reason=str(e).splitlines()[0][:300])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"gpu_check {model} {name}: {out['status']}" + (f" ({out.get('reason')})" if out["status"] != "ok" else
          f", drift cosine_min {out['drift_vs_own_onnx']['cosine_min']:.5f}, validate {out['validate_vs_pytorch']['status']}"),
          flush=True)
    return out


results, t_all = [], time.perf_counter()
for model in os.environ["MODELS"].split():
    base = RunDir(work / model)
    spec = PreprocessSpec(input_size=size, resize=int(round(size * 256 / 224)))
    with base.locked():
        run_export(base, ExportSettings(model=model, preprocess=spec))
        run_quantize(base, QuantizeSettings(calib_samples=64, int8_float="fp32"), progress=False)   # calibrate once
    results += [one_case(base, model, *case) for case in CASES]

doc = {"schema_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tensorrt": version,
       "input_size": size, "weights": "seeded random (numerics check)", "seconds": round(time.perf_counter() - t_all, 1),
       "machine": machine_fingerprint(probe=False), "load_average": os.getloadavg(), "cases": results}
Path(os.environ["RESULT"]).write_text(json.dumps(doc, indent=2, default=str) + "\n")
failed = [f"{r['model']} {r['case']}" for r in results if r["status"] == "error"]
print(f"gpu_check: wrote {os.environ['RESULT']} ({len(results)} cases, {len(failed)} failed, {doc['seconds']} s)")
sys.exit(1 if failed else 0)
EOF
