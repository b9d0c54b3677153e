#!/usr/bin/env bash
# One prepared check for a lent GPU machine (PyTorch + CUDA, no TensorRT): what rexport sees there.
# Usage (from the repo root, with wheels for the pure-Python deps the image lacks in .whl/):
#   bash scripts/device_check.sh
# Writes its log to $OUT/device_check.log when OUT is set.
set -uo pipefail
LOG="${OUT:-/tmp}/device_check.log"
exec > >(tee "$LOG") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader || true
bash scripts/gpu_check.sh
echo "== real export + 'rexport build --backend tensorrt' on this machine"
SHIM=$(mktemp -d); mkdir -p "$SHIM/rexport"
for e in rexport/*; do ln -s "$PWD/$e" "$SHIM/rexport/$(basename "$e")"; done
for s in models pipeline calibration; do ln -s "$PWD/$s" "$SHIM/rexport/$s"; done
export PYTHONPATH="$SHIM:${PYTHONPATH:-}"
RUN=$(mktemp -d)/run
(cd "$SHIM" && python3 -m rexport export --input-size 64 --num-classes 10 --out "$RUN"); echo "export exit $?"
(cd "$SHIM" && python3 -m rexport build --backend tensorrt --precision fp16 --out "$RUN"); rc=$?
echo "build --backend tensorrt exit $rc"; ls "$RUN"; ls "$RUN/engines" 2>/dev/null && echo "engines/ exists (should not)" || echo "no engines/ written"
(cd "$SHIM" && python3 -m rexport validate --out "$RUN" --samples 8); echo "validate exit $?"
echo "== pytest -m gpu (skips cleanly without TensorRT)"
(cd "$SHIM" && python3 -m pytest -q -m gpu -rs -p no:cacheprovider "$OLDPWD/tests/pipeline/test_tensorrt.py" 2>&1 | tail -5)
echo "== done"
