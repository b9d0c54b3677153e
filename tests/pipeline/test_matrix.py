"""rexport matrix: two models (one from a run config file, with its own seed and opset) x two precisions -> four run directories
made as 'run' makes them, one combined report, and every cell reused on a rerun."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import rexport_cli  # tests/ is on sys.path (pytest's prepend mode)
from rexport.pipeline.matrix import Cell, MatrixSettings, cell_resources
from rexport.pipeline.matrix_report import pareto_front

TINY = ["--num-classes", "10", "--input-size", "32", "--calib-samples", "8", "--calib-method", "minmax",
        "--validate-samples", "2", "--validate-batch-sizes", "1", "--bench-batch-sizes", "1",
        "--bench-min-time", "0.02", "--bench-max-time", "0.2", "--bench-warmup", "1", "--bench-min-iters", "3"]
CELLS = ["resnet18/openvino-fp32", "resnet18/openvino-fp16", "r18b/openvino-fp32", "r18b/openvino-fp16"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    rng = np.random.default_rng(0)
    np.savez(root / "val.npz", x=rng.standard_normal((8, 3, 32, 32)).astype(np.float32), y=np.arange(8))
    # a second resnet18 (an export costs what the model's depth costs): its own seed and opset
    (root / "r18b.toml").write_text('model = "resnet18"\nseed = 3\nopset = 18\n')
    args = ["matrix", "--models", f"resnet18,{root / 'r18b.toml'}", "--precisions", "fp32,fp16",
            "--backends", "openvino", "--val-data", str(root / "val.npz"), *TINY, "--out", str(root / "m")]
    first = rexport_cli(*args, timeout=600)
    second = rexport_cli(*args, timeout=300)
    return root / "m", first, second


def test_four_cells_are_run_directories_with_one_combined_report(matrix):
    out, first, _ = matrix
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads((out / "matrix.json").read_text())
    assert [c["cell"] for c in report["cells"]] == CELLS
    for c in report["cells"]:
        run = json.loads((out / c["cell"] / "manifest.json").read_text())
        assert run["stages"]["export"]["status"] == "ok" and (out / c["cell"] / "report" / "report.json").is_file()
        assert c["status"] == "ok" and c["accuracy_top1"] is not None and c["images_per_s"] > 0 and c["size_mib"] > 0
    # the config file's row is its model with its own seed and opset, the matrix's flags on top
    own = json.loads((out / "r18b/openvino-fp32/manifest.json").read_text())["stages"]["export"]["settings"]
    assert own["model"] == "resnet18" and own["seed"] == 3 and own["opset"] == 18 and own["num_classes"] == 10
    plain = json.loads((out / "resnet18/openvino-fp32/manifest.json").read_text())["stages"]["export"]["settings"]
    assert plain["seed"] == 0 and plain["opset"] == 17
    cells = {c["cell"]: c for c in report["cells"]}
    assert cells["resnet18/openvino-fp32"]["variant"] == "openvino-fp32"
    fp16 = cells["resnet18/openvino-fp16"]  # OpenVINO has no fp16 engine: the cell says so and shows the ONNX file
    assert fp16["variant"] == "fp16" and "the row is the ONNX fp16 file" in fp16["note"]
    assert report["pareto"] and set(report["pareto"]) <= set(CELLS)
    md, html = (out / "matrix.md").read_text(), (out / "matrix.html").read_text()
    for name in CELLS:
        assert name in md and name in html
    assert "data:image/png;base64," in html and "Pareto" in md


def test_a_rerun_reuses_every_cell(matrix):
    out, _, second = matrix
    assert second.returncode == 0, second.stderr[-2000:]
    report = json.loads((out / "matrix.json").read_text())
    assert all(c["reused"] and c["redone"] == [] for c in report["cells"])
    assert sum(line.split()[1:2] == ["reused"] for line in second.stdout.splitlines()) == 4


def test_pareto_front_and_ray_resources():
    cells = [{"cell": "a", "status": "ok", "accuracy_top1": 0.7, "images_per_s": 100.0},
             {"cell": "b", "status": "ok", "accuracy_top1": 0.6, "images_per_s": 300.0},
             {"cell": "c", "status": "ok", "accuracy_top1": 0.6, "images_per_s": 200.0},
             {"cell": "d", "status": "skipped"}]
    assert pareto_front(cells, "accuracy_top1") == ["a", "b"]
    trt = Cell("resnet50", "tensorrt", "int8", {})
    assert cell_resources(trt, MatrixSettings(tensorrt_version="10.3"), 16) == {
        "num_gpus": 1, "num_cpus": 1, "resources": {"tensorrt:10.3": 1}}
    assert cell_resources(Cell("resnet50", "openvino", "int8", {}), MatrixSettings(), 16) == {"num_cpus": 16}


def test_bad_backend_is_refused_before_any_work(tmp_path):
    r = rexport_cli("matrix", "--models", "resnet18", "--backends", "onnx", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "unknown backend 'onnx'" in r.stderr and not (tmp_path / "m").exists()
