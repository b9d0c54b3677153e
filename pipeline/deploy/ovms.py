"""An OpenVINO Model Server layout: ``<name>_<variant>/1/model.xml+bin`` (or ``model.onnx``) and a
``config.json`` listing each with the engine's load settings in ``plugin_config``.

Why plugin_config: an IR's precision is decided when it is compiled. On a CPU with BF16 the CPU
plugin's default inference precision is bf16, so without INFERENCE_PRECISION_HINT f32 OVMS would
serve an "fp32" or "int8" engine with different numerics than the ones we validated.
"""
from __future__ import annotations

import json
from pathlib import Path

from rexport.core.errors import InputError
from rexport.pipeline.deploy.common import (DeployModel, Layout, LayoutContext, copy_file, input_note,
                                            numbered_versions, served_name, tensor_summary, write_json)

CONFIG = "config.json"
DEVICE = "CPU"


def plugin_config(m: DeployModel) -> dict:
    """The load settings our OpenVINO loader uses for this model (the sidecar's, or the backend's for an ONNX)."""
    if m.sidecar is not None:
        load = dict(m.sidecar.get("load_settings") or {})
    else:
        from rexport.pipeline.backends.openvino import OpenVINOBackend

        # an ONNX compiles like the engine built from it: int8 Q/DQ keeps f32 for its float parts
        load = OpenVINOBackend().load_settings("int8" if m.precision == "int8" else "fp32")
    return {k: (str(v) if not isinstance(v, int) else v) for k, v in load.items()}


def config_json(models: list[DeployModel], ctx: LayoutContext) -> dict:
    return {"model_config_list": [
        {"config": {"name": served_name(ctx, m.variant), "base_path": served_name(ctx, m.variant),
                    "target_device": DEVICE, "plugin_config": plugin_config(m)}} for m in models]}


def write(root: Path, models: list[DeployModel], ctx: LayoutContext) -> Layout:
    layout = Layout()
    for m in models:
        name = served_name(ctx, m.variant)
        for dst, src in m.files.items():
            copy_file(src, root / name / "1" / dst)
        if m.sidecar is not None:
            write_json(root / name / "sidecar.json", m.sidecar)
        layout.contents[m.variant] = {"kind": m.kind, "path": name, "config": CONFIG, "server_model": name,
                                      "precision": m.precision, "plugin_config": plugin_config(m)}
    write_json(root / CONFIG, config_json(models, ctx))
    (root / "labels.txt").write_text("".join(f"{label}\n" for label in ctx.labels), encoding="utf-8")
    layout.readme = _readme(models, ctx)
    return layout


def _readme(models: list[DeployModel], ctx: LayoutContext) -> list[str]:
    lines = [
        "OpenVINO Model Server layout", "",
        "Start the server on it (gRPC 9000, REST 8000):", "",
        "  docker run --rm -p 9000:9000 -p 8000:8000 -v $PWD:/models:ro openvino/model_server:latest "
        "--config_path /models/config.json --port 9000 --rest_port 8000",
        "  # or, with the OVMS binary package: ovms --config_path config.json --port 9000 --rest_port 8000",
        "",
        "base_path in config.json is relative to config.json. Each model's plugin_config carries the load settings",
        "it was validated with (INFERENCE_PRECISION_HINT f32 keeps a BF16 CPU from running it in bf16).",
        "Check it loaded: curl localhost:8000/v2/models/<model>/ready", "",
        "Models:",
    ]
    for m in models:
        lines.append(f"  {served_name(ctx, m.variant):32s} {m.kind:9s} plugin_config {json.dumps(plugin_config(m))}")
        lines += [f"      input  {tensor_summary(t)}" for t in m.inputs]
        lines += [f"      output {tensor_summary(t)}" for t in m.outputs]
    lines += ["", input_note(ctx)]
    return lines


# -- loading a model the way OVMS does ---------------------------------------------------------

def read_config(root: Path) -> dict:
    path = root / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        entries = [e["config"] for e in config["model_config_list"]]
        assert all(isinstance(e["name"], str) and isinstance(e["base_path"], str) for e in entries)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise InputError(f"{path} is not an OVMS config (model_config_list of {{config: {{name, base_path}}}})",
                         "bundle again with --format ovms") from None
    return {e["name"]: e for e in entries}


def served_models(root: Path) -> list[str]:
    return sorted(read_config(root)) if (root / CONFIG).is_file() else []


def model_path(root: Path, entry: dict) -> Path:
    """The file OVMS loads for a config entry: the newest numeric version under base_path."""
    base = Path(entry["base_path"])
    base = base if base.is_absolute() else root / base
    versions = numbered_versions(base) if base.is_dir() else []
    if not versions:
        raise InputError(f"{base} has no numeric version folder (named by {root / CONFIG})", "bundle again")
    for name in ("model.xml", "model.onnx"):
        if (versions[-1] / name).is_file():
            return versions[-1] / name
    raise InputError(f"{versions[-1]} holds no model.xml or model.onnx", "bundle again")


def open_served(root: Path, name: str, spec, folded: bool):
    """``name`` as OVMS loads it: the newest version under base_path, compiled with its plugin_config."""
    from rexport.pipeline.deploy.common import onnx_io, openvino_io
    from rexport.pipeline.deploy.serving import Served, ServedTensor, client_input, open_openvino

    entries = read_config(root)
    if name not in entries:
        raise InputError(f"no model {name!r} in {root / CONFIG}", f"choose from: {', '.join(sorted(entries))}")
    entry = entries[name]
    path = model_path(root, entry)
    inputs, outputs = openvino_io(path) if path.suffix == ".xml" else onnx_io(path)
    declared = ServedTensor(inputs[0].name, inputs[0].shape, inputs[0].dtype)
    runner = open_openvino(path, declared, [(t.name, t.shape) for t in outputs], entry.get("plugin_config") or {},
                           device=entry.get("target_device", DEVICE))
    labels_file = root / "labels.txt"
    labels = tuple(labels_file.read_text(encoding="utf-8").splitlines()) if labels_file.is_file() else ()
    return Served(runner, declared, lambda image: client_input(image, spec, declared, folded), labels,
                  f"OVMS {path.relative_to(root)} with plugin_config {entry.get('plugin_config') or {}}", path)
