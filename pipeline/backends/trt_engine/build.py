"""Build a plan: network, builder config, optimisation profile, timing cache, DLA, and on the weak-typed
path the calibration and float-layer constraints (``legacy``). Every requested setting is applied or
refused, and the record says what was applied. TensorRT is called directly, not through polygraphy's
loaders, because those hide which settings were really applied (they dropped ``tf32=False``)."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .device import import_tensorrt
from .legacy import apply_calibration, float_parts, intent_summary
from .spec import STRONGLY_TYPED, BuildSpec, TrtError
from .versions import (builder_flags_for, choose_build_path, source_mismatch, source_variant_for,
                       unsupported_settings, version_tuple)


@dataclass
class BuildResult:
    plan: bytes
    version: str
    path: str
    io: dict
    profile: dict
    record: dict        # what was really applied: the sidecar's build_settings
    seconds: float


def _network_facts(trt, network) -> dict:
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    qdq = any(layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE) for layer in layers)
    fp16 = any(layer.get_output(j).dtype == trt.DataType.HALF for layer in layers for j in range(layer.num_outputs))
    return {"qdq": qdq, "fp16": fp16, "layers": layers}


def _parse(trt, builder, logger, onnx_path: Path, path: str, version: str):
    if path == STRONGLY_TYPED:      # 10.x: opt-in flag; 11.x: deprecated and ignored (always strongly typed)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif version_tuple(version) < (10,):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)   # required for ONNX on 8.x
    else:
        flags = 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtError(f"TensorRT {version} cannot parse {onnx_path.name}: {errors[:300]}",
                       "re-export with another --opset")
    return network, parser




def profile_shapes(input_shape: list[int], spec: BuildSpec) -> dict[str, list[int]]:
    """min/opt/max NCHW shapes of the optimisation profile; a file with a fixed batch allows only that batch."""
    chw = [int(d) for d in input_shape[1:]]
    if len(chw) != 3 or any(d < 1 for d in chw):
        raise TrtError(f"bad input shape {input_shape!r}: TensorRT engines need a fixed C,H,W",
                       "re-export the model ('rexport export')")
    fixed = int(input_shape[0]) if input_shape else -1
    if fixed > 0:
        if not spec.min_batch <= fixed <= spec.max_batch:
            raise TrtError(f"the model has a fixed batch of {fixed}, outside the batch range "
                           f"{spec.min_batch}..{spec.max_batch}", "re-export with a dynamic batch, or change the range")
        return {k: [fixed, *chw] for k in ("min", "opt", "max")}
    return {"min": [spec.min_batch, *chw], "opt": [spec.opt_batch, *chw], "max": [spec.max_batch, *chw]}


def _progress_monitor(trt, log):
    """A trt.IProgressMonitor (10.0+) printing top-level build phases, or None."""
    if log is None or not hasattr(trt, "IProgressMonitor"):
        return None

    class PhasePrinter(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.t0 = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.t0[phase_name] = time.perf_counter()
                log(f"  tensorrt: {phase_name} ...")

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            if phase_name in self.t0:
                log(f"  tensorrt: {phase_name} done in {time.perf_counter() - self.t0.pop(phase_name):.1f} s")

    return PhasePrinter()

def build_engine(onnx_path, spec: BuildSpec, device: dict, *, calibration_cache: bytes | None = None,
                 cache_name: str | None = None, intent_doc: dict | None = None, log=None) -> BuildResult:
    """Build a plan from ``onnx_path``; every requested setting is applied or refused, and the record
    says what was applied. ``device``: cuda_device()'s facts; ``intent_doc``: read_layer_intent()'s
    (weak-typed INT8); ``log``: a print-like callable or None."""
    onnx_path = Path(onnx_path)
    trt = import_tensorrt()
    version = trt.__version__
    path = choose_build_path(version, spec.legacy)
    problems = unsupported_settings(version, spec, device)
    if problems:
        raise TrtError("; ".join(problems), "change the build settings")
    floats = float_parts(spec, intent_doc)
    flags = builder_flags_for(spec.precision, path, floats)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, path, version)
    facts = _network_facts(trt, network)
    wrong = source_mismatch(facts, spec.precision, path)
    if wrong:
        raise TrtError(f"{onnx_path.name}: {wrong}", f"pass model.{source_variant_for(spec.precision, path)}.onnx")
    inp, out = network.get_input(0), network.get_output(0)
    shapes = profile_shapes(list(inp.shape), spec)

    config = builder.create_builder_config()
    applied: dict = {"build_path": path, "builder_flags": flags, "explicit_quantization": facts["qdq"]}
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)     # FP32 layers stay exact FP32
        applied["tf32"] = False
    else:
        applied["tf32"] = None                      # no such flag in this TensorRT: nothing to clear
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if spec.workspace_mib:      # set_memory_pool_limit: 8.4+ (max_workspace_size was removed in 10.0)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mib) << 20)
    applied["workspace_mib"] = spec.workspace_mib
    if spec.builder_opt_level is not None:
        config.builder_optimization_level = int(spec.builder_opt_level)   # 8.6+, default 3
    applied["builder_opt_level"] = spec.builder_opt_level
    if spec.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)   # 8.6+: the plan embeds a lean runtime
    applied["version_compatible"] = spec.version_compatible
    if spec.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS    # 8.6+
    applied["hardware_compatibility_level"] = "AMPERE_PLUS" if spec.hardware_compatible else None
    timing = None
    if spec.timing_cache:       # ITimingCache: a missing file starts an empty cache, saved after the build
        data = Path(spec.timing_cache).read_bytes() if Path(spec.timing_cache).is_file() else b""
        timing = config.create_timing_cache(data)
        config.set_timing_cache(timing, ignore_mismatch=False)
    applied["timing_cache"] = spec.timing_cache

    applied["calibration_cache"], applied["layer_intent"] = None, None
    alive = []                  # what TensorRT holds by pointer until the build is done (the calibrator)
    if "INT8" in flags and not facts["qdq"]:
        legacy, calibrator = apply_calibration(trt, config, profile, facts["layers"], cache=calibration_cache,
                                               cache_name=cache_name, intent_doc=intent_doc, floats=floats,
                                               version=version, log=log)
        applied.update(legacy)
        alive.append(calibrator)
    elif spec.precision == "int8" and intent_doc is not None:     # strongly typed: the file's types are the intent
        applied["layer_intent"] = {**intent_summary(intent_doc["layers"]), "source": intent_doc.get("file"),
                                   "pinned": 0, "unmatched": [], "constraint": "tensor types of the file"}
    applied["int8_float"] = floats if spec.precision == "int8" else None
    if spec.dla_core is not None:
        if builder.num_DLA_cores <= spec.dla_core:
            raise TrtError(f"DLA core {spec.dla_core} requested, this device has {builder.num_DLA_cores}",
                           "drop --dla-core or pick an existing core")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(spec.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    applied["dla_core"] = spec.dla_core
    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise TrtError(f"TensorRT {version} could not build {onnx_path.name} ({path})",
                       "see the TensorRT log above; try --legacy on TensorRT 10 or another precision")
    if timing is not None:
        _write_atomic(Path(spec.timing_cache), bytes(config.get_timing_cache().serialize()))
    record = {**asdict(spec), **applied}
    io = {"inputs": [{"name": inp.name, "shape": [-1, *shapes["opt"][1:]], "dtype": "float32"}],
          "outputs": [{"name": out.name, "shape": [-1, *[int(d) for d in out.shape[1:]]], "dtype": "float32"}]}
    return BuildResult(plan=bytes(plan), version=version, path=path, io=io, profile={"input": inp.name, **shapes},
                       record=record, seconds=seconds)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
