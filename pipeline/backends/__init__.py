"""Engine builders: a small registry (MMDeploy-style). A backend declares the precisions it
offers and whether this machine can run it, without importing its runtime."""
from __future__ import annotations

from dataclasses import dataclass
from rexport.core.settings import setting
from pathlib import Path

from rexport.core.errors import InputError, MissingDependency


@dataclass(frozen=True)
class BuildSettings:
    """Engine build settings; backends use the ones that apply to them and record all in the sidecar."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int | None = setting(None, cli="workspace", help="TensorRT workspace limit in MiB.")
    timing_cache: str | None = setting(None, help="TensorRT timing cache file, reused across builds.")
    builder_opt_level: int | None = setting(None, help="TensorRT builder optimization level (0-5).")
    legacy: bool = setting(False, help="TensorRT: weak-typed network with precision flags (automatic on 8.x).")
    dla_core: int | None = setting(None, help="TensorRT legacy path: build for this DLA core.")
    version_compatible: bool = setting(False, help="TensorRT >= 8.6: a plan for later TensorRT versions.")
    hardware_compatible: bool = setting(False, help="TensorRT >= 8.6: a plan for all Ampere+ GPUs.")
    cuda_graphs: bool = setting(False, help="TensorRT: replay each batch shape as a recorded CUDA graph "
                                             "(a load setting, recorded in the sidecar).")
    threads: int | None = setting(None, help="OpenVINO inference threads (default: all cores).")

    def __post_init__(self) -> None:
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise InputError(f"bad batch profile {self.min_batch}/{self.opt_batch}/{self.max_batch}",
                             "need 1 <= --min-batch <= --opt-batch <= --max-batch")


class Backend:
    """Base class of an engine backend; see openvino.py and tensorrt.py."""

    name: str = ""
    precisions: tuple[str, ...] = ()

    #: why a precision this backend does not offer is missing (shown in the error)
    precision_notes: dict[str, str] = {}
    #: what to do when the backend cannot run here
    install_hint: str = ""

    def unavailable_reason(self) -> str | None:
        """None when this machine can build and run the backend, else a short reason
        ("no CUDA device", "tensorrt not installed"). Must not import heavy runtimes eagerly."""
        raise NotImplementedError

    def missing_dependency(self) -> MissingDependency | None:
        """The error a stage raises when this backend was asked for and cannot run here."""
        reason = self.unavailable_reason()
        return MissingDependency(f"{self.name}: {reason}", self.install_hint or None) if reason else None

    def precision_unavailable_reason(self, precision: str) -> str | None:
        """None when this machine can build ``precision`` (one of ``precisions``), else why not."""
        return None

    def source_variant(self, precision: str, settings: BuildSettings | None = None) -> str:
        """Which ONNX variant (fp32|fp16|int8) an engine of ``precision`` is compiled from."""
        return precision

    def build(self, onnx_path: Path, dest: Path, precision: str, settings: BuildSettings, *,
              calibration_cache: Path | None = None, progress: bool = True) -> dict:
        """Compile ``onnx_path`` into the (empty, temporary) folder ``dest``; return the sidecar dict."""
        raise NotImplementedError

    def load(self, engine_dir: Path, *, threads: int | None = None):
        """Check the sidecar against this machine, then return a Runner for the engine."""
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}
_builtins_loaded = False


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def _load_builtin() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        from rexport.pipeline.backends import openvino, tensorrt  # noqa: F401  (they register themselves)
        _builtins_loaded = True


def backends() -> dict[str, Backend]:
    _load_builtin()
    return dict(_REGISTRY)


def get_backend(name: str) -> Backend:
    """A backend by name; 'auto' is TensorRT where it can run, else OpenVINO."""
    regs = backends()
    if name == "auto":
        trt = regs.get("tensorrt")
        return trt if trt is not None and trt.unavailable_reason() is None else regs["openvino"]
    if name not in regs:
        raise InputError(f"unknown backend {name!r}", f"use one of: auto, {', '.join(sorted(regs))}")
    return regs[name]
