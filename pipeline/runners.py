"""One small runner interface: load an artifact, feed it a batch, get logits.

Runners have polygraphy's lifecycle (activate / infer / deactivate, as a context manager),
so every backend is driven the same way by validate, evaluate, infer and bench.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError, first_line
from rexport.core.preprocess import PreprocessSpec


class Runner:
    """Base class. Subclasses implement ``_activate``, ``infer`` and optionally ``_deactivate``."""

    name: str = "runner"
    #: what speed-relevant settings this runner uses (threads, providers, hints): recorded by bench
    settings: dict

    def __init__(self) -> None:
        self.settings = {}
        self._active = False

    def __enter__(self) -> "Runner":
        if not self._active:
            self._activate()
            self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            self._deactivate()
            self._active = False

    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        pass

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one NCHW float32 batch; return float32 logits (N, num_classes)."""
        raise NotImplementedError


class TorchRunner(Runner):
    """The PyTorch FP32 reference (eager)."""

    def __init__(self, model, *, threads: int | None = None, name: str = "pytorch") -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.threads = threads

    def _activate(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.settings = {"runtime": "torch eager", "threads": torch.get_num_threads(), "device": "cpu"}
        self.model.eval()

    def infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()


class OnnxRuntimeRunner(Runner):
    """An ONNX file in ONNX Runtime: the numerics reference for every ONNX variant."""

    def __init__(self, path: str | os.PathLike, *, providers: list[str] | None = None,
                 threads: int | None = None, name: str | None = None, exact: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.exact = exact  # no graph optimisations: every node runs as the file says (no fused INT8 kernels)
        self.name = name or self.path.name
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.session = None

    def _activate(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if self.exact:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=self.providers)
        except Exception as e:  # ORT raises Fail/InvalidProtobuf/InvalidGraph/NoSuchFile
            first = first_line(e, 200)
            raise InputError(f"ONNX Runtime cannot load {self.path}: {first}",
                             "pass a complete .onnx file (re-run 'rexport export')") from None
        self.input_name = self.session.get_inputs()[0].name
        # a folded-preprocessing file takes raw uint8 NHWC pixels: normalised batches are turned back into them
        self.feed = (PreprocessSpec.from_onnx(self.path).model_input
                     if self.session.get_inputs()[0].type == "tensor(uint8)" else None)
        self.settings = {"runtime": "onnxruntime", "providers": self.session.get_providers(),
                         "threads": self.threads or "default (physical cores)",
                         "graph_optimization": "disabled (exact Q/DQ semantics)" if self.exact else "default (all)"}

    def _deactivate(self) -> None:
        self.session = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = self.feed(x) if self.feed else np.ascontiguousarray(x, dtype=np.float32)
        out = self.session.run(None, {self.input_name: x})[0]
        return out.astype(np.float32, copy=False)
