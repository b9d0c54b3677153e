"""ONNX plumbing shared by every writer in this package: load, name, and write-with-proof.

Every file written here has passed ``onnx.checker`` and run in ONNX Runtime (CPU) at each of
:data:`CHECK_BATCHES`, so a file that reaches the run directory is known to load and run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from rexport.core.errors import CheckFailed, InputError
from rexport.core.fsio import atomic_path

#: batch sizes every written model is run at in ONNX Runtime before it is kept
CHECK_BATCHES: tuple[int, ...] = (1, 3)



def load_onnx(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}", "run 'rexport export' first")
    try:
        return onnx.load(str(path))
    except Exception as e:  # a truncated or foreign file
        raise InputError(f"cannot read ONNX file {path}: {e}") from None


def node_id(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def set_metadata(model: onnx.ModelProto, metadata: list[tuple[str, str]]) -> None:
    del model.metadata_props[:]
    for key, value in metadata:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    g = model.graph
    return {v.name: v for v in [*g.input, *g.value_info, *g.output]}


def like_info(info: onnx.ValueInfoProto, name: str, elem_type: int) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = name
    out.type.tensor_type.elem_type = elem_type
    del out.metadata_props[:]
    return out


class NameSource:
    """Fresh tensor and node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self._tensors = {x for n in g.node for x in (*n.input, *n.output)}
        self._tensors |= {i.name for i in g.initializer} | {v.name for v in (*g.input, *g.output, *g.value_info)}
        self._nodes = {n.name for n in g.node}

    @staticmethod
    def _fresh(base: str, taken: set[str]) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def tensor(self, base: str) -> str:
        return self._fresh(base, self._tensors)

    def node(self, base: str) -> str:
        return self._fresh(base, self._nodes)


def write_checked(model: onnx.ModelProto, out_path: Path) -> Path:
    """Write atomically, after onnx.checker and an ONNX Runtime run at each of CHECK_BATCHES."""
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as e:
            raise CheckFailed(f"{out_path.name} fails the ONNX checker: {str(e).splitlines()[0]}") from None
        run_in_ort(tmp, out_path.name)
    return out_path


def run_in_ort(path: Path, label: str) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise CheckFailed(f"ONNX Runtime cannot load {label}: {str(e).splitlines()[0]}") from None
    inp = sess.get_inputs()[0]
    rng = np.random.default_rng(0)
    for batch in CHECK_BATCHES:
        dims = [batch] + [d if isinstance(d, int) and d > 0 else 224 for d in inp.shape[1:]]
        x = rng.standard_normal(dims).astype(np.float32)
        if inp.type == "tensor(uint8)":  # a folded-preprocessing model takes raw pixels
            x = rng.integers(0, 256, dims, dtype=np.uint8)
        try:
            outs = sess.run(None, {inp.name: x})
        except Exception as e:
            raise CheckFailed(f"ONNX Runtime cannot run {label} at batch {batch}: {str(e).splitlines()[0]}") from None
        y = outs[0]
        if y.shape[0] != batch or not np.all(np.isfinite(y)):
            raise CheckFailed(f"{label} gives {'non-finite' if y.shape[0] == batch else 'wrong-shaped'} output "
                              f"at batch {batch}")
