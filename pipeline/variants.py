"""Variant names and how to open each one as a Runner.

``pytorch`` (the FP32 reference), ``fp32``/``fp16``/``int8``/``int8-openvino`` (the ONNX files: ``int8`` is
the TensorRT form of the INT8 file, ``int8-openvino`` the OpenVINO form) and ``<backend>-<precision>``
engines (``openvino-int8``, ``tensorrt-fp16``...).
"""
from __future__ import annotations

from pathlib import Path

from rexport.core.errors import InputError
from rexport.pipeline.manifest import VARIANT_FILES, RunDir
from rexport.pipeline.runners import OnnxRuntimeRunner, Runner, TorchRunner

REFERENCE = "pytorch"


def engine_dirs(run: RunDir) -> dict[str, Path]:
    """Engines present in the run: name -> folder holding sidecar.json."""
    root = run.path / "engines"
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and (d / "sidecar.json").exists()}


#: what the ``pytorch`` row says in a run started from an imported ONNX file
NO_PYTORCH = "not available: imported ONNX"


def reference_variant(run: RunDir) -> str:
    """The variant every other is compared with: ``pytorch``, or ``fp32`` (the imported ONNX in ONNX
    Runtime) when the run has no PyTorch model."""
    return "fp32" if run.imported else REFERENCE


def list_variants(run: RunDir, *, reference: bool = True) -> list[str]:
    """Every variant present in the run, in pipeline order (an imported run has no ``pytorch``)."""
    return ([REFERENCE] if reference and not run.imported else []) + run.variants() + list(engine_dirs(run))


def variant_precision(variant: str) -> str:
    """The numeric precision of a variant: fp32 for the reference, the name before any '-form' for the
    ONNX files (``int8-openvino`` is int8), the suffix for engines (``openvino-int8``)."""
    if variant == REFERENCE:
        return "fp32"
    if variant in VARIANT_FILES:
        return variant.split("-", 1)[0]
    return variant.rsplit("-", 1)[-1]


def source_variant(run: RunDir, variant: str) -> str | None:
    """The ONNX variant an engine was compiled from (None for ONNX variants and the reference)."""
    d = engine_dirs(run).get(variant)
    if d is None:
        return None
    from rexport.pipeline.backends.sidecar import read_sidecar

    return read_sidecar(d)["source_onnx"]["variant"]


def load_reference(run: RunDir):
    """The PyTorch FP32 model exactly as the export stage built it (same weights or same seed)."""
    from rexport.models.checkpoint import load_model

    st = run.require_export()
    if run.imported:
        raise InputError(f"the PyTorch reference of {run.path} is {NO_PYTORCH}",
                         "use the fp32 variant: the imported ONNX in ONNX Runtime is this run's reference")
    s = st["settings"]
    recorded = ((st.get("inputs") or {}).get("weights") or {}).get("sha256")
    if s.get("weights"):
        from rexport.core.fsio import sha256_file

        path = Path(s["weights"])
        if not path.is_file() or sha256_file(path) != recorded:
            raise InputError(f"checkpoint {path} is missing or changed since it was exported",
                             "run 'rexport export' again with it (the PyTorch reference must match the ONNX)")
    return load_model(s["model"], s.get("weights"), num_classes=s.get("num_classes"),
                      trust_checkpoint=s.get("trust_checkpoint", False), seed=s.get("seed", 0))


def reference_runner(run: RunDir, *, threads: int | None = None) -> Runner:
    """The reference's runner: the PyTorch model, or the imported FP32 ONNX in ONNX Runtime."""
    return open_variant(run, reference_variant(run), threads=threads)


def open_variant(run: RunDir, variant: str, *, threads: int | None = None) -> Runner:
    """A runner for ``variant`` (not yet activated: use it as a context manager)."""
    if variant == REFERENCE:
        return TorchRunner(load_reference(run).model, threads=threads)
    if variant in VARIANT_FILES:
        path = run.require(VARIANT_FILES[variant], f"rexport quantize --precision {variant_precision(variant)}"
                           if variant != "fp32" else "rexport export")
        return OnnxRuntimeRunner(path, threads=threads, name=variant)
    engines = engine_dirs(run)
    if variant in engines:
        from rexport.pipeline.backends.sidecar import load_engine

        return load_engine(engines[variant], threads=threads)
    raise InputError(f"unknown variant {variant!r} in {run.path}",
                     f"available: {', '.join(list_variants(run))}")
