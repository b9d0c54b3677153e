"""Evaluation on a local Ray cluster started here: the same eval files as a local run, bit for bit,
a killed worker retried and counted, a shard that fails for good failing the stage."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from rexport.pipeline import distributed
from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate
from rexport.pipeline.manifest import RunDir
from test_evaluate import image_folder  # tests/pipeline is on sys.path (pytest's prepend mode)

ray = pytest.importorskip("ray", reason="Ray is in the dev extra: pip install -e '.[dev]'")

FILES = ("pytorch", "fp32")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ray") / "val", ["class0", "class4", "class9"], per_class=5)


@pytest.fixture(scope="module")
def local(small_run, val, tmp_path_factory) -> dict[str, bytes]:
    run = RunDir(tmp_path_factory.mktemp("local") / "run")
    shutil.copytree(small_run.path, run.path)
    run_evaluate(run, EvaluateSettings(val_data=str(val), batch_size=4, decode_workers=0))
    return {v: run.file(f"eval/{v}.json").read_bytes() for v in FILES}


def _copy(small_run, tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    shutil.copytree(small_run.path, run.path)
    return run


def _kill_first_attempts(n: int, evaluating: threading.Thread) -> list[int]:
    """SIGKILL the worker of each of the first ``n`` task attempts, as they register."""
    killed: list[int] = []
    while len(killed) < n and evaluating.is_alive():
        names = [a for a in ray.util.list_named_actors() if a.startswith(distributed.ATTEMPT_LOG_PREFIX)]
        if names:
            for attempt in ray.get(ray.get_actor(names[0]).attempts.remote()):
                if attempt["pid"] not in killed and len(killed) < n:
                    os.kill(attempt["pid"], signal.SIGKILL)
                    killed.append(attempt["pid"])
        time.sleep(0.05)
    return killed


def _evaluate_in_thread(run: RunDir, val) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target():
        try:
            out["records"] = run_evaluate(run, EvaluateSettings(val_data=str(val), batch_size=4, ray="default"))
        except BaseException as e:  # handed to the test thread
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    return t, out


def test_a_killed_worker_is_retried_and_counted(cluster, small_run, val, local, tmp_path):
    run = _copy(small_run, tmp_path)
    t, out = _evaluate_in_thread(run, val)
    killed = _kill_first_attempts(1, t)
    t.join(timeout=120)
    assert "error" not in out, out.get("error")
    assert len(killed) == 1
    info = out["records"][0]["summary"]["ray"]
    assert info["shards"] == 2 and info["attempts"] == 3 and info["retries"] == 1
    # two shards, one of them run twice: the same eval files as the local run, byte for byte
    assert {v: run.file(f"eval/{v}.json").read_bytes() for v in FILES} == local


def test_a_shard_that_fails_for_good_fails_the_stage(cluster, small_run, val, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "MAX_RETRIES", 0)
    run = _copy(small_run, tmp_path)
    t, out = _evaluate_in_thread(run, val)
    _kill_first_attempts(1, t)
    t.join(timeout=120)
    assert isinstance(out.get("error"), distributed.ShardFailed), out
    assert "evaluation shard" in str(out["error"]) and "failed on Ray" in str(out["error"])
    st = RunDir(run.path).stage("evaluate:pytorch")
    assert st["status"] == "error" and "failed on Ray" in st["reason"]
    assert not run.file("eval/pytorch.json").exists()


def test_matrix_cells_run_as_ray_tasks(cluster, tmp_path):
    from rexport.pipeline.matrix import MatrixSettings, Row, run_matrix

    values = {"export": {"model": "resnet18", "num_classes": 10, "input_size": 32},
              "validate": {"samples": 2, "batch_sizes": (1,)},
              "bench": {"batch_sizes": (1,), "min_time": 0.02, "max_time": 0.2, "warmup": 1, "min_iters": 3}}
    report = run_matrix(tmp_path / "m", [Row("resnet18", values)],
                        MatrixSettings(precisions=("fp32",), backends=("openvino",), ray="default"))
    (cell,) = report["cells"]
    assert cell["status"] == "ok" and cell["variant"] == "openvino-fp32" and cell["images_per_s"] > 0
    assert report["ray"]["tasks"] == 1 and report["ray"]["retries"] == 0
    assert RunDir(tmp_path / "m" / "resnet18" / "openvino-fp32").stage("bench")["status"] == "ok"


def test_without_ray_it_says_how_to_install_it(small_run, val):
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "from rexport.cli import main\n"
            f"sys.argv = ['rexport', 'evaluate', '--val-data', {str(val)!r}, '--ray', '--out', {str(small_run.path)!r}]\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pip install 'rexport[ray]'" in r.stderr and "Traceback" not in r.stderr
