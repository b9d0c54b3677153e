"""The runner: one plan on one CUDA stream, buffers once per shape, CUDA events, optional CUDA graphs."""
from __future__ import annotations

import ctypes

import numpy as np

from .device import _Cudart, _ptr, import_tensorrt
from .spec import TrtError


class EngineRunner:
    """One TensorRT plan on one CUDA stream: device buffers allocated once per input shape, async copies,
    the GPU compute time of each call from CUDA events (``last_device_ms``, trtexec's "GPU Compute Time"),
    and, with ``cuda_graphs``, the enqueue recorded once per shape as a CUDA graph and replayed."""

    def __init__(self, plan: bytes, *, cuda_graphs: bool = False) -> None:
        self.plan, self.want_graphs = plan, bool(cuda_graphs)
        self.last_device_ms: float | None = None
        self.cuda_graphs = "off"        # "on", "off", or "off (<why>)" when capture failed
        self._shape = None

    def __enter__(self) -> "EngineRunner":
        trt = self.trt = import_tensorrt()
        self.rt = _Cudart()
        self.cuda = self.rt.cuda
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self.runtime = trt.Runtime(logger)
        if hasattr(self.runtime, "engine_host_code_allowed"):
            self.runtime.engine_host_code_allowed = True    # version-compatible plans embed a lean runtime (8.6+)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan)
        if self.engine is None:
            raise TrtError(f"TensorRT {trt.__version__} cannot deserialize the plan (another TensorRT or GPU?)",
                           "rebuild the engine on this machine")
        self.context = self.engine.create_execution_context()
        self.v3 = hasattr(self.context, "execute_async_v3")   # name-based I/O: 8.5+; bindings before
        if self.v3:
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            mode = self.engine.get_tensor_mode
            self.input = next(n for n in names if mode(n) == trt.TensorIOMode.INPUT)
            self.output = next(n for n in names if mode(n) == trt.TensorIOMode.OUTPUT)
            self.dtypes = [trt.nptype(self.engine.get_tensor_dtype(n)) for n in (self.input, self.output)]
            self.min_batch = int(self.engine.get_tensor_profile_shape(self.input, 0)[0][0])
        else:
            self.input, self.output = 0, 1
            self.dtypes = [trt.nptype(self.engine.get_binding_dtype(i)) for i in (0, 1)]
            self.min_batch = int(self.engine.get_profile_shape(0, 0)[0][0])
        self.stream = self.cuda.Stream()
        self.events = [self.rt.event() for _ in range(2)]
        return self

    def __exit__(self, *exc) -> None:
        self._release()
        for e in getattr(self, "events", []):
            self.rt.lib.cudaEventDestroy(e)
        if getattr(self, "stream", None) is not None:
            self.stream.free()
            self.stream = None
        self.context = self.engine = self.runtime = None

    def _release(self) -> None:
        if getattr(self, "_graph_exec", None):
            self.rt.lib.cudaGraphExecDestroy(self._graph_exec)
            self.rt.lib.cudaGraphDestroy(self._graph)
        self._graph_exec = self._graph = None
        for d in getattr(self, "_device", []):
            self.cuda.wrapper().free(d)
        self._device, self._shape = [], None

    def _allocate(self, shape: tuple) -> None:
        """Buffers, shapes and addresses for ``shape``; done once per new shape."""
        self._release()
        if self.v3:
            self.context.set_input_shape(self.input, shape)
            out_shape = tuple(self.context.get_tensor_shape(self.output))
        else:
            self.context.set_binding_shape(0, shape)
            out_shape = tuple(self.context.get_binding_shape(1))
        self._host_out = np.empty(out_shape, dtype=self.dtypes[1])
        n_in = int(np.prod(shape)) * np.dtype(self.dtypes[0]).itemsize
        self._device = [self.cuda.wrapper().malloc(max(n_in, 1)), self.cuda.wrapper().malloc(self._host_out.nbytes)]
        if self.v3:
            self.context.set_tensor_address(self.input, self._device[0])
            self.context.set_tensor_address(self.output, self._device[1])
        self._shape = shape
        if self.want_graphs:
            self._capture()

    def _enqueue(self) -> None:
        ok = (self.context.execute_async_v3(self.stream.ptr) if self.v3
              else self.context.execute_async_v2(self._device, self.stream.ptr))
        if not ok:
            raise RuntimeError("TensorRT execution failed")

    def _capture(self) -> None:
        """Record one enqueue as a CUDA graph (after one plain enqueue: TensorRT's deferred work happens there)."""
        lib, s = self.rt.lib, _ptr(self.stream.ptr)
        self._enqueue()
        self.stream.synchronize()
        graph, exe = _ptr(), _ptr()
        rc = lib.cudaStreamBeginCapture(s, 1)          # cudaStreamCaptureModeThreadLocal
        if rc == 0:
            try:
                self._enqueue()
            finally:
                rc = lib.cudaStreamEndCapture(s, ctypes.byref(graph))
        if rc == 0:
            rc = lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0))   # CUDA 11.4+
        if rc != 0:
            self.cuda_graphs = f"off (capture failed with CUDA error {rc})"
            self.want_graphs = False
            return
        self._graph, self._graph_exec, self.cuda_graphs = graph, exe, "on"

    def infer(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtypes[0])
        if x.shape != self._shape:
            self._allocate(tuple(x.shape))
        w, s, kind = self.cuda.wrapper(), self.stream.ptr, self.cuda.MemcpyKind
        w.memcpy(self._device[0], x.ctypes.data, x.nbytes, kind.HostToDevice, s)
        self.rt.record(self.events[0], s)
        if self._graph_exec:
            self.rt.check(self.rt.lib.cudaGraphLaunch(self._graph_exec, _ptr(s)), "cudaGraphLaunch")
        else:
            self._enqueue()
        self.rt.record(self.events[1], s)
        w.memcpy(self._host_out.ctypes.data, self._device[1], self._host_out.nbytes, kind.DeviceToHost, s)
        self.stream.synchronize()
        self.last_device_ms = self.rt.elapsed_ms(*self.events)
        return self._host_out.astype(np.float32, copy=True)
