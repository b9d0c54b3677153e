#!/usr/bin/env python3
"""Build a TensorRT engine on this device from the bundle's ONNX files (rexport bundle --build-on-device).

    python3 build_engine.py --precision int8 [--out engines/tensorrt-int8] [--min-batch 1 --opt-batch 8 --max-batch 32]
                            [--workspace MIB] [--legacy] [--dla-core N] [--calibration-cache FILE]

Needs only numpy and TensorRT's Python bindings (JetPack: apt install python3-libnvinfer); not
rexport, torch or polygraphy. The engine folder it writes (model.plan + sidecar.json, the same
schema rexport writes) is what run_engine.py and 'rexport' load.

How precision gets into the engine, by TensorRT version (same rule as rexport's
pipeline/backends/tensorrt.py; keep the two in step):
  * TensorRT >= 10: strongly typed network from models/model.<precision>.onnx (FP16 from the
    mixed-precision file, INT8 from the Q/DQ file); no precision builder flags. TensorRT 11 has
    nothing else (it removed BuilderFlag.FP16/INT8 and the INT8 calibrators).
  * TensorRT 8.5/8.6 (JetPack 5.1/6.0), or --legacy on 10.x: models/model.fp32.onnx with the FP16
    or INT8+FP16 builder flags; INT8 ranges from rexport's calibration written as a TensorRT
    calibration cache (calibration/*.tensorrt.cache), so no calibration runs here.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRECISIONS = ("fp32", "fp16", "int8")
STRONGLY_TYPED, WEAK_TYPED = "strongly_typed", "weak_typed"
SIDECAR_SCHEMA = 1
CALIBRATOR_FOR_ALGORITHM = {"EntropyCalibration2": "IInt8EntropyCalibrator2",
                            "EntropyCalibration": "IInt8EntropyCalibrator",
                            "MinMaxCalibration": "IInt8MinMaxCalibrator"}


class BuildError(Exception):
    """A problem the user can fix: printed as one line, exit code 2."""


def version_tuple(v) -> tuple:
    out = []
    for part in str(v or "").split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def choose_build_path(trt_version: str, legacy: bool) -> str:
    """8.x: weak typed (no STRONGLY_TYPED flag before 9.x); 10.x: strongly typed unless --legacy;
    11.x: strongly typed only (the weak-typing builder flags were removed)."""
    v = version_tuple(trt_version)
    if not v:
        raise BuildError(f"cannot read the TensorRT version {trt_version!r}")
    if v[0] < 10:
        return WEAK_TYPED
    if legacy:
        if v[0] >= 11:
            raise BuildError(f"--legacy is impossible with TensorRT {trt_version}: TensorRT 11 removed the FP16/INT8 "
                             "builder flags and INT8 calibrators; drop --legacy")
        return WEAK_TYPED
    return STRONGLY_TYPED


def builder_flags_for(precision: str, path: str) -> list:
    if path == STRONGLY_TYPED:
        return []
    return {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]


def source_variant_for(precision: str, path: str) -> str:
    return precision if path == STRONGLY_TYPED else "fp32"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cuda_gpu() -> dict:
    """Name, compute capability and driver CUDA version of device 0, via the CUDA driver API."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise BuildError("no NVIDIA driver (libcuda.so.1 not found): TensorRT needs an NVIDIA GPU")
    if lib.cuInit(0) != 0:
        raise BuildError("cuInit failed: no usable CUDA device")
    dev, major, minor, integrated, drv = (ctypes.c_int(0) for _ in range(5))
    buf = ctypes.create_string_buffer(256)
    lib.cuDeviceGet(ctypes.byref(dev), 0)
    lib.cuDeviceGetName(buf, 256, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(integrated), 18, dev)
    lib.cuDriverGetVersion(ctypes.byref(drv))
    return {"name": buf.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}",
            "integrated": bool(integrated.value), "cuda_driver": f"{drv.value // 1000}.{(drv.value % 1000) // 10}"}


def make_sidecar(*, precision: str, engine_dir: Path, plan_name: str, source_onnx: Path, source_variant: str,
                 trt_version: str, gpu: dict, io: dict, profile: dict, build_settings: dict,
                 build_seconds: float, preprocess: dict) -> dict:
    """The sidecar.json rexport writes for a TensorRT engine (schema 1)."""
    return {
        "schema_version": SIDECAR_SCHEMA, "backend": "tensorrt", "precision": precision,
        "engine_files": {plan_name: sha256_file(engine_dir / plan_name)},
        "source_onnx": {"file": source_onnx.name, "sha256": sha256_file(source_onnx), "variant": source_variant},
        "runtime": {"tensorrt": trt_version, "cuda": gpu["cuda_driver"], "built_by": "build_engine.py"},
        "device": {"kind": "gpu", "name": gpu["name"], "compute_capability": gpu["compute_capability"],
                   "integrated": gpu["integrated"], "dla_core": build_settings.get("dla_core")},
        "io": io, "profile": profile, "build_settings": build_settings,
        "load_settings": {"cuda_graphs": False, "optimization_profile": 0},
        "build_seconds": round(float(build_seconds), 3), "preprocess": preprocess,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def make_cache_calibrator(trt, cache: bytes):
    """An INT8 calibrator that only hands TensorRT our cache: get_batch returns None, so if TensorRT
    rejected the cache the build fails instead of producing an uncalibrated engine."""
    header = cache.split(b"\n", 1)[0].decode("ascii", errors="replace").strip()
    algorithm = header.split("-", 2)[-1]
    base = getattr(trt, CALIBRATOR_FOR_ALGORITHM.get(algorithm, ""), None)
    if not header.startswith("TRT-") or base is None:
        raise BuildError(f"not a usable TensorRT calibration cache (header {header[:60]!r})")

    class CacheCalibrator(base):
        def __init__(self):
            base.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names, *args):
            return None

        def read_calibration_cache(self, *args):
            return cache

        def write_calibration_cache(self, data, *args):
            pass

    return CacheCalibrator()


def onnx_io(network) -> tuple[str, list, str, list]:
    inp, out = network.get_input(0), network.get_output(0)
    return inp.name, list(inp.shape), out.name, list(out.shape)


def find_calibration_cache(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    manifest = HERE / "bundle.json"
    if manifest.is_file():
        name = json.loads(manifest.read_text(encoding="utf-8")).get("calibration_cache")
        if name and (HERE / name).is_file():
            return HERE / name
    found = sorted((HERE / "calibration").glob("*.tensorrt.cache"))
    if len(found) == 1:
        return found[0]
    if found:
        raise BuildError("several calibration caches in calibration/: pass --calibration-cache FILE")
    return None


def build(args) -> Path:
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError("tensorrt is not importable: on JetPack 'sudo apt install python3-libnvinfer' "
                         "(and use the system python3 or a venv with --system-site-packages)") from None
    version = trt.__version__
    path = choose_build_path(version, args.legacy)
    flags = builder_flags_for(args.precision, path)
    variant = source_variant_for(args.precision, path)
    onnx_path = Path(args.onnx) if args.onnx else HERE / "models" / f"model.{variant}.onnx"
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path} not found: TensorRT {version} builds {args.precision} ({path}) from "
                         f"model.{variant}.onnx; make the bundle with that variant")
    gpu = cuda_gpu()
    out_dir = Path(args.out) if args.out else HERE / "engines" / f"tensorrt-{args.precision}"
    if not (args.min_batch <= args.opt_batch <= args.max_batch) or args.min_batch < 1:
        raise BuildError("need 1 <= --min-batch <= --opt-batch <= --max-batch")

    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    if path == STRONGLY_TYPED:
        # 10.x: opt-in flag; 11.x: deprecated, ignored, always strongly typed.
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif version_tuple(version) < (10,):
        # 8.x: explicit batch is required for ONNX (deprecated and ignored from 10.0).
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    else:
        network_flags = 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT {version} cannot parse {onnx_path.name}: {errors[:400]}")
    in_name, in_shape, out_name, out_shape = onnx_io(network)
    chw = [int(d) for d in in_shape[1:]]
    shapes = {"min": [args.min_batch, *chw], "opt": [args.opt_batch, *chw], "max": [args.max_batch, *chw]}

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(in_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)       # FP32 layers stay exact FP32
    if args.workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(args.workspace) << 20)   # 8.4+
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    has_qdq = any(network.get_layer(i).type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
                  for i in range(network.num_layers))
    calib_file = None
    if "INT8" in flags and not has_qdq:
        calib_file = find_calibration_cache(args.calibration_cache)
        if calib_file is None or not calib_file.is_file():
            raise BuildError("an INT8 build with TensorRT 8.x / --legacy needs the calibration cache "
                             "(calibration/*.tensorrt.cache in the bundle, or --calibration-cache FILE)")
        calibrator = make_cache_calibrator(trt, calib_file.read_bytes())
        config.int8_calibrator = calibrator            # deprecated 10.1, removed 11.0
        if hasattr(config, "set_calibration_profile"):
            config.set_calibration_profile(profile)
    if args.dla_core is not None:
        if builder.num_DLA_cores <= args.dla_core:
            raise BuildError(f"DLA core {args.dla_core} requested, this device has {builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = args.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    print(f"building {args.precision} ({path}, TensorRT {version}) from {onnx_path.name} on {gpu['name']} ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t0
    if plan is None:
        raise BuildError("TensorRT could not build the engine; see its log above")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "model.plan").write_bytes(bytes(plan))
        pre_file = HERE / "preprocess.json"
        preprocess = json.loads(pre_file.read_text(encoding="utf-8")) if pre_file.is_file() else {}
        settings = {"min_batch": args.min_batch, "opt_batch": args.opt_batch, "max_batch": args.max_batch,
                    "workspace_mib": args.workspace, "legacy": args.legacy, "dla_core": args.dla_core,
                    "version_compatible": False, "hardware_compatible": False, "build_path": path,
                    "builder_flags": flags, "tf32": False, "explicit_quantization": has_qdq,
                    "calibration_cache": calib_file.name if calib_file else None}
        sidecar = make_sidecar(
            precision=args.precision, engine_dir=tmp, plan_name="model.plan", source_onnx=onnx_path,
            source_variant=variant, trt_version=version, gpu=gpu,
            io={"inputs": [{"name": in_name, "shape": [-1, *chw], "dtype": "float32"}],
                "outputs": [{"name": out_name, "shape": [-1, *[int(d) for d in out_shape[1:]]], "dtype": "float32"}]},
            profile={"input": in_name, **shapes}, build_settings=settings, build_seconds=build_seconds,
            preprocess=preprocess)
        (tmp / "sidecar.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            if old.exists():
                _rmtree(old)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            _rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        _rmtree(tmp)
        raise
    print(f"wrote {out_dir} in {build_seconds:.1f} s; run: python3 {HERE / 'run_engine.py'} {out_dir} IMAGE",
          file=sys.stderr)
    return out_dir


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build a TensorRT engine from this bundle's ONNX files on this device.")
    ap.add_argument("--precision", choices=PRECISIONS, default="int8")
    ap.add_argument("--onnx", help="ONNX file to build (default: models/model.<variant>.onnx for the build path)")
    ap.add_argument("--out", help="engine folder to write (default: engines/tensorrt-<precision>)")
    ap.add_argument("--min-batch", type=int, default=1)
    ap.add_argument("--opt-batch", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--workspace", type=int, help="builder workspace limit in MiB")
    ap.add_argument("--legacy", action="store_true", help="TensorRT 10.x: weak-typed build with builder flags")
    ap.add_argument("--dla-core", type=int, help="build for this DLA core (Jetson), GPU fallback on")
    ap.add_argument("--calibration-cache", help="TensorRT calibration cache for weak-typed INT8")
    args = ap.parse_args(argv)
    try:
        build(args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
