"""The ONNX Runtime side of calibration: which activations to measure, the augmented session that
returns them, and the worker thread that runs it one batch ahead of the fold.

Not every activation is returned: a Relu output is ``max(x, 0)`` of a tensor that is, and a
Flatten/Reshape/Identity/Squeeze/Unsqueeze output holds its input's values, so their statistics are
folded from their source's values (the same floats) and ONNX Runtime neither returns nor reduces
them. That halves what a ResNet's run returns.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from rexport.core.errors import InputError, first_line

from rexport.calibration.readers import CalibrationReader

SAME_VALUES = ("Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze")


def activation_tensors(model) -> tuple[list[str], dict[str, int]]:
    """(float model inputs, {float activation: ONNX elem type}): every float node output, in graph
    order, that is not computed from initializers and constants alone; graph outputs included."""
    import onnx
    from onnx import TensorProto

    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    g = onnx.shape_inference.infer_shapes(model).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    constant = {init.name for init in g.initializer}
    # a uint8 input is a folded-preprocessing model's raw pixels (pipeline/fold_preprocessing.py)
    inputs = [i.name for i in g.input if i.name not in constant and types.get(i.name) in {*float_types, TensorProto.UINT8}]
    activations: dict[str, int] = {}
    for node in g.node:
        if node.op_type in ("Constant", "ConstantOfShape") or all(i in constant for i in node.input if i):
            constant.update(o for o in node.output if o)
            continue
        activations.update((o, types[o]) for o in node.output if o and types.get(o) in float_types)
    return inputs, activations


@dataclass
class CollectionPlan:
    """Which tensors ONNX Runtime returns (``fetched``, graph order) and, per fetched tensor or model
    input, the tensors whose statistics follow from its values: (name, "relu" | "same")."""

    inputs: list[str]
    fetched: dict[str, int]  # activation -> ONNX elem type
    derived: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def tensors(self) -> list[str]:
        """Every tensor that gets statistics, in graph order (the model inputs first)."""
        return self._order

    def __post_init__(self) -> None:
        self._order: list[str] = [*self.inputs]


def collection_plan(model, *, derive: bool = True) -> CollectionPlan:
    """The plan for ``model``: every float activation is measured; with ``derive``, Relu and
    same-values outputs are folded from their source (never a model output: the NaN check reads those)."""
    inputs, activations = activation_tensors(model)
    plan = CollectionPlan(inputs, {})
    outputs = {o.name for o in model.graph.output}
    root: dict[str, tuple[str, str]] = {name: (name, "same") for name in inputs}  # tensor -> (source, kind)
    producers = {o: node for node in model.graph.node for o in node.output}
    for name, elem_type in activations.items():
        plan._order.append(name)
        node = producers[name]
        src = node.input[0] if node.input else ""
        op = node.op_type
        if derive and name not in outputs and src in root and (op == "Relu" or op in SAME_VALUES) \
                and len(node.output) == 1 and activations.get(src, elem_type) == elem_type:
            base, kind = root[src]
            kind = "relu" if op == "Relu" or kind == "relu" else "same"
            root[name] = (base, kind)
            plan.derived.setdefault(base, []).append((name, kind))
        else:
            root[name] = (name, "same")
            plan.fetched[name] = elem_type
    return plan


OPTIMIZATION = {"all": "ORT_ENABLE_ALL", "basic": "ORT_ENABLE_BASIC"}


def augmented_session(model, plan: CollectionPlan, *, values: bool, optimization: str = "basic"):
    """An ORT CPU session of ``model`` returning, per fetched activation, either the activation itself
    (``values``: min, max and histogram are folded in numpy) or its min and max reduced in the graph
    (plus the values of the model's own outputs, for the NaN check: ORT's reductions skip a NaN unless
    it comes first). Returns (session, output names, [(activation, min index, max index, value index)]),
    an index None where that output is not fetched.

    ``optimization`` "basic" (the default) keeps each exposed activation in NCHW. "all" (NCHWc
    convolutions, with a layout reorder in front of every exposed activation) was measured: 15-20%
    less CPU on ResNet-18 but 8% more on ResNet-50, and 2-3x the peak memory (ResNet-50 minmax:
    1.73 GB against 0.55 GB at 64 images, growing with the run count); its activations also differ
    in the last bits (another accumulation order), so ranges would move (up to 13 ulps, entropy's
    by a bin). That is also why calibration cannot cost one default ORT pass: a plain pass at "basic"
    takes 1.13-1.39x the CPU of the default ("all") one on ResNet-18 and 1.12-1.20x on ResNet-50
    (measured on 2 loaded cores, batches alternated between the sessions); benchmarks/bench_calibration.py
    reports that floor as ``same_options_ratio``."""
    import onnx
    import onnxruntime as ort

    g = model.graph
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    reductions: dict[str, list] = {}  # activation -> its ReduceMin/ReduceMax nodes
    model_outputs = {o.name for o in g.output}
    del g.output[:]
    names: list[str] = []
    layout: list[tuple[str, int | None, int | None, int | None]] = []
    for n, (name, elem_type) in enumerate(plan.fetched.items()):
        if values:
            g.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
            layout.append((name, None, None, len(names)))
            names.append(name)
            continue
        lo, hi = f"rexport_calib_min_{n}", f"rexport_calib_max_{n}"
        if lo in taken or hi in taken:
            raise InputError(f"the model already has a tensor named {lo!r} or {hi!r}", "rename it")
        reductions[name] = [onnx.helper.make_node("ReduceMin", [name], [lo], keepdims=0),
                            onnx.helper.make_node("ReduceMax", [name], [hi], keepdims=0)]
        fetch = [lo, hi] + ([name] if name in model_outputs else [])
        for out in fetch:
            g.output.append(onnx.helper.make_tensor_value_info(out, elem_type, [] if out != name else None))
        first = len(names)
        names += fetch
        layout.append((name, first, first + 1, first + 2 if len(fetch) == 3 else None))
    # Each reduction goes right after its producer, and the session runs in priority-based order,
    # which keeps that order: an activation's buffer is then freed as soon as its consumers are done.
    # ORT's default order runs appended reductions late and keeps every activation of the batch alive
    # until then (measured: 2.0 GB instead of 0.55 GB for ResNet-50 at batch 8; both changes needed).
    nodes = list(g.node)
    del g.node[:]
    for node in nodes:
        g.node.append(node)
        for out in node.output:
            g.node.extend(reductions.get(out, []))
    session = ort.InferenceSession(model.SerializeToString(), session_options(optimization),
                                   providers=["CPUExecutionProvider"])
    return session, names, layout


def session_options(optimization: str = "basic"):
    """The ORT session options calibration runs with (also the benchmark's same-options plain pass):
    ``optimization`` level, idle threads that do not spin (the worker thread and the caller's fold
    share the cores), priority-based execution order (see ``augmented_session``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    try:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
    except KeyError:
        raise ValueError(f"optimization must be one of {sorted(OPTIMIZATION)}, got {optimization!r}") from None
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if hasattr(ort, "ExecutionOrder"):
        opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return opts


_DONE = object()


def run_batches(session, names: list[str], reader: CalibrationReader, total: int, model_name: str, *,
                max_run_bytes: int, in_flight: int = 2) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Yield (inputs, outputs) for up to ``total`` samples. A worker thread reads and runs the next
    inputs while the caller folds in the last ones. Reader batches are split so that one run's
    outputs stay under ``max_run_bytes`` (the first run, of one sample, measures the size), and at
    most ``in_flight`` runs' outputs are alive at once: that, not the batch size or the sample
    count, is what bounds memory. (Reused output buffers bound with IOBinding were tried: no gain
    measured on ResNet-18, 4.7 against 4.6 CPU-s for 64 images.)"""
    slots = threading.Semaphore(in_flight)
    results: queue.Queue = queue.Queue()
    stop = threading.Event()

    def run(x: np.ndarray) -> list[np.ndarray]:
        try:
            return session.run(names, {reader.input_name: x})
        except Exception as e:  # onnxruntime raises its own InvalidArgument / Fail types
            raise InputError(f"ONNX Runtime could not run {model_name} on a calibration batch of shape "
                             f"{tuple(x.shape)}: {first_line(e, 300)}",
                             "check the data's input size matches the model") from None

    def work() -> None:
        done, chunk = 0, 1  # the first run is of one sample: it measures the outputs' bytes per sample
        try:
            while done < total and not stop.is_set():
                feed = reader.get_next()
                if feed is None:
                    break
                x = feed[reader.input_name][: total - done]
                pos = 0
                while pos < len(x):
                    part = x[pos:pos + chunk]
                    slots.acquire()
                    if stop.is_set():
                        return
                    outs = run(part)
                    if done == 0:
                        per_sample = sum(o.nbytes for o in outs) / len(part)
                        chunk = max(1, int(max_run_bytes // max(per_sample, 1.0)))
                    pos, done = pos + len(part), done + len(part)
                    results.put((part, outs))
                    del outs
        except BaseException as e:  # handed to the caller's thread, raised there
            results.put(e)
        finally:
            results.put(_DONE)

    worker = threading.Thread(target=work, name="calibration-inference", daemon=True)
    worker.start()
    try:
        while True:
            item = results.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
            del item
            slots.release()
    finally:
        stop.set()
        slots.release()
        worker.join()

