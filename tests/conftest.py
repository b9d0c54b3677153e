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


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """resnet18 trained briefly on scikit-learn's real digits, every ONNX variant made (both INT8 forms,
    FP16 float parts proved on the held-out set), evaluated on 797 held-out images and validated."""
    pytest.importorskip("sklearn")
    from rexport.demo import DIGITS_SPEC, train_digits, write_digits
    from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate
    from rexport.pipeline.export import ExportSettings, run_export
    from rexport.pipeline.manifest import RunDir
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize
    from rexport.pipeline.validate import ValidateSettings, run_validate

    root = tmp_path_factory.mktemp("digits")
    data = write_digits(root / "data")
    ckpt = root / "digits.pth"
    train_digits(data, ckpt, epochs=6)
    run = RunDir(root / "run")
    with run.locked():
        run_export(run, ExportSettings(model="resnet18", weights=str(ckpt), preprocess=DIGITS_SPEC))
        run_quantize(run, QuantizeSettings(precision="fp16"), progress=False)
        run_quantize(run, QuantizeSettings(precision="int8", calib_data=str(data.train), calib_samples=data.n_train,
                                           calib_method="entropy", int8_float_data=str(data.val),
                                           int8_float_val_data=str(data.val)), progress=False)
        run_evaluate(run, EvaluateSettings(val_data=str(data.val)))
        run_validate(run, ValidateSettings(data=str(data.val), samples=32))
    return run, data


def rexport_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``rexport`` console entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "rexport", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
