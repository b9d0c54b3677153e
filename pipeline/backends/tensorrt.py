"""The TensorRT engine backend: rexport's glue over ``trt_engine`` (the one TensorRT package, also shipped
in the bundle). Here: availability on this machine, the ONNX checks that need ``onnx`` (before any
TensorRT work), the preprocessing record, errors as rexport's one-line InputError, and the Runner.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rexport.core.env import cuda_gpu
from rexport.core.errors import InputError, MissingDependency
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.backends import Backend, BuildSettings, register
from rexport.pipeline.backends import trt_engine as te
from rexport.pipeline.backends.sidecar import read_sidecar, verify_engine_files
from rexport.pipeline.runners import Runner

PLAN_FILE = te.PLAN_FILE
WHAT_TO_DO = ("install 'rexport[tensorrt]' (JetPack: apt's python3-libnvinfer and a venv made with "
              "--system-site-packages) on a machine with an NVIDIA GPU, or use --backend openvino")


def build_spec(precision: str, settings: BuildSettings) -> te.BuildSpec:
    """trt_engine's BuildSpec for rexport's BuildSettings (``threads`` is OpenVINO's, ``cuda_graphs`` a load
    setting); an INT8 build's float parts come from the file's layer intent."""
    keep = {k: v for k, v in asdict(settings).items() if k in te.BuildSpec.__dataclass_fields__}
    return _checked(te.BuildSpec, precision=precision, **keep)


def _checked(fn, *args, **kwargs):
    """Call a trt_engine function; its TrtError becomes rexport's InputError (one line, exit 2)."""
    try:
        return fn(*args, **kwargs)
    except te.TrtError as e:
        raise InputError(str(e), e.hint) from None


def onnx_facts(onnx_path: Path) -> dict:
    """Input/output names and shapes of a classifier ONNX, and whether it carries Q/DQ or FP16 tensors."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise InputError(f"{onnx_path} is not a readable ONNX model ({type(e).__name__})",
                         "re-run 'rexport export'") from None
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise InputError(f"{onnx_path.name} has {len(inputs)} inputs and {len(g.output)} outputs; a classifier "
                         "has one of each", "re-run 'rexport export'")

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

    half = onnx.TensorProto.FLOAT16
    fp16 = any(i.data_type == half for i in g.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute) for n in g.node)
    return {"input": inputs[0].name, "input_shape": dims(inputs[0]), "output": g.output[0].name,
            "qdq": any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node), "fp16": fp16,
            "preprocess": {p.key: p.value for p in model.metadata_props}.get("rexport.preprocess")}


def _preprocess_dict(onnx_path: Path, facts: dict) -> dict:
    from rexport.core.preprocess import PreprocessSpec

    if facts["preprocess"]:
        return PreprocessSpec.from_dict(json.loads(facts["preprocess"])).to_dict()
    sibling = onnx_path.with_name("model.fp32.onnx")     # older fp16/int8 files may lack the metadata
    return PreprocessSpec.from_onnx(sibling if sibling.exists() else onnx_path).to_dict()


def _variant_of(onnx_path: Path) -> str:
    parts = onnx_path.name.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "model" else onnx_path.stem


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = te.PRECISIONS

    def unavailable_reason(self) -> str | None:
        return ", ".join(self._missing()[0]) or None

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
        missing, detail = self._missing()
        if not missing:
            return None
        return MissingDependency(f"cannot build or run TensorRT engines here: {', '.join(missing)}"
                                 + (f" ({detail})" if detail else ""), WHAT_TO_DO)

    @staticmethod
    def tensorrt_version() -> str | None:
        """The importable TensorRT's version (pip, or JetPack's apt bindings that carry no dist-info)."""
        if importlib.util.find_spec("tensorrt") is None:
            return None
        return _checked(te.import_tensorrt).__version__

    def source_variant(self, precision: str, settings: BuildSettings | None = None) -> str:
        version = self.tensorrt_version()
        if version is None:
            return precision
        return te.source_variant_for(precision, _checked(te.choose_build_path, version, (settings or BuildSettings()).legacy))

    def build(self, onnx_path: Path, dest: Path, precision: str, settings: BuildSettings, *,
              calibration_cache: Path | None = None, progress: bool = True) -> dict:
        onnx_path, dest = Path(onnx_path), Path(dest)
        err = self.missing_dependency()
        if err is not None:
            raise err
        version = self.tensorrt_version()
        path = _checked(te.choose_build_path, version, settings.legacy)
        spec = build_spec(precision, settings)
        facts = onnx_facts(onnx_path)
        wrong = te.source_mismatch(facts, precision, path)
        if wrong:      # checked with onnx before TensorRT parses anything
            raise InputError(f"{onnx_path.name}: {wrong}", f"run 'rexport quantize --precision {precision}' first"
                             if precision != "fp32" else "pass onnx/model.fp32.onnx")
        cache = Path(calibration_cache) if calibration_cache is not None else None
        if cache is not None and not cache.is_file():
            cache = None
        gpu, _ = cuda_gpu()
        device = {**gpu, **(te.board_facts() if gpu.get("integrated") else {})}
        result = _checked(te.build_engine, onnx_path, spec, device,
                          calibration_cache=cache.read_bytes() if cache else None, cache_name=cache.name if cache else None,
                          intent_doc=_checked(te.read_layer_intent, cache) if cache else None,
                          log=_log if progress else None)
        (dest / PLAN_FILE).write_bytes(result.plan)
        return te.make_sidecar(result, dest, device, source_onnx=onnx_path, source_variant=_variant_of(onnx_path),
                               preprocess=_preprocess_dict(onnx_path, facts), built_by="rexport",
                               cuda_graphs=settings.cuda_graphs)

    def load(self, engine_dir: Path, *, threads: int | None = None) -> "TensorRTRunner":
        engine_dir = Path(engine_dir)
        sidecar = read_sidecar(engine_dir)
        verify_engine_files(engine_dir, sidecar)
        err = self.missing_dependency()
        if err is not None:
            raise err
        gpu, _ = cuda_gpu()
        here = {"tensorrt": self.tensorrt_version(), "gpu": gpu["name"], "compute_capability": gpu["compute_capability"]}
        problems = te.compat_problems(sidecar, here)
        if problems:    # checked before deserializing: TensorRT's own refusal is a cryptic magic-tag error
            raise InputError(f"cannot load {engine_dir}: " + "; ".join(problems))
        return TensorRTRunner(engine_dir / PLAN_FILE, sidecar, name=engine_dir.name)


class TensorRTRunner(Runner):
    """A TensorRT plan through trt_engine.EngineRunner; float32 logits, GPU compute time per call."""

    def __init__(self, plan_path: Path, sidecar: dict, *, name: str = "tensorrt") -> None:
        super().__init__()
        self.plan_path, self.sidecar, self.name = Path(plan_path), sidecar, name
        # raw uint8 NHWC pixels for a folded-preprocessing engine, else float32 NCHW
        self.feed = PreprocessSpec.from_dict(sidecar.get("preprocess") or {}).model_input
        self._runner: te.EngineRunner | None = None

    def _activate(self) -> None:
        load = self.sidecar.get("load_settings") or {}
        self._runner = _checked(te.EngineRunner(self.plan_path.read_bytes(),
                                                cuda_graphs=bool(load.get("cuda_graphs"))).__enter__)
        self.settings = {"runtime": "tensorrt", "tensorrt": self.sidecar["runtime"].get("tensorrt"),
                         "device": self.sidecar["device"].get("name"), "profile": self.sidecar.get("profile"),
                         **load, "cuda_graphs": self._runner.cuda_graphs}

    def _deactivate(self) -> None:
        if self._runner is not None:
            self._runner.__exit__(None, None, None)
            self._runner = None

    @property
    def last_device_ms(self) -> float | None:
        return self._runner.last_device_ms if self._runner is not None else None

    def infer(self, x: np.ndarray) -> np.ndarray:
        y = self._runner.infer(self.feed(x))
        self.settings["cuda_graphs"] = self._runner.cuda_graphs   # "on", or "off (<why>)" once a capture failed
        return y


register(TensorRTBackend())
