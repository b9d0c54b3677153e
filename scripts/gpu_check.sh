#!/usr/bin/env bash
# What rexport sees on a machine with an NVIDIA GPU (and PyTorch+CUDA) but without TensorRT:
# CUDA detection two ways (torch, and the ctypes driver query the TensorRT backend uses), the
# TensorRT backend's unavailable reason, and the one-line refusal 'rexport build --backend tensorrt'
# gives. Works from a bare checkout: rexport need not be installed, and onnx/onnxruntime/pillow
# may be missing (a symlink shim maps the repo's folders to the rexport.* namespace).
# Also runs on a CPU-only machine, where it reports that there is no CUDA device. Exit code 0.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(command -v "${PYTHON:-python3}")"
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac
SHIM="$(mktemp -d "${TMPDIR:-/tmp}/rexport-shim.XXXXXX")"
trap 'rm -rf "$SHIM"' EXIT

# rexport/ -> repo/rexport/*, and repo/{models,pipeline,calibration} as rexport.{models,...},
# the same mapping as pyproject's package-dir.
mkdir -p "$SHIM/rexport"
for entry in "$REPO"/rexport/*; do
    ln -s "$entry" "$SHIM/rexport/$(basename "$entry")"
done
for sub in models pipeline calibration; do
    ln -s "$REPO/$sub" "$SHIM/rexport/$sub"
done

echo "== machine"
"$PY" --version
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader || echo "nvidia-smi: not found"

# From inside the shim: run from the repo root, python would put the real rexport/ (which lacks
# the mapped subpackages) first on sys.path.
cd "$SHIM"
PYTHONPATH="$SHIM" PYTHONDONTWRITEBYTECODE=1 "$PY" - <<'EOF'
import importlib.util
import sys
import time

def have(mod):
    return importlib.util.find_spec(mod) is not None

print("python packages:", {m: have(m) for m in ("torch", "tensorrt", "numpy", "PIL", "onnx", "onnxruntime", "polygraphy", "openvino")})

print("== CUDA detection")
t0 = time.perf_counter()
from rexport.pipeline.backends.tensorrt import TensorRTBackend, cuda_gpu
ctypes_view, why = cuda_gpu()
print(f"tensorrt backend cuda_gpu() (CUDA driver via ctypes, {1000 * (time.perf_counter() - t0):.0f} ms):", ctypes_view or why)
print("torch or tensorrt imported by that:", [m for m in ("torch", "tensorrt") if m in sys.modules])
try:
    import torch
    torch_view = ({"name": torch.cuda.get_device_name(0),
                   "compute_capability": "%d.%d" % torch.cuda.get_device_capability(0)}
                  if torch.cuda.is_available() else None)
except ImportError:
    torch_view = None
print("torch.cuda view:", torch_view)
if torch_view and ctypes_view:
    same = (torch_view["compute_capability"], torch_view["name"]) == (ctypes_view["compute_capability"], ctypes_view["name"])
    print("torch and the driver query agree:", same)

print("== TensorRT backend")
backend = TensorRTBackend()
print("unavailable_reason():", backend.unavailable_reason())

print("== refusal of 'rexport build --backend tensorrt'")
err = backend.missing_dependency()   # what the build stage raises
if err is None:
    print("no refusal: TensorRT and a CUDA device are available")
else:
    print(f"exit {err.exit_code}: {type(err).__name__}: {err}")
EOF

# The CLI itself (needs click): a run directory that looks exported, so 'build' reaches the backend check.
if PYTHONPATH="$SHIM" "$PY" -c "import click" 2>/dev/null; then
    mkdir -p "$SHIM/run/onnx"
    : > "$SHIM/run/onnx/model.fp32.onnx"
    echo '{"schema_version": 1, "stages": {"export": {"status": "ok", "settings": {}}}}' > "$SHIM/run/manifest.json"
    set +e
    PYTHONPATH="$SHIM" "$PY" -m rexport build --backend tensorrt --out "$SHIM/run"
    echo "rexport build --backend tensorrt: exit $?"
    set -e
else
    echo "(click not installed: CLI not run)"
fi
echo "== done"
