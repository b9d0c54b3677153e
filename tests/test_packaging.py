"""The wheel installs everything under the ``rexport`` namespace: no top-level ``models``,
``pipeline`` or ``calibration`` package may land in site-packages."""
from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_layout(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("rexport-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"rexport", next(n.split("/")[0] for n in names if ".dist-info/" in n)}, tops
    for pkg in ("models", "pipeline", "calibration", "core"):
        assert f"rexport/{pkg}/__init__.py" in names
    assert "rexport/models/resnet.py" in names and "rexport/pipeline/backends/openvino.py" in names
    assert "rexport/models/torchvision_reference.json" in names
    assert any(n.startswith("rexport/pipeline/templates/run_engine.py") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rexport = rexport.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_import_is_light():
    """``import rexport`` and the CLI module pull in neither torch nor tensorrt."""
    code = ("import sys, rexport, rexport.cli, rexport.pipeline.backends as b; b.backends();"
            "bad=[m for m in ('torch','tensorrt','openvino','onnxruntime') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
