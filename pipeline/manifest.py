"""The run directory and its manifest: what each stage made from what, so unchanged stages
are skipped and every number in the report can be traced to its inputs."""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rexport.core.env import versions
from rexport.core.errors import InputError
from rexport.core.fsio import RunLock, atomic_write_json, ensure_dir, read_json, sha256_file, sha256_json

SCHEMA_VERSION = 1
#: ONNX variants; ``int8`` is the TensorRT form of the INT8 file, ``int8-openvino`` the OpenVINO (NNCF-parity)
#: form, both written by 'quantize:int8' from one calibration (rexport.pipeline.quantization.forms)
VARIANT_FILES = {"fp32": "onnx/model.fp32.onnx", "fp16": "onnx/model.fp16.onnx", "int8": "onnx/model.int8.onnx",
                 "int8-openvino": "onnx/model.int8-openvino.onnx"}


def default_run_dir(model: str) -> Path:
    return Path("artifacts") / model


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _content_sha(path: Path) -> str:
    """sha256 of a file; for a folder, of its listing with sizes and mtimes (cheap, catches edits)."""
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        listing = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in sorted(path.rglob("*")) if p.is_file()]
        return sha256_json(listing)
    return sha256_json(str(path))


@dataclass
class StageOutcome:
    """What a stage action returns: its files (relative to the run dir), a summary, a status."""

    outputs: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"          # ok | failed (a check failed) | skipped
    reason: str | None = None   # why skipped / failed


def _plain(obj: Any) -> Any:
    """A summary as the manifest file holds it (paths as strings), so what a later stage reads in this
    process is what a later command reads from disk."""
    import json

    return json.loads(json.dumps(obj, default=str))


def summary_figures(summary: dict, limit: int = 10) -> str:
    """A stage summary's figures on one line for run.log: ``key=value`` for its numbers and short
    strings (one level into nested records, as ``calibration.samples=512``)."""
    parts: list[str] = []

    def add(key: str, v: Any) -> None:
        if isinstance(v, bool) or v is None:
            return
        if isinstance(v, float):
            parts.append(f"{key}={v:.4g}")
        elif isinstance(v, int) or (isinstance(v, str) and 0 < len(v) <= 40 and "\n" not in v):
            parts.append(f"{key}={v}")

    for k, v in (summary or {}).items():
        if k == "ops":  # the op histogram: in the manifest, too long for a log line
            continue
        if isinstance(v, dict):
            for k2, v2 in v.items():
                add(f"{k}.{k2}", v2)
        else:
            add(k, v)
    return ", ".join(parts[:limit])


class RunDir:
    """A run directory (``--out``) with ``manifest.json`` and ``run.log``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest_path = self.path / "manifest.json"
        self._manifest: dict | None = None

    # -- manifest ----------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            if self.manifest_path.exists():
                try:
                    self._manifest = read_json(self.manifest_path)
                except ValueError:
                    raise InputError(f"{self.manifest_path} is corrupt",
                                     "delete the run directory and run 'rexport export' again") from None
            else:
                self._manifest = {"schema_version": SCHEMA_VERSION, "stages": {}}
        return self._manifest

    def save(self) -> None:
        atomic_write_json(self.manifest_path, self.manifest)

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def stage(self, name: str) -> dict | None:
        return self.manifest["stages"].get(name)

    def stages(self, prefix: str = "") -> dict[str, dict]:
        return {k: v for k, v in self.manifest["stages"].items() if k.startswith(prefix)}

    def file(self, rel: str) -> Path:
        return self.path / rel

    def require(self, rel: str, stage_hint: str) -> Path:
        """The path of an artifact a stage needs; exit 2 with a hint when it is missing."""
        p = self.path / rel
        if not p.exists():
            raise InputError(f"{p} not found", f"run '{stage_hint}' first")
        return p

    def require_export(self) -> dict:
        """The record of the stage that made onnx/model.fp32.onnx: ``export``, or ``import`` for an
        imported ONNX (see ``imported``)."""
        st = self.stage("export") or self.stage("import")
        if st is None or st.get("status") != "ok" or not self.file(VARIANT_FILES["fp32"]).exists():
            raise InputError(f"no exported model in {self.path}",
                             "run 'rexport export' (or 'rexport import --onnx FILE') first (or pass --out)")
        return st

    @property
    def imported(self) -> bool:
        """True when the run started from an imported ONNX file: no PyTorch model, the FP32 ONNX in
        ONNX Runtime is the reference."""
        return self.stage("export") is None and self.stage("import") is not None

    def variants(self) -> list[str]:
        """ONNX variants present in the run, in pipeline order."""
        return [v for v, rel in VARIANT_FILES.items() if self.file(rel).exists()]

    # -- log -----------------------------------------------------------------------------

    def log(self, message: str) -> None:
        ensure_dir(self.path)
        with open(self.path / "run.log", "a", encoding="utf-8") as f:
            f.write(f"{_now()} {message}\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunDir"]:
        ensure_dir(self.path)
        with RunLock(self.path):
            self._manifest = None  # re-read under the lock
            yield self

    # -- stages ------------------------------------------------------------------------

    def _fingerprint_inputs(self, inputs: dict[str, str | os.PathLike | None]) -> dict[str, dict]:
        out = {}
        for key, p in inputs.items():
            if p is None:
                out[key] = {"path": None, "sha256": None}
                continue
            path = Path(p)
            out[key] = {"path": str(path), "sha256": _content_sha(path)}
        return out

    def is_fresh(self, name: str, inputs: dict, settings: dict) -> bool:
        """True when the stage ran before with the same inputs and settings and its outputs are intact."""
        st = self.stage(name)
        if not st or st.get("status") != "ok":
            return False
        if st.get("settings_sha256") != sha256_json(settings):
            return False
        # compare contents, not how a path was spelled (relative/absolute, a moved run directory)
        recorded = {k: v.get("sha256") for k, v in (st.get("inputs") or {}).items()}
        if recorded != {k: v["sha256"] for k, v in self._fingerprint_inputs(inputs).items()}:
            return False
        for rel, sha in st.get("outputs", {}).items():
            p = self.path / rel
            if not p.exists() or (p.is_file() and sha256_file(p) != sha):
                return False
        return True

    def run_stage(self, name: str, *, inputs: dict[str, str | os.PathLike | None], settings: dict,
                  action: Callable[[], StageOutcome], force: bool = False) -> dict:
        """Run ``action`` unless its inputs and settings are unchanged; record it in the manifest.

        Returns the stage record, with ``reused`` True when nothing had to be redone.
        """
        if not force and self.is_fresh(name, inputs, settings):
            rec = dict(self.stage(name))
            rec["reused"] = True
            self.log(f"{name}: unchanged, reused")
            return rec
        fingerprint = self._fingerprint_inputs(inputs)
        started, t0 = _now(), time.perf_counter()
        self.log(f"{name}: started")
        try:
            outcome = action()
        except BaseException as e:
            # Outputs are written atomically, so a failed attempt leaves the previous ones (and
            # their record) intact; only a stage that never succeeded is recorded as an error.
            if self.stage(name) is None:
                self.manifest["stages"][name] = {
                    "status": "error", "reason": str(e) or type(e).__name__, "started": started,
                    "duration_s": round(time.perf_counter() - t0, 3), "inputs": fingerprint, "settings": settings,
                    "outputs": {}, "summary": {}}
                self.save()
            self.log(f"{name}: error: {e}")
            raise
        outputs = {}
        for rel in outcome.outputs:
            p = self.path / rel
            outputs[rel] = sha256_file(p) if p.is_file() else None
        rec = {
            "status": outcome.status, "reason": outcome.reason, "started": started,
            "duration_s": round(time.perf_counter() - t0, 3), "inputs": fingerprint, "settings": settings,
            "settings_sha256": sha256_json(settings), "outputs": outputs, "summary": _plain(outcome.summary),
            "versions": versions(),
        }
        self.manifest["stages"][name] = rec
        self.save()
        figures = summary_figures(outcome.summary)
        self.log(f"{name}: {outcome.status} in {rec['duration_s']} s" + (f" ({outcome.reason})" if outcome.reason else "")
                 + (f"; {figures}" if figures else ""))
        return {**rec, "reused": False}

    def record_skip(self, name: str, reason: str, settings: dict | None = None) -> dict:
        """Record that a stage did not run, and why (never silently dropped)."""
        rec = {"status": "skipped", "reason": reason, "started": _now(), "duration_s": 0.0,
               "settings": settings or {}, "outputs": {}, "summary": {}}
        self.manifest["stages"][name] = rec
        self.save()
        self.log(f"{name}: skipped: {reason}")
        return {**rec, "reused": False}
