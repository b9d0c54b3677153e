"""What every deployment layout needs to know about a variant, read from the files themselves.

A layout writer (Triton, DeepStream, OVMS) gets a list of ``DeployModel``: the files to copy, the
I/O names, dims and dtypes read from the ONNX graph, the OpenVINO IR or a plan's sidecar, and
the batch sizes the server may form (from the engine profile, else from the bench).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.manifest import VARIANT_FILES, RunDir

#: The runtime kind of a variant: an ONNX file, an OpenVINO IR or a TensorRT plan.
KINDS = ("onnx", "openvino", "tensorrt")
DEFAULT_MAX_BATCH = 8       # an ONNX/IR with a dynamic batch and no bench: what the server may batch up to


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]      # with the batch axis; -1 where dynamic
    dtype: str                  # numpy name: float32, uint8, ...


@dataclass(frozen=True)
class Batching:
    """``max_batch`` 0 means the model has a fixed batch (the server must not batch it)."""

    max_batch: int
    preferred: tuple[int, ...] = ()
    source: str = ""            # where the numbers came from, for the README


@dataclass
class DeployModel:
    variant: str
    kind: str                               # one of KINDS
    precision: str
    files: dict[str, Path]                  # name in the layout -> file in the run
    inputs: list[Tensor]
    outputs: list[Tensor]
    batching: Batching
    sidecar: dict | None = None
    source_onnx: Path | None = None         # the ONNX a plan was built from (a fallback for nvinfer)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LayoutContext:
    """Everything a layout writer needs besides the models."""

    run: RunDir
    name: str                       # the model's name in server paths: resnet18, timm_resnet50...
    spec: PreprocessSpec
    labels: tuple[str, ...]         # class names (indices as names when the run has none)
    folded: bool                    # the ONNX takes raw pixels (export --fold-preprocessing)
    queue_delay_us: int
    check_images: tuple[Path, ...] = ()


def server_name(model: str) -> str:
    """A model name usable as a folder and URL path element: 'timm:resnet50' -> 'timm_resnet50'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_.") or "model"


def served_name(ctx: "LayoutContext", variant: str) -> str:
    """The model's name on the server and its folder in every layout: resnet18_int8, resnet18_openvino-int8."""
    return f"{ctx.name}_{variant}"


def onnx_io(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """Graph inputs (initializers excluded) and outputs of an ONNX file, without loading its weights."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}

    def tensor(vi) -> Tensor:
        t = vi.type.tensor_type
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return Tensor(vi.name, dims, str(tensor_dtype_to_np_dtype(t.elem_type)))

    return [tensor(v) for v in graph.input if v.name not in inits], [tensor(v) for v in graph.output]


def openvino_io(xml: Path) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of an OpenVINO IR as OpenVINO reads it (the model, not our sidecar)."""
    import openvino as ov

    from rexport.pipeline.backends.openvino import _port_info

    model = ov.Core().read_model(str(xml))

    def tensor(port) -> Tensor:
        info = _port_info(port)
        return Tensor(info["name"], tuple(info["shape"]), info["dtype"])

    return [tensor(p) for p in model.inputs], [tensor(p) for p in model.outputs]


def sidecar_io(sidecar: dict) -> tuple[list[Tensor], list[Tensor]]:
    """A plan's I/O as its build recorded it (a plan cannot be opened without TensorRT and a GPU)."""
    def tensors(items) -> list[Tensor]:
        return [Tensor(t["name"], tuple(int(d) for d in t["shape"]), t["dtype"]) for t in items]

    return tensors(sidecar["io"]["inputs"]), tensors(sidecar["io"]["outputs"])


def bench_batch_sizes(run: RunDir, variant: str) -> list[int]:
    """Batch sizes the bench stage timed successfully for ``variant`` (empty without a bench)."""
    from rexport.core.fsio import read_json

    path = run.file("bench/results.json")
    if not path.is_file():
        return []
    try:
        rows = read_json(path).get("rows") or []
    except ValueError:
        return []
    return sorted({int(r["batch"]) for r in rows if r.get("variant") == variant and r.get("status") == "ok"})


def batching_for(run: RunDir, variant: str, inputs: list[Tensor], profile: dict | None) -> Batching:
    """The batch sizes a server may form: an engine profile bounds them, else the bench's sizes."""
    batch_dim = inputs[0].shape[0] if inputs and inputs[0].shape else -1
    if batch_dim > 0 and not (profile and profile.get("max", [0])[0] > batch_dim):
        return Batching(0, (), f"fixed batch {batch_dim} in the model file")
    bench = bench_batch_sizes(run, variant)
    if profile:
        lo, opt, hi = (int(profile[k][0]) for k in ("min", "opt", "max"))
        preferred = sorted({b for b in [*bench, opt] if lo <= b <= hi})
        return Batching(hi, tuple(preferred), f"engine profile min {lo} / opt {opt} / max {hi}"
                        + (f", bench batch sizes {bench}" if bench else ""))
    if bench:
        return Batching(max(bench), tuple(bench), f"bench batch sizes {bench}")
    return Batching(DEFAULT_MAX_BATCH, (), f"no bench and no profile: default max batch {DEFAULT_MAX_BATCH}")


def collect_models(run: RunDir, variants: list[str], engines: dict[str, Path], sidecars: dict[str, dict]
                   ) -> list[DeployModel]:
    """One DeployModel per variant, I/O read from the file that will be served."""
    models = []
    for v in variants:
        if v in VARIANT_FILES:
            path = run.file(VARIANT_FILES[v])
            inputs, outputs = onnx_io(path)
            models.append(DeployModel(v, "onnx", _precision(v), {"model.onnx": path}, inputs, outputs,
                                      batching_for(run, v, inputs, None)))
            continue
        sc, d = sidecars[v], engines[v]
        kind = str(sc["backend"])
        if kind == "openvino":
            inputs, outputs = openvino_io(d / "model.xml")
            files = {"model.xml": d / "model.xml", "model.bin": d / "model.bin"}
            profile = None
        elif kind == "tensorrt":
            inputs, outputs = sidecar_io(sc)
            files = {"model.plan": d / next(iter(sc["engine_files"]))}
            profile = sc.get("profile")
        else:
            raise InputError(f"engine {v} has backend {kind!r}, which no deployment layout knows",
                             f"bundle one of: {', '.join(KINDS)}")
        src_variant = (sc.get("source_onnx") or {}).get("variant")
        src = run.file(VARIANT_FILES[src_variant]) if src_variant in VARIANT_FILES else None
        models.append(DeployModel(v, kind, str(sc["precision"]), files, inputs, outputs,
                                  batching_for(run, v, inputs, profile), sidecar=sc,
                                  source_onnx=src if src is not None and src.is_file() else None))
    return models


def _precision(variant: str) -> str:
    """'fp32' for 'fp32', 'int8' for 'int8' and 'int8-openvino' (an ONNX variant's numeric precision)."""
    return variant.split("-", 1)[0]


def variant_kind(variant: str, sidecars: dict[str, dict]) -> str:
    return "onnx" if variant in VARIANT_FILES else str(sidecars[variant]["backend"])


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    os.chmod(dst, 0o644)


def labels_for(spec: PreprocessSpec, outputs: list[Tensor]) -> tuple[str, ...]:
    """The class names, or the class indices when the run has none (servers need a name per class)."""
    if spec.labels:
        return tuple(spec.labels)
    n = outputs[0].shape[-1] if outputs and outputs[0].shape else -1
    return tuple(str(i) for i in range(max(n, 0)))


def tensor_summary(t: Tensor) -> str:
    return f"{t.name} {t.dtype} {list(t.shape)}"


@dataclass
class Layout:
    """What a writer made: per variant its entry for bundle.json, the README's lines, warnings to show."""

    contents: dict[str, dict] = field(default_factory=dict)
    readme: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def numbered_versions(model_dir: Path) -> list[Path]:
    """The numeric version folders of a served model (Triton and OVMS both serve ``<model>/<n>/``), newest last."""
    return sorted((d for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))


def input_note(ctx: LayoutContext) -> str:
    """What a client sends: raw pixels to a folded model, else preprocess.json's preprocessing."""
    s = ctx.spec
    if ctx.folded:
        return "Input: raw RGB pixels (the model normalises them itself: exported with --fold-preprocessing)."
    return (f"Input: the client preprocesses (preprocess.json): resize shorter side to {s.resize}, centre crop "
            f"{s.input_size}, /255, mean {list(s.mean)} std {list(s.std)}, {s.channel_order}, NCHW float32; "
            "class names in labels.txt.")
