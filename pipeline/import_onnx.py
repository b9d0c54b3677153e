"""Import stage: a user's image-classifier ONNX becomes the run's ``onnx/model.fp32.onnx``.

The file is checked (one float NCHW input with 3 channels, one [N, classes] output), brought to
our target opset, its batch made dynamic where the graph allows, its I/O renamed to ``input`` /
``logits``, and our preprocessing metadata added. The imported file in ONNX Runtime is then the
reference of every later stage (there is no PyTorch model), and every later stage works on it
unchanged. Each rewrite is proven in ONNX Runtime against the file as given.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError, first_line
from rexport.core.fsio import atomic_path, sha256_file
from rexport.core.preprocess import METADATA_KEY, PreprocessSpec
from rexport.pipeline.export import (DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, drop_downstream, portable_head,
                                     recorded_spec)
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.summaries import ImportSummary

MIN_SOURCE_OPSET = 13
_FLOAT, _FLOAT16 = 1, 10          # onnx.TensorProto.FLOAT / FLOAT16
_TYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
               10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
_INTEGER = {2, 3, 4, 5, 6, 7, 12, 13}
_BATCH_PROBES = (1, 3)


@dataclass(frozen=True)
class ImportSettings:
    onnx: str = ""
    opset: int = DEFAULT_OPSET
    batch: str = "dynamic"             # "dynamic" (where the graph allows) or a fixed batch size
    fold_preprocessing: bool = False
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)

    def __post_init__(self) -> None:
        if not self.onnx:
            raise InputError("no ONNX file given", "pass --onnx FILE")
        if not (MIN_OPSET <= self.opset <= MAX_OPSET):
            raise InputError(f"opset {self.opset} is not supported", f"use an opset from {MIN_OPSET} to {MAX_OPSET}")
        if self.batch != "dynamic" and not (str(self.batch).isdigit() and int(self.batch) >= 1):
            raise InputError(f"bad --batch {self.batch!r}", "use 'dynamic' or a positive integer")

    @property
    def model(self) -> str:
        """The run's model name: ``onnx:<file stem>``."""
        return f"onnx:{Path(self.onnx).stem}"

    def to_record(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["model"] = self.model
        return d


# --- checking the file -------------------------------------------------------------------------

def read_onnx(path: str | os.PathLike):
    """The model with its external data, or a one-line error for a file that is not ONNX."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} not found", "pass an existing .onnx file")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # DecodeError, OSError for missing external data, ...
        raise InputError(f"{p} is not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})",
                         "pass an .onnx file (with its external data files beside it)") from None
    if not model.graph.node or not model.graph.output:
        raise InputError(f"{p} is not an ONNX model (no graph nodes)", "pass an .onnx file")
    return model


def _dims(value_info) -> list:
    """Each dimension: an int, a str (symbolic) or None (unknown)."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def graph_input(model, path: Path):
    """The one real input (graph inputs that are not initializers), checked: rank 4, float, 3 channels."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise InputError(f"{path.name} has {len(inputs)} inputs ({names}); an image classifier has one",
                         "export the model with a single NCHW image input")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    kind = _TYPE_NAMES.get(elem, f"type {elem}")
    if elem in _INTEGER:
        raise InputError(f"{path.name}'s input {inp.name!r} is {kind}; rexport imports float32/float16 NCHW inputs",
                         "export the model with a float input (preprocessing outside the graph); "
                         "use --fold-preprocessing for a raw-pixel variant")
    if elem not in (_FLOAT, _FLOAT16):
        raise InputError(f"{path.name}'s input {inp.name!r} is {kind}, not float32/float16",
                         "export the model with a float32 input")
    dims = _dims(inp)
    if len(dims) != 4:
        raise InputError(f"{path.name}'s input {inp.name!r} has rank {len(dims)} (shape {dims}); "
                         "an image classifier takes rank-4 NCHW", "export the model with an N,3,H,W input")
    if isinstance(dims[1], int) and dims[1] != 3:
        hint = ("it looks like NHWC: export it as NCHW" if dims[3] == 3 else "export it with a 3-channel input")
        raise InputError(f"{path.name}'s input {inp.name!r} has {dims[1]} channels (shape {dims}), not 3", hint)
    return inp


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(model, target: int, path: Path):
    """Bring the graph to ``target`` (rewriting the opset-18 ResNet head idioms first); say why not."""
    from onnx import version_converter

    source = _opset(model)
    if source < MIN_SOURCE_OPSET:
        raise InputError(f"{path.name} uses opset {source}; rexport imports opset {MIN_SOURCE_OPSET} or later",
                         f"re-export it with opset {MIN_SOURCE_OPSET}+ (e.g. torch.onnx.export(..., opset_version=17))")
    model = portable_head(model)
    if source == target:
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return version_converter.convert_version(model, target)
    except Exception as e:  # the converter has no adapter for an op, or the graph breaks its checks
        first = first_line(e, 200)
        raise InputError(f"ONNX's version converter cannot bring {path.name} from opset {source} to {target}: {first}",
                         f"pass --opset {source} if it is in {MIN_OPSET}..{MAX_OPSET}, or re-export the model "
                         f"with opset {target}") from None


# --- rewriting I/O ---------------------------------------------------------------------------

def _rename(model, old: str, new: str) -> None:
    if old == new:
        return
    g = model.graph
    for n in g.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.name == old:
            vi.name = new


def standard_io(model, inp) -> None:
    """Name the input ``input`` and the output ``logits`` (as our export does) where free."""
    used = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.initializer}
    out = model.graph.output[0].name
    if "input" not in used or inp.name == "input":
        _rename(model, inp.name, "input")
    if "logits" not in used or out == "logits":
        _rename(model, out, "logits")


def float32_io(model) -> list[str]:
    """Put a Cast in front of a float16 input and behind a float16 output, so every stage feeds and
    reads float32 as for any other model; returns what was done."""
    from onnx import helper

    done = []
    g = model.graph
    inp = g.input[[i.name for i in g.input].index(_real_input_name(model))]
    if inp.type.tensor_type.elem_type == _FLOAT16:
        cast_out = inp.name + "_fp16"
        for n in g.node:
            n.input[:] = [cast_out if i == inp.name else i for i in n.input]
        g.node.insert(0, helper.make_node("Cast", [inp.name], [cast_out], to=_FLOAT16, name="rexport_input_cast"))
        inp.type.tensor_type.elem_type = _FLOAT
        done.append("float16 input: a Cast from float32 was put in front")
    out = g.output[0]
    if out.type.tensor_type.elem_type == _FLOAT16:
        src = out.name + "_fp16"
        for n in g.node:
            n.output[:] = [src if o == out.name else o for o in n.output]
            n.input[:] = [src if i == out.name else i for i in n.input]
        g.node.append(helper.make_node("Cast", [src], [out.name], to=_FLOAT, name="rexport_output_cast"))
        out.type.tensor_type.elem_type = _FLOAT
        done.append("float16 output: a Cast to float32 was put behind")
    return done


def _real_input_name(model) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def _set_dim(value_info, axis: int, value) -> None:
    d = value_info.type.tensor_type.shape.dim[axis]
    if isinstance(value, int):
        d.dim_value = value
    else:
        d.dim_param = value


def set_input_shape(model, batch, size: int) -> None:
    """Fix C,H,W (engines need them fixed) and set the batch dim; clear the inferred shapes that
    carry the old batch, so shape inference recomputes them."""
    inp = next(i for i in model.graph.input if i.name == _real_input_name(model))
    for axis, v in enumerate((batch, 3, size, size)):
        _set_dim(inp, axis, v)
    del model.graph.value_info[:]
    out = model.graph.output[0]
    if len(_dims(out)) >= 1:
        _set_dim(out, 0, batch)


# --- proving it in ONNX Runtime ----------------------------------------------------------------

def _session(model_or_path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.SerializeToString()
    return ort.InferenceSession(str(src) if isinstance(src, os.PathLike) else src, opts,
                                providers=["CPUExecutionProvider"])


def _run(session, x: np.ndarray) -> np.ndarray:
    inp = session.get_inputs()[0]
    if inp.type == "tensor(float16)":
        x = x.astype(np.float16)
    return np.asarray(session.run(None, {inp.name: x})[0]).astype(np.float32)


def _probe(model, batches: tuple[int, ...], size: int, seed: int) -> dict[int, np.ndarray] | str:
    """The model's outputs at each batch size on seeded inputs, or why it cannot run them."""
    try:
        s = _session(model)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((max(batches), 3, size, size), dtype=np.float32)
        return {b: _run(s, x[:b]) for b in batches}
    except Exception as e:  # ORT's Fail/InvalidArgument/RuntimeException: a shape baked into the graph
        return first_line(e, 200)


def check_output(y: np.ndarray, batch: int, name: str) -> int:
    if y.ndim != 2 or y.shape[0] != batch:
        raise InputError(f"{name}'s output has shape {list(y.shape)} for a batch of {batch}, not [N, classes]",
                         "import a classifier whose output is logits or probabilities [N, classes]")
    return int(y.shape[1])


def make_batch(model, settings: ImportSettings, fixed: int | None, size: int, name: str) -> tuple[object, dict]:
    """Set the batch as asked: dynamic where the graph allows (proven at batch 1 and 3, each sample
    independent of the others), else the graph's fixed batch, kept and recorded."""
    import copy

    if settings.batch != "dynamic":
        n = int(settings.batch)
        set_input_shape(model, n, size)
        return model, {"batch": str(n), "batch_note": f"fixed batch {n}, as asked"}
    trial = copy.deepcopy(model)
    set_input_shape(trial, "batch", size)
    got = _probe(trial, _BATCH_PROBES, size, seed=0)
    if isinstance(got, dict):
        check_output(got[3], 3, name)
        if np.abs(got[3][:1] - got[1]).max() <= 1e-4 * max(float(np.abs(got[1]).max()), 1.0):
            note = "dynamic batch (was fixed at %d)" % fixed if fixed else "dynamic batch"
            return trial, {"batch": "dynamic", "batch_note": note}
        reason = "a sample's output depends on the rest of the batch"
    else:
        reason = got
    if fixed is None:
        raise InputError(f"{name} does not run at batch 1 and 3: {reason}", "export the model with a batch dim")
    set_input_shape(model, fixed, size)
    return model, {"batch": str(fixed), "batch_note": f"kept fixed batch {fixed}: the graph does not run with "
                                                      f"another batch ({reason})"}


# --- the stage -------------------------------------------------------------------------------

def import_onnx(settings: ImportSettings, out_path: str | os.PathLike) -> dict:
    """Check, convert and write the imported model atomically; returns the stage summary."""
    import onnx

    path = Path(settings.onnx)
    original = read_onnx(path)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    inp = graph_input(model, path)
    dims = _dims(inp)
    input_dtype = _TYPE_NAMES[inp.type.tensor_type.elem_type]
    spec = settings.preprocess
    if all(isinstance(d, int) and d > 0 for d in dims[2:]) and dims[2] != dims[3]:
        raise InputError(f"{path.name} takes {dims[2]}x{dims[3]} images; rexport's preprocessing crops a square",
                         "export the model with a square input (H == W) or with dynamic H, W")
    for d in dims[2:]:
        if isinstance(d, int) and d != spec.input_size:
            raise InputError(f"{path.name} takes {dims[2]}x{dims[3]} images but --input-size is {spec.input_size}",
                             f"pass --input-size {d} (and a --resize >= it)")
    if len(model.graph.output) != 1:
        raise InputError(f"{path.name} has {len(model.graph.output)} outputs; a classifier has one [N, classes]",
                         "export the model with its logits as the only output")
    source_opset = _opset(model)
    model = convert_opset(model, settings.opset, path)
    notes = float32_io(model)
    standard_io(model, inp)
    fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    model, batch_info = make_batch(model, settings, fixed, spec.input_size, path.name)
    probe_batch = 1 if batch_info["batch"] == "dynamic" else int(batch_info["batch"])
    model = onnx.shape_inference.infer_shapes(model, check_type=True)
    got = _probe(model, (probe_batch,), spec.input_size, seed=1)
    if isinstance(got, str):
        raise InputError(f"ONNX Runtime cannot run {path.name} as imported: {got}", "check the model in ONNX Runtime")
    num_classes = check_output(got[probe_batch], probe_batch, path.name)
    if spec.labels is not None and len(spec.labels) != num_classes:
        raise InputError(f"{len(spec.labels)} labels given for a model with {num_classes} classes",
                         "pass a labels file with one class name per line, one per class")
    # the rewrites must not change the numbers: the file as given, in ORT, on the same input
    ref = _probe(original, (probe_batch,), spec.input_size, seed=1)
    smoke = float(np.abs(got[probe_batch] - ref[probe_batch]).max()) if isinstance(ref, dict) else None
    fold = None
    if settings.fold_preprocessing:  # raw pixels in; proven against the float graph on the same images
        from rexport.pipeline.fold_preprocessing import fold_proved

        model, spec, fold = fold_proved(model, spec)
    file_sha = sha256_file(path)
    model.producer_name, model.producer_version = "rexport", __import__("rexport").__version__
    meta = {METADATA_KEY: spec.to_json(), "rexport.model": settings.model, "rexport.num_classes": str(num_classes),
            "rexport.weights_sha256": f"imported-onnx-{file_sha}", "rexport.source": "import",
            "rexport.fold_preprocessing": str(bool(settings.fold_preprocessing)).lower()}
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    if len(data) >= 2**31 - 1:
        raise InputError(f"{path.name} is larger than 2 GB and cannot be one ONNX file", "use a smaller model")
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(data)
    last = model.graph.node[-1].op_type
    return ImportSummary(
        model=settings.model, source=str(path), source_sha256=file_sha, num_classes=num_classes,
        random_weights=False, imported=True, input_dtype=input_dtype, source_opset=source_opset,
        opset=_opset(model), output="probabilities" if last == "Softmax" else "logits",
        batch=batch_info["batch"], batch_note=batch_info["batch_note"], notes=notes, nodes=len(model.graph.node),
        size_mib=round(len(data) / 2**20, 3), fold_preprocessing=settings.fold_preprocessing,
        fold_max_abs_error=fold, smoke_max_abs_error=smoke,
        smoke="imported file vs the file as given, ONNX Runtime, seeded input").to_json()


def run_import(run: RunDir, settings: ImportSettings, *, force: bool = False) -> dict:
    """The import stage: writes onnx/model.fp32.onnx in place of the export stage."""
    rel = VARIANT_FILES["fp32"]

    def action() -> StageOutcome:
        return StageOutcome(outputs=[rel], summary=import_onnx(settings, run.file(rel)))

    before = (run.stage("import") or {}).get("outputs", {}).get(rel)
    had_export = run.stage("export") is not None
    rec = run.run_stage("import", inputs={"onnx": settings.onnx}, settings=settings.to_record(), action=action,
                        force=force)
    if had_export or (before and rec["outputs"].get(rel) != before):
        drop_downstream(run, keep="import")
    run.manifest["model"] = settings.model
    run.manifest["preprocess"] = recorded_spec(settings).to_dict()
    run.save()
    return rec


def import_settings_from_options(*, onnx: str, opset: int | None, input_size: int | None, resize: int | None,
                                 mean, std, bgr: bool, labels: str | None, batch: str,
                                 fold_preprocessing: bool = False) -> ImportSettings:
    """ImportSettings from CLI-style options; the input size defaults to the graph's fixed H,W."""
    from rexport.pipeline.export import preprocess_from_options

    if input_size is None:
        model = read_onnx(onnx)
        dims = _dims(graph_input(model, Path(onnx)))
        input_size = dims[2] if isinstance(dims[2], int) and dims[2] > 0 else 224
    spec = preprocess_from_options(model=None, input_size=input_size, resize=resize, mean=mean, std=std, bgr=bgr,
                                   labels=labels)
    return ImportSettings(onnx=str(onnx), opset=DEFAULT_OPSET if opset is None else opset, batch=str(batch),
                          fold_preprocessing=fold_preprocessing, preprocess=spec)
