"""TensorRT build and run, in one small package that imports only numpy and (lazily) tensorrt and
polygraphy's CUDA wrapper, and nothing of rexport (relative imports only): rexport's backend imports
it, and ``rexport bundle`` copies the folder verbatim beside build_engine.py / run_engine.py, so a
Jetson runs the same code without rexport (``import trt_engine``).

Build paths (``choose_build_path``): strongly typed on TensorRT >= 10 (the only mode in 11; the
ONNX tensor types are the precisions, no precision flags), weak typed on 8.x or with ``legacy``
on 10.x (the FP32 file + FP16/INT8 flags + our calibration as a TensorRT cache, ``legacy``).

    spec      TrtError, BuildSpec, precisions and build paths
    versions  version parsing, build-path choice, flags, DLA rules, compat checks (pure)
    legacy    the weak-typed INT8 path: calibration cache, layer intent, float-layer pinning
    device    tensorrt's import, CUDA device and Jetson board facts
    build     network, config, profile, timing cache, DLA: build_engine()
    facts     the sidecar.json of a plan
    runner    EngineRunner: buffers once per shape, stream, CUDA events, CUDA graphs
"""
from __future__ import annotations

from .build import BuildResult, build_engine, profile_shapes
from .device import board_facts, cuda_device, import_tensorrt, tensorrt_version
from .facts import PLAN_FILE, SIDECAR_SCHEMA, make_sidecar, sha256_file
from .legacy import (CALIBRATOR_FOR_ALGORITHM, COMPUTE_LAYERS, LAYERS_SUFFIX, apply_calibration, cache_tensor_names,
                     float_parts, intent_from_cache, intent_summary, make_cache_calibrator, match_intent,
                     parse_cache_header, read_layer_intent, retag_cache)
from .runner import EngineRunner
from .spec import FLOAT_PARTS, PRECISIONS, STRONGLY_TYPED, WEAK_TYPED, BuildSpec, TrtError
from .versions import (AMPERE, JETPACK_FOR_DLA_ON_11, builder_flags_for, choose_build_path, compat_problems,
                       dla_problems, major_minor, source_mismatch, source_variant_for, unsupported_settings,
                       version_tag, version_tuple)

__all__ = [
    "AMPERE", "CALIBRATOR_FOR_ALGORITHM", "COMPUTE_LAYERS", "FLOAT_PARTS", "JETPACK_FOR_DLA_ON_11", "LAYERS_SUFFIX",
    "PLAN_FILE", "PRECISIONS", "SIDECAR_SCHEMA", "STRONGLY_TYPED", "WEAK_TYPED",
    "BuildResult", "BuildSpec", "EngineRunner", "TrtError",
    "apply_calibration", "board_facts", "build_engine", "builder_flags_for", "cache_tensor_names", "choose_build_path",
    "compat_problems", "cuda_device", "dla_problems", "float_parts", "import_tensorrt", "intent_from_cache",
    "intent_summary", "major_minor", "make_cache_calibrator", "make_sidecar", "match_intent", "parse_cache_header",
    "profile_shapes", "read_layer_intent", "retag_cache", "sha256_file", "source_mismatch", "source_variant_for",
    "tensorrt_version", "unsupported_settings", "version_tag", "version_tuple",
]
