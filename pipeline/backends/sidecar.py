"""``sidecar.json``: what an engine is, what it was built from and how it must be loaded.

Every engine folder (``engines/<backend>-<precision>/``) carries one. Loading goes through it:
the engine files must hash to what was built, and the backend checks the recorded runtime and
device against this machine before it hands out a runner, so a stale or foreign engine is
refused with a reason instead of running with different numerics.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from rexport.pipeline.runners import Runner

SIDECAR_SCHEMA = 1
SIDECAR_NAME = "sidecar.json"
REQUIRED_KEYS = ("schema_version", "backend", "precision", "engine_files", "source_onnx", "runtime", "device",
                 "io", "profile", "build_settings", "load_settings", "build_seconds", "preprocess", "created")


def make_sidecar(*, backend: str, precision: str, engine_dir: Path, engine_files: list[str], source_onnx: Path,
                 source_variant: str, runtime: dict, device: dict, io: dict, profile: dict | None,
                 build_settings: dict, load_settings: dict, build_seconds: float, preprocess: dict) -> dict:
    """The sidecar of an engine whose files (names relative to ``engine_dir``) are already written.

    ``io`` is {"inputs": [{"name", "shape", "dtype"}], "outputs": [...]}, dynamic dimensions as -1.
    """
    engine_dir, source_onnx = Path(engine_dir), Path(source_onnx)
    hashes = {}
    for name in engine_files:
        p = engine_dir / name
        if not p.is_file():
            raise InputError(f"engine file {p} was not written by the {backend} build",
                             f"rebuild with 'rexport build --backend {backend} --precision {precision}'")
        hashes[name] = sha256_file(p)
    return {
        "schema_version": SIDECAR_SCHEMA,
        "backend": backend,
        "precision": precision,
        "engine_files": hashes,
        "source_onnx": {"file": source_onnx.name, "sha256": sha256_file(source_onnx), "variant": source_variant},
        "runtime": dict(runtime),
        "device": dict(device),
        "io": io,
        "profile": profile,
        "build_settings": dict(build_settings),
        "load_settings": dict(load_settings),
        "build_seconds": round(float(build_seconds), 3),
        "preprocess": dict(preprocess),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_sidecar(engine_dir: Path, sidecar: dict) -> Path:
    """Write ``engine_dir/sidecar.json`` atomically."""
    return atomic_write_json(Path(engine_dir) / SIDECAR_NAME, sidecar)


def rebuild_hint(sidecar: dict | None = None) -> str:
    """"rebuild with 'rexport build --backend X --precision Y'", as precise as the sidecar allows."""
    cmd = "rexport build"
    if sidecar and isinstance(sidecar.get("backend"), str):
        cmd += f" --backend {sidecar['backend']}"
        if isinstance(sidecar.get("precision"), str):
            cmd += f" --precision {sidecar['precision']}"
    return f"rebuild with '{cmd}'"


def read_sidecar(engine_dir: Path) -> dict:
    """The sidecar of an engine folder; InputError when it is missing, corrupt or of another schema."""
    engine_dir = Path(engine_dir)
    p = engine_dir / SIDECAR_NAME
    if not engine_dir.is_dir():
        raise InputError(f"no engine folder {engine_dir}", "run 'rexport build' first, or pass an engines/<backend>-<precision> folder")
    if not p.is_file():
        raise InputError(f"{p} not found: {engine_dir} is not an engine folder built by rexport", rebuild_hint())
    try:
        sidecar = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{p} is corrupt (not JSON)", rebuild_hint()) from None
    if not isinstance(sidecar, dict):
        raise InputError(f"{p} is corrupt (not a JSON object)", rebuild_hint())
    schema = sidecar.get("schema_version")
    if schema != SIDECAR_SCHEMA:
        raise InputError(f"{p} has sidecar schema {schema!r}, this rexport reads schema {SIDECAR_SCHEMA}",
                         rebuild_hint(sidecar))
    missing = [k for k in REQUIRED_KEYS if k not in sidecar]
    if missing:
        raise InputError(f"{p} is incomplete: missing {', '.join(missing)}", rebuild_hint(sidecar))
    if not isinstance(sidecar["engine_files"], dict) or not sidecar["engine_files"]:
        raise InputError(f"{p} lists no engine files", rebuild_hint(sidecar))
    return sidecar


def verify_engine_files(engine_dir: Path, sidecar: dict) -> None:
    """Every engine file must exist and hash to what the build recorded."""
    engine_dir = Path(engine_dir)
    for name, sha in sidecar["engine_files"].items():
        p = engine_dir / name
        if not p.is_file():
            raise InputError(f"engine file {p} is missing", rebuild_hint(sidecar))
        if sha256_file(p) != sha:
            raise InputError(f"engine file {name} was modified after build (sha256 mismatch)", rebuild_hint(sidecar))


def refuse_incompatible(engine_dir: Path, sidecar: dict, problems: list[str]) -> None:
    """Raise one InputError listing what differs between the engine and this machine (no-op when nothing)."""
    if problems:
        raise InputError(f"cannot load {engine_dir}: " + "; ".join(problems), rebuild_hint(sidecar))


def version_tuple(version: str | None) -> tuple[int, ...]:
    """Leading numeric components of a version string: '2026.4.1-22982-e21' -> (2026, 4, 1)."""
    if not version:
        return ()
    m = re.match(r"\d+(?:\.\d+)*", str(version).strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def load_engine(engine_dir: Path, *, threads: int | None = None) -> "Runner":
    """A runner for an engine folder: read its sidecar and let its backend load it (each backend's
    ``load`` verifies the engine files and checks the sidecar against this machine)."""
    from rexport.pipeline.backends import get_backend

    engine_dir = Path(engine_dir)
    sidecar = read_sidecar(engine_dir)
    if sidecar["backend"] == "auto":
        raise InputError(f"{engine_dir / SIDECAR_NAME} names no backend ('auto')", rebuild_hint())
    backend = get_backend(str(sidecar["backend"]))
    return backend.load(engine_dir, threads=threads)
