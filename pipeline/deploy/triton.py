"""A Triton Inference Server model repository: ``model_repository/<name>_<variant>/config.pbtxt`` and
``1/model.onnx`` (onnxruntime_onnx), ``1/model.plan`` (tensorrt_plan) or ``1/model.xml+bin`` (openvino).

The config is written as protobuf text in Triton's ModelConfig schema (tests parse it with
tritonclient's model_config_pb2). Names, dims and dtypes come from the served file itself.
"""
from __future__ import annotations

from pathlib import Path

from rexport.core.errors import InputError, MissingDependency
from rexport.pipeline.deploy.common import (DeployModel, Layout, LayoutContext, copy_file, input_note,
                                            numbered_versions, served_name, tensor_summary, write_json)

REPOSITORY = "model_repository"
PLATFORM = {"onnx": ("platform", "onnxruntime_onnx"), "tensorrt": ("platform", "tensorrt_plan"),
            "openvino": ("backend", "openvino")}
MODEL_FILE = {"onnx": "model.onnx", "tensorrt": "model.plan", "openvino": "model.xml"}
INSTANCE_KIND = {"onnx": "KIND_CPU", "tensorrt": "KIND_GPU", "openvino": "KIND_CPU"}
DATA_TYPE = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "uint8": "TYPE_UINT8",
             "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
             "bool": "TYPE_BOOL", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64"}
NUMPY_TYPE = {v: k for k, v in DATA_TYPE.items()}
#: The OpenVINO backend's parameters (triton-inference-server/openvino_backend, src/openvino.cc
#: ParseParameters): it has no INFERENCE_PRECISION_HINT, only HINT_BF16=YES.
OPENVINO_PARAMETERS = ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS", "HINT_BF16")
LABELS = "labels.txt"


def _dims(shape: tuple[int, ...], batched: bool) -> str:
    return ", ".join(str(d) for d in (shape[1:] if batched else shape))


def _data_type(dtype: str, what: str) -> str:
    if dtype not in DATA_TYPE:
        raise InputError(f"{what} has dtype {dtype}, which Triton has no type for", "export a float32 model")
    return DATA_TYPE[dtype]


def openvino_parameters(m: DeployModel) -> dict[str, str]:
    """The engine's load settings that Triton's OpenVINO backend can express."""
    load = (m.sidecar or {}).get("load_settings") or {}
    params = {k: str(load[k]) for k in ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS") if k in load}
    if load.get("INFERENCE_PRECISION_HINT") == "bf16":
        params["HINT_BF16"] = "YES"
    return params


def config_text(m: DeployModel, ctx: LayoutContext) -> str:
    """config.pbtxt for one variant (protobuf text of inference.ModelConfig)."""
    key, value = PLATFORM[m.kind]
    batched = m.batching.max_batch > 0
    lines = [f'name: "{served_name(ctx, m.variant)}"', f'{key}: "{value}"', f"max_batch_size: {m.batching.max_batch}"]
    lines.append("input [")
    lines.append(",\n".join(f'  {{\n    name: "{t.name}"\n    data_type: {_data_type(t.dtype, t.name)}\n'
                            f"    dims: [ {_dims(t.shape, batched)} ]\n  }}" for t in m.inputs))
    lines.append("]")
    lines.append("output [")
    outs = []
    for i, t in enumerate(m.outputs):
        label = f'\n    label_filename: "{LABELS}"' if i == 0 else ""
        outs.append(f'  {{\n    name: "{t.name}"\n    data_type: {_data_type(t.dtype, t.name)}\n'
                    f"    dims: [ {_dims(t.shape, batched)} ]{label}\n  }}")
    lines.append(",\n".join(outs))
    lines.append("]")
    if batched:
        preferred = [b for b in m.batching.preferred if 1 < b <= m.batching.max_batch]
        body = (f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else "")
        lines.append(f"dynamic_batching {{\n{body}  max_queue_delay_microseconds: {ctx.queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: 1\n    kind: {INSTANCE_KIND[m.kind]}\n  }}\n]")
    if m.kind == "openvino":
        for k, v in openvino_parameters(m).items():
            lines.append(f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}')
    return "\n".join(lines) + "\n"


def write(root: Path, models: list[DeployModel], ctx: LayoutContext) -> Layout:
    layout = Layout()
    repo = root / REPOSITORY
    for m in models:
        name = served_name(ctx, m.variant)
        folder = repo / name
        for dst, src in m.files.items():
            copy_file(src, folder / "1" / dst)
        if m.sidecar is not None:   # beside the engine file: Triton ignores it, our loader reads the pair
            write_json(folder / "1" / "sidecar.json", m.sidecar)
        (folder / LABELS).write_text("".join(f"{label}\n" for label in ctx.labels), encoding="utf-8")
        (folder / "config.pbtxt").write_text(config_text(m, ctx), encoding="utf-8")
        entry = {"kind": m.kind, "path": f"{REPOSITORY}/{name}", "config": f"{REPOSITORY}/{name}/config.pbtxt",
                 "server_model": name, "precision": m.precision, "batching": m.batching.source}
        if m.kind == "tensorrt":
            entry["tensorrt"] = ((m.sidecar or {}).get("runtime") or {}).get("tensorrt")
        layout.contents[m.variant] = entry
    layout.readme = _readme(models, ctx, layout)
    layout.warnings = [w for m in models for w in _warnings(m)]
    return layout


def _warnings(m: DeployModel) -> list[str]:
    if m.kind == "openvino" and m.precision != "bf16":
        return [f"triton {m.variant}: Triton's OpenVINO backend cannot force f32 inference (it has no "
                "INFERENCE_PRECISION_HINT parameter): on a CPU with AVX512_BF16/AMX it runs this engine in bf16; "
                "serve the ONNX variant or use --format ovms there"]
    return []


def _readme(models: list[DeployModel], ctx: LayoutContext, layout: Layout) -> list[str]:
    gpu = any(m.kind == "tensorrt" for m in models)
    trt = sorted({e["tensorrt"] for e in layout.contents.values() if e.get("tensorrt")})
    tag = "<yy.mm>-py3"
    lines = [
        "Triton Inference Server model repository", "",
        "Start the server on it (HTTP 8000, gRPC 8001, metrics 8002):", "",
        f"  docker run --rm {'--gpus=all ' if gpu else ''}-p8000:8000 -p8001:8001 -p8002:8002 "
        f"-v $PWD/{REPOSITORY}:/models nvcr.io/nvidia/tritonserver:{tag} tritonserver --model-repository=/models",
        "",
        "<yy.mm>: a Triton release; " + (f"its TensorRT must be exactly {', '.join(trt)}, the version that built "
                                         "the plan (sidecar.json runtime.tensorrt; NVIDIA's frameworks support matrix "
                                         "lists the TensorRT of each release)." if trt else "any recent one."),
        "Check it loaded: curl localhost:8000/v2/models/<model>/ready ; classify with the classification extension "
        "(class names come from labels.txt).", "",
        "Models:",
    ]
    for m in models:
        e = layout.contents[m.variant]
        lines.append(f"  {e['server_model']:32s} {PLATFORM[m.kind][1]:17s} {INSTANCE_KIND[m.kind]}  "
                     f"max_batch_size {m.batching.max_batch} ({m.batching.source})")
        lines += [f"      input  {tensor_summary(t)}" for t in m.inputs]
        lines += [f"      output {tensor_summary(t)}" for t in m.outputs]
        if m.kind == "tensorrt":
            lines.append(f"      needs TensorRT {e.get('tensorrt')} and a GPU like {(m.sidecar or {}).get('device', {}).get('name')}")
    lines += ["", input_note(ctx)]
    lines += [f"warning: {w}" for m in models for w in _warnings(m)]
    return lines


# -- loading a model the way Triton does -------------------------------------------------------

def parse_config(path: Path):
    """config.pbtxt parsed with Triton's own schema (tritonclient's model_config_pb2)."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), model_config_class()())
    except text_format.ParseError as e:
        raise InputError(f"{path} is not a valid Triton model config: {e}", "bundle again") from None


def model_config_class():
    """inference.ModelConfig from tritonclient, imported without its grpc client (it needs only protobuf)."""
    import importlib.util
    import sys

    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("reading a Triton config needs tritonclient's model_config_pb2",
                                "pip install tritonclient (or 'rexport[deploy]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("rexport_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(mod_spec)
    cached = sys.modules.setdefault(mod_spec.name, module)
    if cached is module:
        mod_spec.loader.exec_module(module)
    return cached.ModelConfig


def served_models(root: Path) -> list[str]:
    repo = root / REPOSITORY
    return sorted(d.name for d in repo.iterdir() if (d / "config.pbtxt").is_file()) if repo.is_dir() else []


def open_served(root: Path, name: str, spec, folded: bool):
    """``name`` as Triton would load it (refusing what Triton would refuse), fed as a client would."""
    from rexport.pipeline.deploy.serving import Served, ServedTensor, client_input, open_onnx, open_openvino, open_plan

    folder = root / REPOSITORY / name
    config = parse_config(folder / "config.pbtxt")
    if config.name and config.name != name:
        raise InputError(f"{folder}/config.pbtxt names model {config.name!r}, its folder is {name!r}",
                         "Triton refuses this: bundle again")
    versions = numbered_versions(folder)
    if not versions:
        raise InputError(f"{folder} has no numeric version folder", "bundle again")
    kind = {"onnxruntime_onnx": "onnx", "tensorrt_plan": "tensorrt"}.get(config.platform) \
        or ("openvino" if config.backend == "openvino" else None)
    if kind is None:
        raise InputError(f"{name}: unknown platform/backend {config.platform or config.backend!r}", "bundle again")
    path = versions[-1] / (config.default_model_filename or MODEL_FILE[kind])
    if not path.is_file():
        raise InputError(f"{path} not found (named by {folder}/config.pbtxt)", "bundle again")
    batched = config.max_batch_size > 0
    inp = config.input[0]
    declared = ServedTensor(inp.name, ((-1,) if batched else ()) + tuple(inp.dims), NUMPY_TYPE[_type_name(inp.data_type)])
    declared_out = [(o.name, ((-1,) if batched else ()) + tuple(o.dims)) for o in config.output]
    if kind == "onnx":
        runner = open_onnx(path, declared, declared_out)
    elif kind == "openvino":
        props = {p: config.parameters[p].string_value for p in config.parameters}
        unknown = sorted(set(props) - set(OPENVINO_PARAMETERS))
        if unknown:
            raise InputError(f"{name}: parameters {unknown} are not supported by Triton's openvino backend",
                             "bundle again")
        runner = open_openvino(path, declared, declared_out, _openvino_properties(props))
    else:
        runner = open_plan(path, declared, declared_out)
    label_file = next((o.label_filename for o in config.output if o.label_filename), "")
    labels = tuple((folder / label_file).read_text(encoding="utf-8").splitlines()) if label_file else ()
    return Served(runner, declared, lambda image: client_input(image, spec, declared, folded), labels,
                  f"Triton {config.platform or config.backend} from {path.relative_to(root)}", path)


def _type_name(value: int) -> str:
    from google.protobuf import descriptor_pool

    enum = descriptor_pool.Default().FindEnumTypeByName("inference.DataType")
    return enum.values_by_number[value].name


def _openvino_properties(params: dict[str, str]) -> dict:
    """What Triton's OpenVINO backend passes to compile_model for these parameters (src/openvino.cc)."""
    props: dict = {}
    if "PERFORMANCE_HINT" in params:
        props["PERFORMANCE_HINT"] = params["PERFORMANCE_HINT"].upper()
    if "INFERENCE_NUM_THREADS" in params:
        props["INFERENCE_NUM_THREADS"] = int(params["INFERENCE_NUM_THREADS"])
    if "NUM_STREAMS" in params:
        props["NUM_STREAMS"] = params["NUM_STREAMS"].upper()
    if params.get("HINT_BF16", "").upper() == "YES":
        props["INFERENCE_PRECISION_HINT"] = "bf16"
    return props
