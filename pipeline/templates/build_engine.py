#!/usr/bin/env python3
"""Build a TensorRT engine on this device from the bundle's ONNX files (rexport bundle --build-on-device).

    python3 build_engine.py --precision int8 [--out engines/tensorrt-int8] [--min-batch 1 --opt-batch 8 --max-batch 32]
                            [--workspace MIB] [--timing-cache FILE] [--builder-opt-level N] [--legacy]
                            [--dla-core N] [--version-compatible] [--hardware-compatible] [--int8-float fp16|fp32]

Needs numpy, TensorRT's Python bindings (JetPack: apt install python3-libnvinfer) and polygraphy's CUDA
wrapper (pip install polygraphy); not rexport or torch. All TensorRT work is in trt_engine/ beside
this file, the same package rexport's backend uses, so this builds what 'rexport build' builds and writes
the same engine folder (model.plan + sidecar.json) that run_engine.py and rexport load.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import trt_engine
except ImportError:     # run from rexport's source tree instead of a bundle
    from rexport.pipeline.backends import trt_engine


def find_calibration_cache(explicit: str | None) -> Path | None:
    """--calibration-cache, else the one bundle.json names, else the only one in calibration/."""
    if explicit:
        return Path(explicit)
    manifest = HERE / "bundle.json"
    if manifest.is_file():
        name = json.loads(manifest.read_text(encoding="utf-8")).get("calibration_cache")
        if name and (HERE / name).is_file():
            return HERE / name
    found = sorted((HERE / "calibration").glob("*.tensorrt.cache"))
    if len(found) > 1:
        raise trt_engine.TrtError("several calibration caches in calibration/", "pass --calibration-cache FILE")
    return found[0] if found else None


def build(args) -> Path:
    spec = trt_engine.BuildSpec(
        precision=args.precision, min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
        workspace_mib=args.workspace, timing_cache=args.timing_cache, builder_opt_level=args.builder_opt_level,
        legacy=args.legacy, dla_core=args.dla_core, version_compatible=args.version_compatible,
        hardware_compatible=args.hardware_compatible, int8_float=args.int8_float)
    version = trt_engine.tensorrt_version()
    path = trt_engine.choose_build_path(version, spec.legacy)
    variant = trt_engine.source_variant_for(spec.precision, path)
    onnx_path = Path(args.onnx) if args.onnx else HERE / "models" / f"model.{variant}.onnx"
    if not onnx_path.is_file():
        raise trt_engine.TrtError(f"{onnx_path} not found: TensorRT {version} builds {spec.precision} ({path}) "
                                  f"from model.{variant}.onnx", "make the bundle with that variant")
    cache = find_calibration_cache(args.calibration_cache) if spec.precision == "int8" and \
        path == trt_engine.WEAK_TYPED else None
    intent = trt_engine.read_layer_intent(cache) if cache else None    # the INT8 file's per-layer precisions
    device = trt_engine.cuda_device()
    print(f"building {spec.precision} ({path}, TensorRT {version}) from {onnx_path.name} on {device['name']} ...",
          file=sys.stderr, flush=True)
    result = trt_engine.build_engine(onnx_path, spec, device,
                                     calibration_cache=cache.read_bytes() if cache and cache.is_file() else None,
                                     cache_name=cache.name if cache else None, intent_doc=intent,
                                     log=lambda m: print(m, file=sys.stderr, flush=True))
    out_dir = Path(args.out) if args.out else HERE / "engines" / f"tensorrt-{spec.precision}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:    # the folder appears complete or not at all
        (tmp / trt_engine.PLAN_FILE).write_bytes(result.plan)
        pre = HERE / "preprocess.json"
        sidecar = trt_engine.make_sidecar(
            result, tmp, device, source_onnx=onnx_path, source_variant=variant, built_by="build_engine.py",
            preprocess=json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else {},
            cuda_graphs=args.cuda_graphs)
        (tmp / "sidecar.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out_dir} in {result.seconds:.1f} s; run: python3 {HERE / 'run_engine.py'} {out_dir} IMAGE",
          file=sys.stderr)
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build a TensorRT engine from this bundle's ONNX files on this device.")
    ap.add_argument("--precision", choices=trt_engine.PRECISIONS, default="int8")
    ap.add_argument("--onnx", help="ONNX file to build (default: models/model.<variant>.onnx for the build path)")
    ap.add_argument("--out", help="engine folder to write (default: engines/tensorrt-<precision>)")
    ap.add_argument("--min-batch", type=int, default=1)
    ap.add_argument("--opt-batch", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--workspace", type=int, help="builder workspace limit in MiB")
    ap.add_argument("--timing-cache", help="timing cache file, read if present and saved after the build")
    ap.add_argument("--builder-opt-level", type=int, help="builder optimization level 0..5 (TensorRT 8.6+)")
    ap.add_argument("--legacy", action="store_true", help="TensorRT 10.x: weak-typed build with builder flags")
    ap.add_argument("--dla-core", type=int, help="build for this DLA core (Jetson), GPU fallback on")
    ap.add_argument("--version-compatible", action="store_true", help="plan for later TensorRT versions (8.6+)")
    ap.add_argument("--hardware-compatible", action="store_true", help="plan for all Ampere+ GPUs (8.6+)")
    ap.add_argument("--int8-float", choices=trt_engine.FLOAT_PARTS,
                    help="weak-typed INT8: precision of the layers the INT8 file keeps in float "
                         "(default: the file's, from the layer intent beside the cache)")
    ap.add_argument("--cuda-graphs", action="store_true", help="record the engine's enqueue as a CUDA graph at load")
    ap.add_argument("--calibration-cache", help="TensorRT calibration cache for weak-typed INT8")
    args = ap.parse_args(argv)
    try:
        build(args)
    except trt_engine.TrtError as e:
        print(f"error: {e}" + (f" ({e.hint})" if e.hint else ""), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
