"""Version rules, pure and tested on the CPU: which build path a TensorRT version takes, its precision
flags and source file, what it (and the device) cannot honour, DLA per version, and whether a plan
built elsewhere runs here. Version notes are NVIDIA's Python API docs for 8.5/8.6/10.x/11.x."""
from __future__ import annotations

from .spec import STRONGLY_TYPED, WEAK_TYPED, BuildSpec, TrtError

AMPERE = (8, 0)             # HardwareCompatibilityLevel.AMPERE_PLUS: compute capability 8.0 and newer
JETPACK_FOR_DLA_ON_11 = (7, 2, 2)


def version_tuple(version) -> tuple[int, ...]:
    """Leading numeric components: '10.3.0.30' -> (10, 3, 0, 30), '8.6.2.3-1+cuda12.2' -> (8, 6, 2, 3)."""
    import re

    m = re.match(r"\d+(?:\.\d+)*", str(version or "").strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def major_minor(version: str) -> tuple[int, int]:
    v = version_tuple(version)
    if not v:
        raise TrtError(f"cannot read the TensorRT version {version!r}", "reinstall tensorrt")
    return v[0], (v[1] if len(v) > 1 else 0)


def choose_build_path(version: str, legacy: bool) -> str:
    """8.x: weak typed (STRONGLY_TYPED came in 9.x); 10.x: strongly typed unless ``legacy``;
    11.x: strongly typed only (it removed BuilderFlag.FP16/INT8 and the INT8 calibrators)."""
    major, _ = major_minor(version)
    if major < 10:
        return WEAK_TYPED
    if legacy:
        if major >= 11:
            raise TrtError(f"--legacy is impossible with TensorRT {version}: TensorRT 11 removed the FP16/INT8 "
                           "builder flags and INT8 calibrators (every network is strongly typed)",
                           "drop --legacy: the fp16 and int8 ONNX files build strongly typed")
        return WEAK_TYPED
    return STRONGLY_TYPED


def builder_flags_for(precision: str, path: str, int8_float: str = "fp16") -> list[str]:
    """trt.BuilderFlag precision flags of a build. INT8 adds FP16 only when the file's float parts are FP16."""
    if path == STRONGLY_TYPED:
        return []
    return {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"] if int8_float == "fp16" else ["INT8"]}[precision]


def source_variant_for(precision: str, path: str) -> str:
    """The ONNX variant a build compiles: the precision's own file when strongly typed, FP32 otherwise."""
    return precision if path == STRONGLY_TYPED else "fp32"


def source_mismatch(facts: dict, precision: str, path: str) -> str | None:
    """Why a file with ``facts`` ({"qdq", "fp16"}) cannot make a ``precision`` engine on ``path``, or None:
    a strongly typed engine runs exactly the file's types, so a wrong file would silently change precision."""
    if path != STRONGLY_TYPED:
        return None
    if precision == "int8" and not facts["qdq"]:
        return "a strongly typed int8 engine needs the Q/DQ model (model.int8.onnx); this file has no Q/DQ nodes"
    if precision == "fp16" and not facts["fp16"]:
        return "a strongly typed fp16 engine needs the FP16 model (model.fp16.onnx); this file has no FP16 tensors"
    if precision == "fp32" and (facts["qdq"] or facts["fp16"]):
        return "a strongly typed fp32 engine needs the FP32 model; this file carries reduced-precision tensors"
    return None


def dla_problems(version: str, device: dict, core: int, precision: str, path: str) -> list[str]:
    """Why DLA core ``core`` cannot work with this TensorRT on ``device`` (facts: integrated, name,
    board, jetpack, platform), following NVIDIA's notes per version; empty when it can."""
    v = version_tuple(version)
    name = device.get("board") or device.get("name") or "this GPU"
    if core < 0:
        return [f"DLA core {core} does not exist"]
    if (10, 8) <= v < (11,):
        return [f"TensorRT {version} has no DLA: 10.7 was the last 10.x release with DLA (JetPack 6.x ships 10.3)"]
    if (11,) <= v < (11, 4):
        return [f"TensorRT {version} has no DLA: DLA was unavailable in TensorRT 11.0 through 11.3"]
    if (11, 4) <= v < (11, 4, 1):
        if device.get("platform") != "windows-arm64":
            return [f"TensorRT {version} supports DLA only on Windows on ARM"]
        return []
    if not device.get("integrated"):
        return [f"DLA exists only on Jetson/DRIVE boards; {name} is a discrete GPU"]
    problems = []
    if v >= (11, 4, 1):
        if "agx orin" not in str(device.get("board") or "").lower():
            problems.append(f"TensorRT {version} supports DLA only on Jetson AGX Orin; this is {name}")
        jp = version_tuple(device.get("jetpack"))
        if not jp:
            problems.append(f"TensorRT {version} supports DLA only with JetPack 7.2.2 or later, and the JetPack "
                            "version of this board cannot be read (dpkg package nvidia-jetpack)")
        elif jp < JETPACK_FOR_DLA_ON_11:
            problems.append(f"TensorRT {version} supports DLA only with JetPack 7.2.2 or later; this is JetPack "
                            f"{device.get('jetpack')}")
    if path == WEAK_TYPED and precision == "fp32":
        problems.append("DLA runs FP16 and INT8 only; build --precision fp16 or int8 for DLA")
    return problems


def unsupported_settings(version: str, spec: BuildSpec, device: dict | None = None) -> list[str]:
    """Settings this TensorRT (and device) cannot honour, each with why; a build refuses rather than drop them."""
    v = major_minor(version)
    device = device or {}
    problems = []
    for on, what in ((spec.version_compatible, "version compatibility"),
                     (spec.hardware_compatible, "hardware compatibility"),
                     (spec.builder_opt_level is not None, "the builder optimization level")):
        if on and v < (8, 6):   # VERSION_COMPATIBLE, hardware_compatibility_level, builder_optimization_level
            problems.append(f"{what} needs TensorRT 8.6 or newer (this is {version})")
    if v < (8, 5):
        problems.append(f"TensorRT {version} is too old: rexport needs 8.5 or newer (JetPack 5.1)")
    if spec.builder_opt_level is not None and not 0 <= spec.builder_opt_level <= 5:
        problems.append(f"builder optimization level {spec.builder_opt_level} is outside TensorRT's 0..5")
    if spec.workspace_mib is not None and spec.workspace_mib < 1:
        problems.append("the workspace limit must be at least 1 MiB")
    if spec.hardware_compatible and device:
        cc = version_tuple(device.get("compute_capability"))
        if device.get("integrated"):
            problems.append("hardware compatibility is not supported on Jetson/DRIVE (integrated) GPUs")
        elif cc and cc < AMPERE:
            problems.append(f"hardware compatibility (AMPERE_PLUS) needs an Ampere or newer GPU to build on; "
                            f"{device.get('name')} has compute capability {device.get('compute_capability')}")
    if spec.dla_core is not None:
        path = choose_build_path(version, spec.legacy)
        problems += dla_problems(version, device, spec.dla_core, spec.precision, path)
    return problems


def compat_problems(sidecar: dict, here: dict) -> list[str]:
    """What stops the plan of ``sidecar`` from running here (``here``: tensorrt, gpu, compute_capability)."""
    if sidecar.get("backend") != "tensorrt":
        return [f"this is a {sidecar.get('backend')!r} engine, not a TensorRT plan"]
    advice = f"rebuild with 'rexport build --backend tensorrt --precision {sidecar.get('precision', '?')}' " \
             "(or build_engine.py) on this machine"
    settings = sidecar.get("build_settings") or {}
    problems = []
    built, now = (sidecar.get("runtime") or {}).get("tensorrt"), here.get("tensorrt")
    if built and now:
        bv, hv = version_tuple(built), version_tuple(now)
        n = min(len(bv), len(hv))
        if not (n and bv[:n] == hv[:n]):     # "10.3.0" matches "10.3.0.30"
            if settings.get("version_compatible") and bv >= (8, 6) and hv >= bv:
                pass                          # VERSION_COMPATIBLE plans run on the same or a later TensorRT
            elif settings.get("version_compatible"):
                problems.append(f"the plan was built with TensorRT {built} (version-compatible), this machine has "
                                f"the older TensorRT {now}; such a plan only runs on the same or a newer TensorRT: "
                                f"{advice}")
            else:
                problems.append(f"the plan was built with TensorRT {built}, this machine has TensorRT {now}; a "
                                f"TensorRT plan only runs on the version that built it: {advice}")
    built_cc, here_cc = (sidecar.get("device") or {}).get("compute_capability"), here.get("compute_capability")
    if built_cc and here_cc and version_tuple(built_cc) != version_tuple(here_cc):
        gpu_built = (sidecar.get("device") or {}).get("name") or "its GPU"
        if settings.get("hardware_compatible"):
            if version_tuple(here_cc) < AMPERE:
                problems.append(f"the plan is hardware-compatible (Ampere and newer) but {here.get('gpu')} has "
                                f"compute capability {here_cc}: {advice}")
        else:
            problems.append(f"the plan was built for {gpu_built} (compute capability {built_cc}), this machine has "
                            f"{here.get('gpu') or 'this GPU'} (compute capability {here_cc}); plans are specific to "
                            f"the GPU architecture unless built hardware-compatible: {advice}")
    return problems


def version_tag(version: str) -> int:
    """'8.6.1' -> 8601, '10.3.0' -> 100300 (NV_TENSORRT_VERSION, the number in a cache header)."""
    major, minor, patch = (list(version_tuple(version)[:3]) + [0, 0, 0])[:3]
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch
