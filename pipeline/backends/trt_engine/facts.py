"""The sidecar.json of a plan: rexport's schema 1, read by rexport.pipeline.backends.sidecar."""
from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path

from .build import BuildResult

SIDECAR_SCHEMA = 1          # rexport.pipeline.backends.sidecar reads this schema
PLAN_FILE = "model.plan"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_sidecar(result: BuildResult, engine_dir, device: dict, *, source_onnx, source_variant: str,
                 preprocess: dict, built_by: str, runtime_extra: dict | None = None,
                 cuda_graphs: bool = False) -> dict:
    """The sidecar.json of a plan already written to ``engine_dir/model.plan`` (rexport's schema 1)."""
    source_onnx = Path(source_onnx)
    return {
        "schema_version": SIDECAR_SCHEMA, "backend": "tensorrt", "precision": result.record["precision"],
        "engine_files": {PLAN_FILE: sha256_file(Path(engine_dir) / PLAN_FILE)},
        "source_onnx": {"file": source_onnx.name, "sha256": sha256_file(source_onnx), "variant": source_variant},
        "runtime": {"tensorrt": result.version, "cuda": device.get("cuda_driver"), "built_by": built_by,
                    **(runtime_extra or {})},
        "device": {"kind": "gpu", "name": device.get("name"), "compute_capability": device.get("compute_capability"),
                   "integrated": device.get("integrated"), "dla_core": result.record.get("dla_core")},
        "io": result.io, "profile": result.profile, "build_settings": result.record,
        "load_settings": {"cuda_graphs": bool(cuda_graphs), "optimization_profile": 0},
        "build_seconds": round(float(result.seconds), 3), "preprocess": dict(preprocess),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
