"""Export stage: PyTorch -> one self-contained, simplified FP32 ONNX with the preprocessing in
its metadata.

Exporter: torch's dynamo exporter (``torch.onnx.export(dynamo=True)``). The TorchScript exporter
is faster (about 1 s against 2-8 s) but deprecated; the dynamo one is where torch fixes bugs.
It always emits opset 18 or later and ignores a lower ``opset_version``, so for TensorRT 8.5/8.6
(JetPack 5/6.0) we rewrite the two opset-18 idioms it uses in a ResNet head (ReduceMean with
axes as an input, Reshape with ``allowzero``) into GlobalAveragePool + Flatten, which every
TensorRT parses, and then convert the graph down with ONNX's version converter.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError, first_line
from rexport.core.fsio import atomic_path
from rexport.core.preprocess import METADATA_KEY, PreprocessSpec
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.summaries import ExportSummary

DEFAULT_OPSET = 17          # loads in TensorRT 8.5 (JetPack 5) and every later TensorRT
MIN_OPSET, MAX_OPSET = 17, 21
MAX_DYNAMIC_BATCH = 1024


@dataclass(frozen=True)
class ExportSettings:
    model: str = "resnet18"
    weights: str | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False
    seed: int = 0
    opset: int = DEFAULT_OPSET
    batch: str = "dynamic"             # "dynamic" or a fixed batch size
    fold_preprocessing: bool = False   # the FP32 file (so every variant) takes raw uint8 NHWC pixels
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)

    def __post_init__(self) -> None:
        if not (MIN_OPSET <= self.opset <= MAX_OPSET):
            raise InputError(f"opset {self.opset} is not supported",
                             f"use an opset from {MIN_OPSET} to {MAX_OPSET} (17 for TensorRT 8.5 / JetPack 5)")
        from rexport.models.external import check_name, is_external
        from rexport.models.resnet import MODELS

        if is_external(self.model):
            check_name(self.model)
        elif self.model not in MODELS:
            raise InputError(f"unknown model {self.model!r}",
                             f"use one of: {', '.join(MODELS)}, timm:<name> or pkg.module:function")
        if self.batch != "dynamic" and not (str(self.batch).isdigit() and int(self.batch) >= 1):
            raise InputError(f"bad --batch {self.batch!r}", "use 'dynamic' or a positive integer")

    def to_record(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d


def _const(graph, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def portable_head(model):
    """Rewrite ReduceMean(axes=H,W, keepdims) -> GlobalAveragePool and a following
    Reshape(-1, C) -> Flatten (without keepdims: GlobalAveragePool + Flatten), so the graph converts
    to opset 17 and parses in TensorRT 8.5."""
    from onnx import helper

    g = model.graph
    pooled: set[str] = set()
    flattens: list[tuple[int, object]] = []
    for i, node in enumerate(list(g.node)):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "ReduceMean" and len(node.input) == 2:
            axes = _const(g, node.input[1])
            if axes is None or sorted(int(a) % 4 for a in axes.ravel()) != [2, 3]:
                continue
            name = node.name or f"gap_{i}"
            if attrs.get("keepdims", 1) == 1:
                g.node[i].CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=name))
                pooled.add(node.output[0])
            else:  # x.mean((2, 3)) in a user's model
                out = node.output[0]
                g.node[i].CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], [out + "_pooled"], name=name))
                flattens.append((i + 1, helper.make_node("Flatten", [out + "_pooled"], [out], name=name + "_flatten",
                                                         axis=1)))
        elif node.op_type == "Reshape" and node.input[0] in pooled:
            shape = _const(g, node.input[1])
            if shape is not None and shape.size == 2 and int(shape[0]) in (-1, 0):
                g.node[i].CopyFrom(helper.make_node("Flatten", [node.input[0]], list(node.output),
                                                    name=node.name or f"flatten_{i}", axis=1))
    for at, flatten in reversed(flattens):
        g.node.insert(at, flatten)
    return model


def example_input(settings: ExportSettings):
    """The seeded float NCHW batch the model is traced and smoke-tested with."""
    import torch

    batch = 2 if settings.batch == "dynamic" else int(settings.batch)
    shape = (3, settings.preprocess.input_size, settings.preprocess.input_size)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(settings.seed))


def output_classes(logits: np.ndarray, model: str) -> int:
    """The class count from the model's real output, which must be logits [N, classes]."""
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise InputError(f"{model} returns an output of shape {tuple(logits.shape)}, not [N, classes]",
                         "export an image classifier whose forward returns logits")
    return int(logits.shape[1])


def _to_onnx_model(torch_model, settings: ExportSettings):
    import torch

    x = example_input(settings)
    kwargs: dict = {}
    if settings.batch == "dynamic":
        # positional, not by name: a user's model may call its argument anything
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that torchvision's ops are not registered: irrelevant here
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(torch_model, (x,), None, dynamo=True,
                                        opset_version=max(settings.opset, 18), input_names=["input"],
                                        output_names=["logits"], verbose=False, optimize=True, **kwargs)
    except Exception as e:  # torch.export's UserError, TorchExportError...: the model's code does not trace
        summary = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("<class")),
                       first_line(e, None))
        raise InputError(f"torch.onnx.export cannot export {settings.model}: {summary[:300]}",
                         "make the model's forward traceable by torch.export (or export it yourself and "
                         "use 'rexport import --onnx')") from None
    finally:
        quiet.setLevel(level)
    model = program.model_proto
    model = portable_head(model)
    if settings.opset < 18:
        from onnx import version_converter

        model = version_converter.convert_version(model, settings.opset)
    return model, x


def _simplify(model):
    import onnxslim

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnxslim.slim(model)


def export_onnx(settings: ExportSettings, out_path: str | os.PathLike) -> dict:
    """Build the model, export it, simplify, check, and write ``out_path`` atomically.

    Returns a summary (node counts, ops, size, random-init flag, the PyTorch-vs-ORT smoke error).
    """
    import onnx
    import onnxruntime as ort
    import torch

    from rexport.models.checkpoint import load_model

    loaded = load_model(settings.model, settings.weights, num_classes=settings.num_classes,
                        trust_checkpoint=settings.trust_checkpoint, seed=settings.seed)
    spec = settings.preprocess
    with torch.inference_mode():
        ref = loaded.model(example_input(settings)).numpy()
    num_classes = output_classes(ref, settings.model)
    if spec.labels is not None and len(spec.labels) != num_classes:
        raise InputError(f"{len(spec.labels)} labels given for a model with {num_classes} classes",
                         "pass a labels file with one class name per line, one per class")
    model, x = _to_onnx_model(loaded.model, settings)
    model = _simplify(model)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.numpy()})[0]
    fold = None
    if settings.fold_preprocessing:  # raw pixels in; proven against the float graph on the same images
        from rexport.pipeline.fold_preprocessing import fold_proved

        model, spec, fold = fold_proved(model, spec)
    model.producer_name, model.producer_version = "rexport", __import__("rexport").__version__
    meta = {METADATA_KEY: spec.to_json(), "rexport.model": settings.model,
            "rexport.num_classes": str(num_classes),
            "rexport.weights_sha256": loaded.weights_sha256 or f"random-init-seed-{settings.seed}"}
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)

    data = model.SerializeToString()
    if len(data) >= 2**31 - 1:  # protobuf limit; no ResNet here comes close (resnet152 is 240 MB)
        raise InputError("model is larger than 2 GB and cannot be one ONNX file", "use a smaller model")
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(data)
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ExportSummary(
        model=settings.model, num_classes=num_classes, random_weights=loaded.random_weights,
        weights_sha256=loaded.weights_sha256, opset=settings.opset, batch=settings.batch,
        nodes=len(model.graph.node), ops=ops, size_mib=round(len(data) / 2**20, 3),
        smoke_max_abs_error=float(np.abs(got - ref).max()),
        fold_preprocessing=settings.fold_preprocessing, fold_max_abs_error=fold,
    ).to_json()


def run_export(run: RunDir, settings: ExportSettings, *, force: bool = False) -> dict:
    """The export stage: writes onnx/model.fp32.onnx and records it in the manifest. Given the
    ImportSettings of an ONNX file (``--onnx``), it is the import stage instead."""
    if getattr(settings, "onnx", None):
        from rexport.pipeline.import_onnx import run_import

        return run_import(run, settings, force=force)
    rel = VARIANT_FILES["fp32"]
    record = settings.to_record()

    def action() -> StageOutcome:
        summary = export_onnx(settings, run.file(rel))
        return StageOutcome(outputs=[rel], summary=summary)

    before = (run.stage("export") or {}).get("outputs", {}).get(rel)
    had_import = run.stage("import") is not None
    rec = run.run_stage("export", inputs={"weights": settings.weights}, settings=record, action=action, force=force)
    if had_import or (before and rec["outputs"].get(rel) != before):
        drop_downstream(run)
    run.manifest["model"] = settings.model
    run.manifest["preprocess"] = recorded_spec(settings).to_dict()
    run.save()
    return rec


def recorded_spec(settings) -> PreprocessSpec:
    """The spec the FP32 file carries: raw pixels in when the run folds its preprocessing."""
    if settings.fold_preprocessing:
        from rexport.pipeline.fold_preprocessing import raw_pixel_spec

        return raw_pixel_spec(settings.preprocess)
    return settings.preprocess


#: what later stages made from the FP32 export; a new export makes all of it stale
DOWNSTREAM = ("onnx/model.fp16.onnx", "onnx/model.int8.onnx", "calibration", "engines", "validate", "eval",
              "bench", "report")


def drop_downstream(run: RunDir, keep: str = "export") -> None:
    """Remove every artifact and stage record made from a previous export (or import), so no stale
    variant is validated, benchmarked or reported against the new model. ``keep``: the stage that
    just made the FP32 file."""
    import shutil

    for rel in DOWNSTREAM:
        p = run.file(rel)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    run.manifest["stages"] = {keep: run.manifest["stages"][keep]}
    run.save()
    run.log(f"{keep} changed the FP32 model: removed everything made from the previous one")


def read_labels(path: str | os.PathLike) -> tuple[str, ...]:
    """Class names, one per line (blank lines ignored)."""
    p = Path(path)
    try:
        labels = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read labels file {p}: {getattr(e, 'strerror', None) or e}",
                         "pass a UTF-8 text file with one class name per line") from None
    if not labels:
        raise InputError(f"labels file {p} is empty", "pass one class name per line")
    return labels


def preprocess_from_options(*, model: str | None, input_size: int | None, resize: int | None, mean, std,
                            bgr: bool, labels: str | None) -> PreprocessSpec:
    """The preprocessing spec from CLI-style options; what the user left out comes from timm's
    pretrained config for a timm model, else ImageNet's defaults (224, resize 256)."""
    base: dict = {}
    if model and model.startswith("timm:") and None in (input_size, resize, mean, std):
        from rexport.models.external import timm_preprocess

        base = timm_preprocess(model)
    size = input_size or base.get("input_size", 224)
    if resize is None:
        resize = base["resize"] if input_size is None and "resize" in base else round(size * 256 / 224)
    return PreprocessSpec(
        input_size=size, resize=resize,
        mean=tuple(mean) if mean else base.get("mean", PreprocessSpec.mean),
        std=tuple(std) if std else base.get("std", PreprocessSpec.std),
        channel_order="BGR" if bgr else "RGB",
        interpolation=base.get("interpolation", PreprocessSpec.interpolation),
        labels=read_labels(labels) if labels else None,
    )


def export_settings_from_options(*, model: str, weights: str | None, num_classes: int | None,
                                 trust_checkpoint: bool, seed: int, opset: int | None, input_size: int | None,
                                 resize: int | None, mean, std, bgr: bool, labels: str | None,
                                 batch: str, fold_preprocessing: bool = False) -> ExportSettings:
    """ExportSettings from CLI-style options (defaults filled in, labels read). A timm model's
    defaults come from timm's pretrained config, the rest from ImageNet's."""
    spec = preprocess_from_options(model=model, input_size=input_size, resize=resize, mean=mean, std=std,
                                   bgr=bgr, labels=labels)
    if weights is not None and not Path(weights).is_file():
        raise InputError(f"checkpoint {weights} not found", "pass an existing .pth/.pt/.safetensors file")
    return ExportSettings(model=model, weights=str(weights) if weights else None, num_classes=num_classes,
                          trust_checkpoint=trust_checkpoint, seed=seed,
                          opset=DEFAULT_OPSET if opset is None else opset, batch=str(batch),
                          fold_preprocessing=bool(fold_preprocessing), preprocess=spec)
