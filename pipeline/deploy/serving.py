"""Load a served model the way a server does: from the file its config names, with the config's
declared I/O checked against the model (a server refuses a mismatch at load), fed in the
declared dtype. Used by ``rexport infer BUNDLE_DIR IMAGE`` as a smoke test of a layout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rexport.core.errors import InputError, MissingDependency
from rexport.pipeline.runners import OnnxRuntimeRunner, Runner


@dataclass
class Served:
    """A model loaded from a layout: its runner, what its input is, how a request is prepared, its labels."""

    runner: Runner
    input: "ServedTensor"
    prepare: Callable[[str | Path], np.ndarray]
    labels: tuple[str, ...]
    note: str = ""
    path: Path | None = None        # the model file the config names


@dataclass(frozen=True)
class ServedTensor:
    name: str
    shape: tuple[int, ...]      # -1 for the batch axis (and any dynamic one)
    dtype: str

    @property
    def nhwc(self) -> bool:
        return len(self.shape) == 4 and self.shape[-1] in (1, 3) and self.shape[1] not in (1, 3)


def _check(what: str, declared: ServedTensor | tuple, actual_name: str, actual_shape, actual_dtype: str | None
           ) -> None:
    name, shape = (declared.name, declared.shape) if isinstance(declared, ServedTensor) else declared
    problems = []
    if name and name != actual_name:      # nvinfer names no input: it binds the network's only one
        problems.append(f"name {name!r} but the model has {actual_name!r}")
    actual = tuple(-1 if d is None or (isinstance(d, int) and d < 0) or isinstance(d, str) else int(d)
                   for d in actual_shape)
    if shape is not None and (len(actual) != len(shape)
                              or any(a != -1 and d != -1 and a != d for a, d in zip(actual, shape))):
        problems.append(f"dims {list(shape)} but the model has {list(actual)}")
    if isinstance(declared, ServedTensor) and declared.dtype and actual_dtype and declared.dtype != actual_dtype:
        problems.append(f"dtype {declared.dtype} but the model has {actual_dtype}")
    if problems:
        raise InputError(f"{what}: the config declares " + "; ".join(problems), "the server would refuse it: bundle again")


class _ServedOnnx(OnnxRuntimeRunner):
    def __init__(self, path: Path, declared: ServedTensor, outputs: list[tuple]) -> None:
        super().__init__(path, name=f"served {path}")
        self.declared, self.declared_out = declared, outputs

    def _activate(self) -> None:
        super()._activate()
        i = self.session.get_inputs()[0]
        _check(f"{self.path} input", self.declared, i.name, i.shape, _ort_dtype(i.type))
        self.feed_dtype = self.declared.dtype or _ort_dtype(i.type)   # nvinfer declares none: the model's
        for o, d in zip(self.session.get_outputs(), self.declared_out):
            _check(f"{self.path} output", d, o.name, o.shape, None)

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=self.feed_dtype)})[0]
        return out.astype(np.float32, copy=False)


def _ort_dtype(ort_type: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8",
            "tensor(int8)": "int8", "tensor(double)": "float64"}.get(ort_type, ort_type)


class _ServedOpenVINO(Runner):
    def __init__(self, xml: Path, declared: ServedTensor, outputs: list[tuple], properties: dict,
                 device: str = "CPU") -> None:
        super().__init__()
        self.xml, self.declared, self.declared_out = xml, declared, outputs
        self.properties, self.device = dict(properties), device
        self.name = f"served {xml}"
        self.request = None

    def _activate(self) -> None:
        import openvino as ov

        from rexport.pipeline.backends.openvino import _ov_type_name, _port_info

        bin_path = self.xml.with_suffix(".bin")
        if self.xml.suffix == ".xml" and not bin_path.is_file():
            raise InputError(f"{bin_path} not found beside {self.xml}", "bundle again")
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(self.xml)), self.device, self.properties)
        info = _port_info(compiled.inputs[0])
        _check(f"{self.xml} input", self.declared, info["name"], info["shape"], info["dtype"])
        for port, d in zip(compiled.outputs, self.declared_out):
            out = _port_info(port)
            _check(f"{self.xml} output", d, out["name"], out["shape"], None)
        self.compiled, self.request = compiled, compiled.create_infer_request()
        self.settings = {"runtime": "openvino", "device": self.device, "properties": dict(self.properties),
                         "inference_precision": _ov_type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))}

    def _deactivate(self) -> None:
        self.request = self.compiled = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(x, dtype=self.declared.dtype)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def open_onnx(path: Path, declared: ServedTensor, outputs: list[tuple]) -> Runner:
    return _ServedOnnx(path, declared, outputs)


def open_openvino(xml: Path, declared: ServedTensor, outputs: list[tuple], properties: dict,
                  device: str = "CPU") -> Runner:
    return _ServedOpenVINO(xml, declared, outputs, properties, device)


def open_plan(path: Path, declared: ServedTensor, outputs: list[tuple]) -> Runner:
    """A TensorRT plan through our TensorRT backend, from the plan and the sidecar.json beside it (needs
    TensorRT and the GPU it was built for; the backend refuses anything else with the reason)."""
    from rexport.pipeline.backends import get_backend
    from rexport.pipeline.backends.sidecar import load_engine, read_sidecar

    reason = get_backend("tensorrt").unavailable_reason()
    if reason:
        raise MissingDependency(f"cannot run {path} here: {reason}",
                                "a TensorRT plan runs only with TensorRT on the GPU it was built for")
    io = read_sidecar(path.parent)["io"]
    _check(f"{path} input", declared, io["inputs"][0]["name"], io["inputs"][0]["shape"], io["inputs"][0]["dtype"])
    for o, d in zip(io["outputs"], outputs):
        _check(f"{path} output", d, o["name"], o["shape"], None)
    return load_engine(path.parent)


# -- what the client (or the server's own preprocessing) feeds ------------------------------------

def client_input(image: str | Path, spec, declared: ServedTensor, folded: bool) -> np.ndarray:
    """One sample as a client of Triton/OVMS sends it: preprocess.json's preprocessing, or the raw pixels
    a folded model takes (HWC uint8 in its channel order), in the declared layout and dtype."""
    if folded and not getattr(spec, "raw_pixels", False):
        import dataclasses

        spec = dataclasses.replace(spec, raw_pixels=True)
    x = spec.load_input(image)                  # CHW float32, or HWC uint8 for a folded model
    pixels = x.ndim == 3 and x.dtype == np.uint8
    if pixels != declared.nhwc:                 # the declared layout decides
        x = x.transpose(2, 0, 1) if pixels else x.transpose(1, 2, 0)
    return np.ascontiguousarray(x).astype(declared.dtype)
