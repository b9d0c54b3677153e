"""Folded preprocessing: the FP32 graph (and so every variant and engine made from it) takes raw
pixels, uint8 NHWC in the model's channel order at its input size, and does the scaling, mean/std
and NCHW layout itself. Resize and crop stay outside the graph.

The ops are the float path's own (Cast, /255, -mean, /std, Transpose), so the FP32 file is exact;
in INT8 they sit ahead of the first Q/DQ, which quantizes the first convolution's input as before.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec

PREFIX = "rexport_pre_"


def raw_pixel_spec(spec: PreprocessSpec) -> PreprocessSpec:
    """The spec recorded for a folded model."""
    return dataclasses.replace(spec, raw_pixels=True)


def fold_preprocessing(model, spec: PreprocessSpec):
    """Put the preprocessing in front of ``model``'s float NCHW input ``input``; returns the model,
    whose input ``input`` is now uint8 [N, H, W, 3]."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name for i in g.initializer}
    inp = next(i for i in g.input if i.name not in inits)
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4 or inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise InputError("cannot fold preprocessing: the model's input is not float32 NCHW",
                         "fold only a float32 NCHW classifier")
    batch = dims[0].dim_param or dims[0].dim_value or "batch"
    name, inner = inp.name, PREFIX + "normalised"
    for n in g.node:
        n.input[:] = [inner if i == name else i for i in n.input]
    shape = (1, 3, 1, 1)
    g.initializer.extend([
        numpy_helper.from_array(np.array(255.0, np.float32), PREFIX + "255"),
        numpy_helper.from_array(np.asarray(spec.mean, np.float32).reshape(shape), PREFIX + "mean"),
        numpy_helper.from_array(np.asarray(spec.std, np.float32).reshape(shape), PREFIX + "std"),
    ])
    nodes = [
        helper.make_node("Cast", [name], [PREFIX + "float"], to=TensorProto.FLOAT, name=PREFIX + "cast"),
        helper.make_node("Transpose", [PREFIX + "float"], [PREFIX + "nchw"], perm=[0, 3, 1, 2],
                         name=PREFIX + "nchw"),
        helper.make_node("Div", [PREFIX + "nchw", PREFIX + "255"], [PREFIX + "unit"], name=PREFIX + "scale"),
        helper.make_node("Sub", [PREFIX + "unit", PREFIX + "mean"], [PREFIX + "centred"], name=PREFIX + "mean"),
        helper.make_node("Div", [PREFIX + "centred", PREFIX + "std"], [inner], name=PREFIX + "std"),
    ]
    for i, n in enumerate(nodes):
        g.node.insert(i, n)
    size = spec.input_size
    new_input = helper.make_tensor_value_info(name, TensorProto.UINT8, [batch, size, size, 3])
    g.input.remove(inp)
    g.input.insert(0, new_input)
    del g.value_info[:]
    return model


def fold_error(float_model, folded_model, spec: PreprocessSpec, *, samples: int = 4, seed: int = 0) -> float:
    """Max |folded(pixels) - float(from_pixels(pixels))| in ONNX Runtime on seeded pixel images:
    the folded graph against the float path on the same decoded images."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (float_model, folded_model)]
    fixed = sessions[0].get_inputs()[0].shape[0]
    n = fixed if isinstance(fixed, int) and fixed > 0 else samples   # a fixed-batch graph runs its batch
    rng = np.random.default_rng([seed, 0xF01D])
    pixels = rng.integers(0, 256, (n, spec.input_size, spec.input_size, 3), dtype=np.uint8)
    outs = [s.run(None, {s.get_inputs()[0].name: x})[0].astype(np.float64)
            for s, x in zip(sessions, (spec.from_pixels(pixels), pixels))]
    return float(np.abs(outs[0] - outs[1]).max())


class RawPixelReader:
    """A calibration reader for a folded model: the inner reader's normalised batches as the uint8
    NHWC pixels they were made from (its ``get_next`` converted; everything else passed through)."""

    def __init__(self, inner, spec: PreprocessSpec) -> None:
        self._inner, self._spec = inner, spec

    def get_next(self):
        batch = self._inner.get_next()
        if batch is None:
            return None
        return {k: self._spec.to_pixels(v) for k, v in batch.items()}

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def fold_proved(model, spec):
    """(the raw-pixel model, its spec, the measured error against the float graph on the same images):
    what export and import both do for ``--fold-preprocessing``."""
    import onnx

    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)
    folded = fold_preprocessing(model, spec)
    return folded, raw_pixel_spec(spec), fold_error(float_model, folded, spec)
