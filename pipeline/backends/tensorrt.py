"""TensorRT engines (NVIDIA GPUs, Jetson) built from an ONNX file whose precision is already fixed.

Two build paths, chosen by ``choose_build_path`` from the installed TensorRT version:

* strongly typed (TensorRT >= 10, the only mode in 11): the network keeps the ONNX tensor types,
  so fp16 comes from ``model.fp16.onnx`` and int8 from the Q/DQ ``model.int8.onnx``; no precision
  builder flags are set.
* weak typed (TensorRT 8.5/8.6 on JetPack 5.1/6.0, or ``--legacy`` on 10.x): ``model.fp32.onnx``
  plus the FP16/INT8 builder flags, INT8 ranges read from our calibration written as a TensorRT
  calibration cache (no calibrator runs on the device).

The pure functions (profile, build path, flags, compatibility) carry the version logic and are
tested on CPU; ``tensorrt`` and polygraphy's TensorRT loaders are imported inside the methods.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rexport.core.env import cuda_gpu
from rexport.core.errors import InputError, MissingDependency
from rexport.pipeline.backends import Backend, BuildSettings, register
from rexport.pipeline.backends.sidecar import make_sidecar, read_sidecar, verify_engine_files, version_tuple
from rexport.pipeline.runners import Runner

PLAN_FILE = "model.plan"
STRONGLY_TYPED, WEAK_TYPED = "strongly_typed", "weak_typed"
PRECISIONS = ("fp32", "fp16", "int8")
AMPERE = (8, 0)                 # HardwareCompatibilityLevel.AMPERE_PLUS: compute capability 8.0 and newer
WHAT_TO_DO = ("install 'rexport[tensorrt]' (JetPack: apt's python3-libnvinfer and a venv made with "
              "--system-site-packages) on a machine with an NVIDIA GPU, or use --backend openvino")

# TensorRT's calibration-cache header "TRT-<version>-<algorithm>" names the calibrator that wrote it;
# TensorRT only accepts a cache read by a calibrator of the same algorithm, so we pick the base
# class from the header. (IInt8*Calibrator: deprecated in 10.1, removed in 11.0.)
CALIBRATOR_FOR_ALGORITHM = {
    "EntropyCalibration2": "IInt8EntropyCalibrator2",
    "EntropyCalibration": "IInt8EntropyCalibrator",
    "MinMaxCalibration": "IInt8MinMaxCalibrator",
}


def rebuild_advice(precision: str) -> str:
    return f"rebuild with 'rexport build --backend tensorrt --precision {precision}' on this machine"


# -- pure, CPU-testable decisions ---------------------------------------------------------------


def profile_shapes(input_shape_chw, settings: BuildSettings) -> dict[str, list[int]]:
    """The optimization profile of the dynamic batch axis: NCHW shapes for min, opt and max."""
    chw = [int(d) for d in input_shape_chw]
    if len(chw) != 3 or any(d < 1 for d in chw):
        raise InputError(f"bad input shape {input_shape_chw!r}: TensorRT engines need a fixed C,H,W",
                         "re-export the model ('rexport export')")
    return {"min": [settings.min_batch, *chw], "opt": [settings.opt_batch, *chw], "max": [settings.max_batch, *chw]}


def _major_minor(trt_version: str) -> tuple[int, int]:
    v = version_tuple(trt_version)
    if not v:
        raise InputError(f"cannot read the TensorRT version {trt_version!r}", "reinstall tensorrt")
    return v[0], (v[1] if len(v) > 1 else 0)


def choose_build_path(trt_version: str, settings: BuildSettings) -> str:
    """``strongly_typed`` or ``weak_typed`` for this TensorRT version and ``--legacy``.

    8.x has no strongly typed networks (NetworkDefinitionCreationFlag.STRONGLY_TYPED appeared in
    9.x) -> always weak. 10.x: strongly typed by default, ``--legacy`` keeps the weak path
    (deprecated since 10.12). 11.x removed BuilderFlag.FP16/INT8 and the INT8 calibrators, so
    there is no weak path left and ``--legacy`` is refused.
    """
    major, _ = _major_minor(trt_version)
    if major < 10:
        return WEAK_TYPED
    if settings.legacy:
        if major >= 11:
            raise InputError(f"--legacy is impossible with TensorRT {trt_version}: TensorRT 11 removed the "
                             "FP16/INT8 builder flags and INT8 calibrators (every network is strongly typed)",
                             "drop --legacy: the fp16 and int8 ONNX files build strongly typed")
        return WEAK_TYPED
    return STRONGLY_TYPED


def builder_flags_for(precision: str, path: str) -> list[str]:
    """Names of the trt.BuilderFlag precision flags a build sets (TF32 is always cleared)."""
    if precision not in PRECISIONS:
        raise InputError(f"tensorrt has no precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if path == STRONGLY_TYPED:
        return []   # precision comes from the tensor types in the ONNX file
    # INT8 with FP16 as well: layers without INT8 kernels run in FP16 rather than FP32 (trtexec --int8 --fp16).
    return {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]


def source_variant_for(precision: str, path: str) -> str:
    """The ONNX variant a build path compiles: itself when strongly typed, the FP32 file otherwise."""
    return precision if path == STRONGLY_TYPED else "fp32"


def source_mismatch(facts: dict, precision: str, path: str) -> str | None:
    """Why an ONNX file (``onnx_facts``) cannot give a ``precision`` engine on ``path``, or None.

    A strongly typed build runs exactly the types in the file, so a file without Q/DQ cannot make
    an int8 engine (it would silently be fp32); refuse rather than build another precision.
    """
    if path != STRONGLY_TYPED:
        return None     # weak typed: the builder flags set the precision
    if precision == "int8" and not facts["qdq"]:
        return "a strongly typed int8 engine needs the Q/DQ model (onnx/model.int8.onnx); this file has no Q/DQ nodes"
    if precision == "fp16" and not facts["fp16"]:
        return "a strongly typed fp16 engine needs the FP16 model (onnx/model.fp16.onnx); this file has no FP16 tensors"
    if precision == "fp32" and (facts["qdq"] or facts["fp16"]):
        return "a strongly typed fp32 engine needs the FP32 model; this file carries reduced-precision tensors"
    return None


def unsupported_settings(trt_version: str, settings: BuildSettings, gpu: dict | None = None) -> list[str]:
    """Build settings this TensorRT (and GPU) cannot honour; each entry says why."""
    major, minor = _major_minor(trt_version)
    problems = []
    before_86 = (major, minor) < (8, 6)
    for on, what in ((settings.version_compatible, "--version-compatible"),
                     (settings.hardware_compatible, "--hardware-compatible"),
                     (settings.builder_opt_level is not None, "--builder-opt-level")):
        if on and before_86:    # VERSION_COMPATIBLE, hardware_compatibility_level, builder_optimization_level: 8.6+
            problems.append(f"{what} needs TensorRT 8.6 or newer (this is {trt_version})")
    if settings.builder_opt_level is not None and not 0 <= settings.builder_opt_level <= 5:
        problems.append(f"--builder-opt-level {settings.builder_opt_level} is outside TensorRT's 0..5")
    if settings.hardware_compatible and gpu:
        cc = version_tuple(gpu.get("compute_capability"))
        if gpu.get("integrated"):
            problems.append("--hardware-compatible is not supported on Jetson/DRIVE (integrated) GPUs")
        elif cc and cc < AMPERE:
            problems.append(f"--hardware-compatible (AMPERE_PLUS) needs an Ampere or newer GPU to build on; "
                            f"{gpu.get('name')} has compute capability {gpu.get('compute_capability')}")
    if settings.workspace_mib is not None and settings.workspace_mib < 1:
        problems.append("--workspace must be at least 1 MiB")
    return problems


def trt_compat_problems(sidecar: dict, facts: dict) -> list[str]:
    """What stops a plan built as ``sidecar`` from running here (``facts``: tensorrt, gpu,
    compute_capability of this machine); empty when it can run."""
    precision = sidecar.get("precision", "?")
    advice = rebuild_advice(precision)
    settings = sidecar.get("build_settings") or {}
    problems = []
    if sidecar.get("backend") != "tensorrt":
        return [f"this is a {sidecar.get('backend')!r} engine, not a TensorRT plan"]

    built, here = (sidecar.get("runtime") or {}).get("tensorrt"), facts.get("tensorrt")
    if built and here:
        bv, hv = version_tuple(built), version_tuple(here)
        n = min(len(bv), len(hv))
        same = n > 0 and bv[:n] == hv[:n]        # "10.3.0" matches "10.3.0.30"
        if not same:
            # A plain plan needs the exact TensorRT it was built with. A version-compatible one
            # (VERSION_COMPATIBLE, 8.6+, with its lean runtime) runs on the same or any later TensorRT.
            if settings.get("version_compatible") and bv >= (8, 6) and hv >= bv:
                pass
            elif settings.get("version_compatible") and hv < bv:
                problems.append(f"the plan was built with TensorRT {built} (version-compatible), this machine has "
                                f"the older TensorRT {here}; a version-compatible plan only runs on the same or a "
                                f"newer TensorRT: {advice}")
            else:
                problems.append(f"the plan was built with TensorRT {built}, this machine has TensorRT {here}; "
                                f"a TensorRT plan only runs on the version that built it: {advice}")

    built_cc = (sidecar.get("device") or {}).get("compute_capability")
    here_cc = facts.get("compute_capability")
    if built_cc and here_cc and version_tuple(built_cc) != version_tuple(here_cc):
        gpu_built = (sidecar.get("device") or {}).get("name") or "its GPU"
        gpu_here = facts.get("gpu") or "this GPU"
        if settings.get("hardware_compatible"):
            # AMPERE_PLUS plans run on every GPU of compute capability 8.0 or newer.
            if version_tuple(here_cc) < AMPERE:
                problems.append(f"the plan is hardware-compatible (Ampere and newer) but {gpu_here} has compute "
                                f"capability {here_cc}: {advice}")
        else:
            problems.append(f"the plan was built for {gpu_built} (compute capability {built_cc}), this machine "
                            f"has {gpu_here} (compute capability {here_cc}); plans are specific to the GPU "
                            f"architecture unless built with --hardware-compatible: {advice}")
    return problems


# -- this machine ---------------------------------------------------------------------------------


def _import_tensorrt():
    try:
        import tensorrt as trt
    except Exception as e:   # ImportError, or OSError when libnvinfer is missing
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MissingDependency(f"tensorrt cannot be imported ({first})", WHAT_TO_DO) from None
    return trt


def onnx_facts(onnx_path: Path) -> dict:
    """Input/output names and shapes and which precisions the ONNX graph itself carries."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise InputError(f"{onnx_path} is not a readable ONNX model ({type(e).__name__})",
                         "re-run 'rexport export'") from None
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

    if len(inputs) != 1 or len(g.output) != 1:
        raise InputError(f"{onnx_path.name} has {len(inputs)} inputs and {len(g.output)} outputs; a classifier has one of each",
                         "re-run 'rexport export'")
    fp16 = onnx.TensorProto.FLOAT16
    has_fp16 = any(i.data_type == fp16 for i in g.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute) for n in g.node)
    return {"input": inputs[0].name, "input_shape": dims(inputs[0]), "output": g.output[0].name,
            "output_shape": dims(g.output[0]), "qdq": any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node),
            "fp16": has_fp16,
            "preprocess": {p.key: p.value for p in model.metadata_props}.get("rexport.preprocess")}


def _preprocess_dict(onnx_path: Path, facts: dict) -> dict:
    import json

    from rexport.core.preprocess import PreprocessSpec

    if facts["preprocess"]:
        return PreprocessSpec.from_dict(json.loads(facts["preprocess"])).to_dict()
    sibling = onnx_path.with_name("model.fp32.onnx")     # older fp16/int8 files may lack the metadata
    return PreprocessSpec.from_onnx(sibling if sibling.exists() else onnx_path).to_dict()


# -- calibration cache (weak-typed INT8 only) ------------------------------------------------------


class CacheOnlyCalibration:
    """The calibrator logic without TensorRT: hands TensorRT our cache and no data, so the ranges
    come from rexport's calibration and no calibration runs on the device. If TensorRT rejected the
    cache it would ask for batches, get none, and fail the build (never a silently uncalibrated plan)."""

    def __init__(self, cache: bytes) -> None:
        header = cache.split(b"\n", 1)[0].decode("ascii", errors="replace").strip()
        parts = header.split("-", 2)
        if len(parts) != 3 or parts[0] != "TRT" or parts[2] not in CALIBRATOR_FOR_ALGORITHM:
            raise InputError(f"not a TensorRT calibration cache (header {header[:60]!r})",
                             "re-run 'rexport quantize --precision int8' to rewrite calibration/<key>.tensorrt.cache")
        self.cache = cache
        self.algorithm = parts[2]
        self.base_class = CALIBRATOR_FOR_ALGORITHM[parts[2]]

    def get_batch_size(self) -> int:
        return 1

    def get_batch(self, names, *args):
        return None

    def read_calibration_cache(self, *args):
        return self.cache

    def write_calibration_cache(self, cache, *args) -> None:
        pass    # never overwrite the run's calibration with what TensorRT echoes back


def retag_cache(cache: bytes, version: str) -> bytes:
    """The cache with its header's version set to the running TensorRT's (``TRT-<tag>-<algorithm>``):
    TensorRT may skip a cache whose header names another version (NVIDIA/TensorRT#1378), and our
    ranges do not depend on the TensorRT version."""
    from rexport.calibration import tensorrt_version_tag

    header, sep, body = cache.partition(b"\n")
    parts = header.decode("ascii", errors="replace").strip().split("-", 2)
    if len(parts) != 3:
        return cache
    return f"TRT-{tensorrt_version_tag(version)}-{parts[2]}".encode() + sep + body


def make_cache_calibrator(trt, cache: bytes):
    """A trt.IInt8*Calibrator (of the algorithm the cache header names) that only reads ``cache``."""
    cache = retag_cache(cache, trt.__version__)
    logic = CacheOnlyCalibration(cache)
    base = getattr(trt, logic.base_class, None)
    if base is None:
        raise InputError(f"TensorRT {trt.__version__} has no {logic.base_class} (INT8 calibrators were removed in 11.0)",
                         "build the Q/DQ int8 ONNX strongly typed instead (drop --legacy)")

    class CacheCalibrator(CacheOnlyCalibration, base):
        def __init__(self) -> None:
            base.__init__(self)     # pybind trampoline: the base must be initialised explicitly
            CacheOnlyCalibration.__init__(self, cache)

    return CacheCalibrator()


def _progress_monitor(trt):
    """A trt.IProgressMonitor (TensorRT 10.0+) printing top-level build phases, or None."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class PhasePrinter(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._t0 = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self._t0[phase_name] = time.perf_counter()
                print(f"  tensorrt: {phase_name} ...", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True     # False would cancel the build

        def phase_finish(self, phase_name):
            if phase_name in self._t0:
                print(f"  tensorrt: {phase_name} done in {time.perf_counter() - self._t0.pop(phase_name):.1f} s",
                      file=sys.stderr, flush=True)

    return PhasePrinter()


# -- the backend ----------------------------------------------------------------------------------


class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = PRECISIONS

    def unavailable_reason(self) -> str | None:
        missing, _ = self._missing()
        return ", ".join(missing) or None

    @staticmethod
    def _missing() -> tuple[list[str], str | None]:
        """What this machine lacks for TensorRT (short, for tables) and why the GPU check failed."""
        missing, detail = [], None
        gpu, why = cuda_gpu()
        if gpu is None:
            missing.append("no CUDA device")
            detail = why
        if importlib.util.find_spec("tensorrt") is None:
            missing.append("tensorrt not installed")
        return missing, detail

    def missing_dependency(self) -> MissingDependency | None:
        """The error a stage raises when TensorRT was asked for and cannot run here."""
        missing, detail = self._missing()
        if not missing:
            return None
        return MissingDependency(f"cannot build or run TensorRT engines here: {', '.join(missing)}"
                                 + (f" ({detail})" if detail else ""), WHAT_TO_DO)

    def source_variant(self, precision: str, settings: BuildSettings | None = None) -> str:
        version = self.tensorrt_version()
        if version is None:
            return precision
        return source_variant_for(precision, choose_build_path(version, settings or BuildSettings()))

    @staticmethod
    def tensorrt_version() -> str | None:
        """The importable TensorRT's version (pip or JetPack's apt bindings, which carry no dist-info)."""
        if importlib.util.find_spec("tensorrt") is None:
            return None
        return _import_tensorrt().__version__

    # -- build -------------------------------------------------------------------------------------

    def build(self, onnx_path: Path, dest: Path, precision: str, settings: BuildSettings, *,
              calibration_cache: Path | None = None, progress: bool = True) -> dict:
        onnx_path, dest = Path(onnx_path), Path(dest)
        err = self.missing_dependency()
        if err is not None:
            raise err
        trt = _import_tensorrt()
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER

        version = trt.__version__
        path = choose_build_path(version, settings)
        flags = builder_flags_for(precision, path)
        gpu, _ = cuda_gpu()
        problems = unsupported_settings(version, settings, gpu)
        if problems:
            raise InputError("; ".join(problems), "change the build settings")
        facts = onnx_facts(onnx_path)
        wrong = source_mismatch(facts, precision, path)
        if wrong:
            raise InputError(f"{onnx_path.name}: {wrong}", f"run 'rexport quantize --precision {precision}' first"
                             if precision != "fp32" else "pass onnx/model.fp32.onnx")

        calibrator, calib_info = None, None
        if "INT8" in flags and not facts["qdq"]:
            # Weak typed + a plain FP32 graph: the ranges come from our calibration cache.
            if calibration_cache is None or not Path(calibration_cache).is_file():
                raise InputError("a weak-typed (TensorRT 8.x / --legacy) INT8 build needs the TensorRT calibration "
                                 "cache calibration/<key>.tensorrt.cache", "run 'rexport quantize --precision int8' first")
            cache = Path(calibration_cache).read_bytes()
            calibrator = make_cache_calibrator(trt, cache)
            calib_info = {"file": Path(calibration_cache).name, "algorithm": calibrator.algorithm}

        shapes = profile_shapes(facts["input_shape"][1:], settings)
        fixed = facts["input_shape"][0] if facts["input_shape"] else -1
        if fixed > 0:   # exported with a fixed batch: the profile can only be that batch
            if not settings.min_batch <= fixed <= settings.max_batch:
                raise InputError(f"{onnx_path.name} has a fixed batch of {fixed}, outside --min-batch..--max-batch",
                                 "re-export with --batch dynamic, or build with a batch range that contains it")
            shapes = {k: [fixed, *v[1:]] for k, v in shapes.items()}
        profile = Profile().add(facts["input"], min=shapes["min"], opt=shapes["opt"], max=shapes["max"])

        kwargs = {"profiles": [profile], "tf32": False, "fp16": "FP16" in flags, "int8": "INT8" in flags,
                  "calibrator": calibrator}
        if settings.workspace_mib:
            # set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes): 8.4+ (max_workspace_size removed in 10.0).
            kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(settings.workspace_mib) << 20}
        if settings.timing_cache:
            kwargs["load_timing_cache"] = settings.timing_cache     # a missing file starts an empty cache
        if settings.builder_opt_level is not None:
            kwargs["builder_optimization_level"] = settings.builder_opt_level     # 8.6+, default 3
        if settings.version_compatible:
            kwargs["version_compatible"] = True     # BuilderFlag.VERSION_COMPATIBLE, 8.6+; plan embeds a lean runtime
        if settings.hardware_compatible:
            kwargs["hardware_compatibility_level"] = trt.HardwareCompatibilityLevel.AMPERE_PLUS   # 8.6+
        monitor = _progress_monitor(trt) if progress else None
        if monitor is not None:
            kwargs["progress_monitor"] = monitor    # IProgressMonitor, 10.0+
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            create_config = CreateConfig(**self._supported_kwargs(CreateConfig, kwargs))

        def config(builder, network):
            cfg = create_config(builder, network)
            if settings.dla_core is not None:
                # DLA (Jetson Xavier/Orin): default_device_type + DLA_core + GPU_FALLBACK for the layers
                # DLA cannot run. TensorRT 11 supports DLA only on some platforms (11.4.1: AGX Orin with
                # JetPack 7.2.2+); there its precision comes from the tensor types, as here.
                if builder.num_DLA_cores <= settings.dla_core:
                    raise InputError(f"DLA core {settings.dla_core} requested, this device has {builder.num_DLA_cores}",
                                     "drop --dla-core or pick an existing core")
                cfg.default_device_type = trt.DeviceType.DLA
                cfg.DLA_core = settings.dla_core
                cfg.set_flag(trt.BuilderFlag.GPU_FALLBACK)
            return cfg

        network = self._network_loader(trt, onnx_path, strongly_typed=(path == STRONGLY_TYPED))
        t0 = time.perf_counter()
        try:
            with G_LOGGER.verbosity(G_LOGGER.WARNING):
                plan = EngineBytesFromNetwork(network, config=config, save_timing_cache=settings.timing_cache)()
        except PolygraphyException as e:
            first = (str(e).strip().splitlines() or ["build failed"])[0][:300]
            raise InputError(f"TensorRT {version} could not build {onnx_path.name} ({path}): {first}",
                             "see the TensorRT log above; try --legacy on TensorRT 10 or another --precision") from None
        build_seconds = time.perf_counter() - t0
        (dest / PLAN_FILE).write_bytes(bytes(plan))

        build_record = {**asdict(settings), "build_path": path, "builder_flags": flags, "tf32": False,
                        "hardware_compatibility_level": "AMPERE_PLUS" if settings.hardware_compatible else None,
                        "calibration_cache": calib_info, "explicit_quantization": facts["qdq"]}
        return make_sidecar(
            backend=self.name, precision=precision, engine_dir=dest, engine_files=[PLAN_FILE],
            source_onnx=onnx_path, source_variant=_variant_of(onnx_path),
            runtime={"tensorrt": version, "cuda": gpu["cuda_driver"], "polygraphy": _polygraphy_version()},
            device={"kind": "gpu", "name": gpu["name"], "compute_capability": gpu["compute_capability"],
                    "integrated": gpu["integrated"], "dla_core": settings.dla_core},
            io={"inputs": [{"name": facts["input"], "shape": [-1, *shapes["opt"][1:]], "dtype": "float32"}],
                "outputs": [{"name": facts["output"], "shape": [-1, *facts["output_shape"][1:]], "dtype": "float32"}]},
            profile={"input": facts["input"], **shapes},
            build_settings=build_record,
            load_settings={"cuda_graphs": False, "optimization_profile": 0},
            build_seconds=build_seconds, preprocess=_preprocess_dict(onnx_path, facts))

    @staticmethod
    def _network_loader(trt, onnx_path: Path, *, strongly_typed: bool):
        import inspect

        from polygraphy.backend.trt import NetworkFromOnnxPath

        if not strongly_typed or "strongly_typed" in inspect.signature(NetworkFromOnnxPath.__init__).parameters:
            # NetworkFromOnnxPath(strongly_typed=...) in polygraphy 0.49+; on TensorRT < 10 polygraphy
            # also sets EXPLICIT_BATCH (required on 8.x, deprecated and ignored on 10.x).
            return NetworkFromOnnxPath(str(onnx_path), strongly_typed=True) if strongly_typed \
                else NetworkFromOnnxPath(str(onnx_path))

        def create():   # older polygraphy: the same network by hand
            from polygraphy.backend.trt import get_trt_logger

            builder = trt.Builder(get_trt_logger())
            # STRONGLY_TYPED: 9.x/10.x opt-in; deprecated and ignored (always on) in 11.x.
            network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
            parser = trt.OnnxParser(network, get_trt_logger())
            if not parser.parse_from_file(str(onnx_path)):
                errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
                raise InputError(f"TensorRT cannot parse {onnx_path.name}: {'; '.join(errors)[:300]}",
                                 "re-export with a lower --opset")
            return builder, network, parser

        return create

    @staticmethod
    def _supported_kwargs(loader, kwargs: dict) -> dict:
        """Drop the optional ones this polygraphy lacks; refuse when a requested setting is unsupported."""
        import inspect

        accepted = inspect.signature(loader.__init__).parameters
        out = {}
        for k, v in kwargs.items():
            if k in accepted:
                out[k] = v
            elif k == "progress_monitor" or v is None or v is False:
                continue
            else:
                raise InputError(f"the installed polygraphy has no CreateConfig({k}=...)", "pip install -U polygraphy")
        return out

    # -- load --------------------------------------------------------------------------------------

    def load(self, engine_dir: Path, *, threads: int | None = None) -> "TensorRTRunner":
        engine_dir = Path(engine_dir)
        sidecar = read_sidecar(engine_dir)
        verify_engine_files(engine_dir, sidecar)
        err = self.missing_dependency()
        if err is not None:
            raise err
        trt = _import_tensorrt()
        gpu, _ = cuda_gpu()
        facts = {"tensorrt": trt.__version__, "gpu": gpu["name"], "compute_capability": gpu["compute_capability"]}
        problems = trt_compat_problems(sidecar, facts)
        if problems:    # checked before deserializing: TensorRT's own refusal is a cryptic magic-tag error
            raise InputError(f"cannot load {engine_dir}: " + "; ".join(problems))
        return TensorRTRunner(engine_dir / PLAN_FILE, sidecar, name=engine_dir.name)


def _variant_of(onnx_path: Path) -> str:
    parts = onnx_path.name.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "model" and parts[1] in PRECISIONS else onnx_path.stem


def _polygraphy_version() -> str | None:
    from rexport.core.env import package_version

    return package_version("polygraphy")


class TensorRTRunner(Runner):
    """A TensorRT plan through polygraphy's TrtRunner; float32 logits out."""

    def __init__(self, plan_path: Path, sidecar: dict, *, name: str = "tensorrt") -> None:
        super().__init__()
        self.plan_path = Path(plan_path)
        self.sidecar = sidecar
        self.name = name
        self._runner = None

    def _activate(self) -> None:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        # EngineFromBytes sets runtime.engine_host_code_allowed, which version-compatible plans need.
        self._runner = TrtRunner(EngineFromBytes(self.plan_path.read_bytes()), name=self.name)
        self._runner.activate()
        self.input_name = self.sidecar["io"]["inputs"][0]["name"]
        self.output_name = self.sidecar["io"]["outputs"][0]["name"]
        self.settings = {"runtime": "tensorrt", "tensorrt": self.sidecar["runtime"].get("tensorrt"),
                         "device": self.sidecar["device"].get("name"), "profile": self.sidecar.get("profile"),
                         **self.sidecar.get("load_settings", {})}

    def _deactivate(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = self._runner.infer({self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[self.output_name]
        return np.array(out, dtype=np.float32, copy=True)     # TrtRunner reuses its output buffers


register(TensorRTBackend())
