"""Shared fixtures: small real artifacts made once per session (no mocks, no downloads)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A run directory with a real resnet18 (10 classes, 64x64 input) exported by the export stage."""
    from rexport.core.preprocess import PreprocessSpec
    from rexport.pipeline.export import ExportSettings, run_export
    from rexport.pipeline.manifest import RunDir

    run = RunDir(tmp_path_factory.mktemp("run") / "resnet18")
    spec = PreprocessSpec(input_size=64, resize=73, labels=tuple(f"class{i}" for i in range(10)))
    with run.locked():
        run_export(run, ExportSettings(model="resnet18", num_classes=10, preprocess=spec))
    return run


def rexport_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``rexport`` console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "rexport", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
