"""The weak-typed INT8 path (TensorRT 8.x, or ``legacy`` on 10.x): our calibration handed to TensorRT as
its calibration cache, and the INT8 file's per-layer intent. A layer whose input has no entry in the
cache (the cache lists only the tensors the Q/DQ file quantizes) is pinned to the float precision of
the file, so 8.x builds what 10/11 build."""
from __future__ import annotations

from pathlib import Path

from .spec import BuildSpec, TrtError
from .versions import version_tag

LAYERS_SUFFIX = ".layers.json"      # the file's per-layer intent beside its cache (calibration/tensorrt_cache.py)
# Weighted layers whose input precision the Q/DQ file decides (what the per-layer intent is about).
COMPUTE_LAYERS = ("CONVOLUTION", "DECONVOLUTION", "FULLY_CONNECTED", "MATRIX_MULTIPLY")
# A cache header "TRT-<version>-<algorithm>" names the calibrator that may read it.
CALIBRATOR_FOR_ALGORITHM = {"EntropyCalibration2": "IInt8EntropyCalibrator2",
                            "EntropyCalibration": "IInt8EntropyCalibrator",
                            "MinMaxCalibration": "IInt8MinMaxCalibrator"}


def parse_cache_header(cache: bytes) -> tuple[str, str]:
    """(version tag, algorithm) of a TensorRT calibration cache; TrtError when it is not one."""
    header = cache.split(b"\n", 1)[0].decode("ascii", errors="replace").strip()
    parts = header.split("-", 2)
    if len(parts) != 3 or parts[0] != "TRT" or parts[2] not in CALIBRATOR_FOR_ALGORITHM:
        raise TrtError(f"not a TensorRT calibration cache (header {header[:60]!r})",
                       "re-run 'rexport quantize --precision int8' to rewrite the cache")
    return parts[1], parts[2]


def retag_cache(cache: bytes, version: str) -> bytes:
    """The cache with its header naming the running TensorRT: TensorRT may skip a cache of another version
    (NVIDIA/TensorRT#1378), and our ranges do not depend on the version."""
    _, algorithm = parse_cache_header(cache)
    _, sep, body = cache.partition(b"\n")
    return f"TRT-{version_tag(version)}-{algorithm}".encode() + sep + body


def cache_tensor_names(cache: bytes) -> set[str]:
    """The tensors a calibration cache gives a scale to (its 'name: hexscale' lines)."""
    parse_cache_header(cache)
    names = set()
    for line in cache.decode("utf-8", errors="replace").splitlines()[1:]:
        name, sep, _ = line.rstrip().rpartition(": ")
        if sep:
            names.add(name)
    return names


def intent_from_cache(layers, cached: set[str], float_precision: str) -> dict[str, str]:
    """Per weighted layer, 'int8' when its data input has a scale in the cache, else ``float_precision``:
    the fallback when the file's own intent (``<cache>.layers.json``) is missing. ``layers``: (name, kind,
    first input name)."""
    return {name: ("int8" if first_input in cached else float_precision)
            for name, kind, first_input in layers if kind in COMPUTE_LAYERS}


def match_intent(layer_names: list[str], intent: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Network layer -> intended precision, for the ONNX node names in ``intent`` (TensorRT's parser names a
    layer after its node, a node split in several layers as '<node>_<n>'), and the nodes no layer matched."""
    matched, unmatched = {}, []
    for node, precision in intent.items():
        hits = [n for n in layer_names if n == node or n.startswith(node + "_")]
        matched.update({n: precision for n in hits})
        if not hits:
            unmatched.append(node)
    return matched, unmatched


def float_parts(spec: BuildSpec, intent_doc: dict | None) -> str:
    """The float precision of an INT8 build: asked for, else the file's, else fp16 (INT8+FP16)."""
    return spec.int8_float or (intent_doc or {}).get("int8_float") or "fp16"


def read_layer_intent(cache_path) -> dict | None:
    """The per-layer intent written beside a calibration cache, or None when there is none."""
    import json

    p = Path(str(cache_path) + LAYERS_SUFFIX)
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        raise TrtError(f"{p} is corrupt (not JSON)", "re-run 'rexport quantize --precision int8 --force'") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), dict):
        raise TrtError(f"{p} has no 'layers' table", "re-run 'rexport quantize --precision int8 --force'")
    return doc


def intent_summary(intent: dict[str, str]) -> dict:
    counts: dict[str, int] = {}
    for p in intent.values():
        counts[p] = counts.get(p, 0) + 1
    return {"layers": intent, "counts": counts}



def _pin_float_layers(trt, config, layers, intent: dict[str, str]) -> list[str]:
    """Pin the layers the file keeps in float to its float precision (OBEY_PRECISION_CONSTRAINTS, 8.2+)."""
    dtype = {"fp16": trt.float16, "fp32": trt.float32}
    pinned = []
    for layer in layers:
        p = intent.get(layer.name)
        if p in dtype and layer.type.name in (*COMPUTE_LAYERS, "ELEMENTWISE"):   # not the weights' Constant layers
            layer.precision = dtype[p]
            for j in range(layer.num_outputs):
                layer.set_output_type(j, dtype[p])
            pinned.append(layer.name)
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return pinned


def make_cache_calibrator(trt, cache: bytes):
    """A trt.IInt8*Calibrator (of the cache's algorithm) that only hands TensorRT ``cache``: get_batch returns
    None, so a rejected cache fails the build instead of giving an uncalibrated plan."""
    _, algorithm = parse_cache_header(cache)
    base = getattr(trt, CALIBRATOR_FOR_ALGORITHM[algorithm], None)
    if base is None:     # removed in 11.0
        raise TrtError(f"TensorRT {trt.__version__} has no {CALIBRATOR_FOR_ALGORITHM[algorithm]}",
                       "build the Q/DQ ONNX strongly typed instead (drop --legacy)")

    class CacheCalibrator(base):
        def __init__(self) -> None:
            base.__init__(self)     # pybind trampoline: the base must be initialised explicitly
            self.algorithm = algorithm

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names, *args):
            return None

        def read_calibration_cache(self, *args):
            return cache

        def write_calibration_cache(self, data, *args) -> None:
            pass    # never overwrite the run's calibration with what TensorRT echoes back

    return CacheCalibrator()


def apply_calibration(trt, config, profile, layers, *, cache: bytes | None, cache_name: str | None,
                      intent_doc: dict | None, floats: str, version: str, log=None):
    """Hand ``cache`` to the build as its INT8 calibration and pin the layers the file keeps in float.
    Returns what was applied (for the record) and the calibrator, which the caller must keep alive
    until the build is done (TensorRT holds it by pointer)."""
    if cache is None:
        raise TrtError("a weak-typed (TensorRT 8.x / --legacy) INT8 build needs the TensorRT calibration cache "
                       "written for the INT8 file", "run 'rexport quantize --precision int8' first")
    cache = retag_cache(cache, version)
    calibrator = make_cache_calibrator(trt, cache)
    config.int8_calibrator = calibrator                   # deprecated in 10.1, removed in 11.0
    if hasattr(config, "set_calibration_profile"):
        config.set_calibration_profile(profile)
    cached = cache_tensor_names(cache)
    if intent_doc is not None:
        intent = {node: (floats if p != "int8" else p) for node, p in intent_doc["layers"].items()}
        source = intent_doc.get("file") or "layer intent file"
    else:
        intent = intent_from_cache(((layer.name, layer.type.name, layer.get_input(0).name if layer.num_inputs
                                     else "") for layer in layers), cached, floats)
        source = "calibration cache (no layer intent file)"
    matched, unmatched = match_intent([layer.name for layer in layers], intent)
    pinned = _pin_float_layers(trt, config, layers, matched)
    applied = {"calibration_cache": {"file": cache_name, "algorithm": calibrator.algorithm, "tensors": len(cached)},
               "layer_intent": {**intent_summary(intent), "source": source, "pinned": len(pinned),
                                "unmatched": unmatched,
                                "constraint": "OBEY_PRECISION_CONSTRAINTS" if pinned else None}}
    if unmatched and log is not None:
        log(f"  tensorrt: {len(unmatched)} node(s) of the layer intent have no layer in the network "
            f"(first: {unmatched[0]}); they are not pinned (recorded in the sidecar)")
    return applied, calibrator
