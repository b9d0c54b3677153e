"""The CLI on bad input: a one-line error, exit code 2, no traceback, nothing half-written.
And on good input: the README's flow works through the real entry point."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from conftest import rexport_cli, rexport_cli_many
from rexport.models.resnet import resnet18


def assert_clean_failure(proc, code: int, *words: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    (d / "garbage.pth").write_bytes(b"this is not a checkpoint" * 10)
    torch.manual_seed(0)
    good = resnet18(num_classes=10).state_dict()
    torch.save(good, d / "good.pth")
    data = (d / "good.pth").read_bytes()
    (d / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save({k: v for k, v in good.items() if not k.startswith("layer4")}, d / "mismatch.pth")
    with open(d / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": RunsCode()}, f)
    return d


BAD_EXPORTS = [
    (["--weights", "{d}/missing.pth"], ["missing.pth", "not found"]),
    (["--weights", "{d}/garbage.pth"], ["garbage.pth"]),
    (["--weights", "{d}/truncated.pth"], ["truncated.pth"]),
    (["--weights", "{d}/mismatch.pth"], ["layer4"]),
    (["--weights", "{d}/evil.pth"], ["run code", "--trust-checkpoint"]),
    (["--model", "resnet19"], ["resnet19"]),
    (["--opset", "9"], ["opset 9"]),
]


@pytest.fixture(scope="module")
def bad_exports(bad_checkpoints, tmp_path_factory):
    """Every bad export, each into its own --out, run by the real entry point in one subprocess."""
    root = tmp_path_factory.mktemp("bad_exports")
    argvs = [["export", "--input-size", "32", "--out", root / f"run{i}", *[a.format(d=bad_checkpoints) for a in args]]
             for i, (args, _) in enumerate(BAD_EXPORTS)]
    return root, rexport_cli_many(*argvs, results=root / "results.json")


@pytest.mark.parametrize("case", range(len(BAD_EXPORTS)), ids=["-".join(a).rsplit("/", 1)[-1].lstrip("-") for a, _ in BAD_EXPORTS])
def test_export_bad_input(bad_exports, case):
    root, procs = bad_exports
    assert_clean_failure(procs[case], 2, *BAD_EXPORTS[case][1])
    assert not (root / f"run{case}").exists(), "a failed export must leave nothing behind"


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = rexport_cli("export", "--input-size", "32", "--out", blocker / "run")
    assert_clean_failure(proc, 2, "run")


def test_later_stage_without_export_says_what_to_do(tmp_path):
    proc = rexport_cli("validate", "--out", tmp_path / "nothing")
    assert_clean_failure(proc, 2, "rexport export")
    assert not (tmp_path / "nothing").exists()


def test_export_validate_and_bad_onnx_files(tmp_path):
    out = tmp_path / "run"
    proc = rexport_cli("export", "--num-classes", "5", "--input-size", "32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "random init" in proc.stdout
    proc = rexport_cli("--json", "validate", "--out", out, "--batch-sizes", "1,4", "--samples", "8")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)[0]
    assert res["variant"] == "fp32" and res["passed"] and set(res["batches"]) == {"1", "4"}
    assert res["random_weights"] is True and res["inputs"]["kind"] == "synthetic"
    assert json.loads((out / "validate" / "fp32.json").read_text())["metrics"] == res["metrics"]
    assert "validate:fp32" in (out / "run.log").read_text()

    onnx_bytes = (out / "onnx" / "model.fp32.onnx").read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 3])
    (tmp_path / "text.onnx").write_text("hello")
    names = ("truncated.onnx", "text.onnx")
    procs = rexport_cli_many(*[["validate", "--out", out, "--onnx", tmp_path / n] for n in names],
                             results=tmp_path / "bad_onnx.json")
    for name, proc in zip(names, procs):
        assert_clean_failure(proc, 2, name)


def test_numerical_failure_exits_1(tmp_path, small_run):
    """A variant whose weights were damaged fails validation with exit code 1."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    run_dir = tmp_path / "run"
    shutil.copytree(small_run.path, run_dir)
    model = onnx.load(str(run_dir / "onnx" / "model.fp32.onnx"))
    fc = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 2)
    w = numpy_helper.to_array(fc).copy()
    w[0] += 0.5
    fc.CopyFrom(numpy_helper.from_array(w.astype(np.float32), fc.name))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    proc = rexport_cli("validate", "--out", run_dir, "--onnx", damaged, "--samples", "4")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "Traceback" not in proc.stderr


def test_debug_shows_a_traceback(tmp_path):
    proc = rexport_cli("--debug", "export", "--model", "nope", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_help_works_without_tensorrt():
    proc = rexport_cli("--help")
    assert proc.returncode == 0 and "export" in proc.stdout and "bundle" in proc.stdout


def test_a_locked_run_directory_is_refused(small_run):
    """Two commands never write one run directory at once."""
    from rexport.core.fsio import RunLock

    with RunLock(small_run.path):
        proc = rexport_cli("validate", "--out", small_run.path, "--samples", "2")
    assert_clean_failure(proc, 2, "another rexport command")


def test_run_takes_every_stage_option():
    """Each stage command and ``run`` expose the same settings fields (both are generated from the
    stage's settings dataclass; this catches a hand-written option that drifts)."""
    from rexport.cli import cli
    from rexport.cli.options import run_names
    from rexport.core.settings import setting_specs
    from rexport.pipeline.run import run_stages

    def longs(command) -> set[str]:
        return {o[2:] for p in command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}

    stages = run_stages()
    names = run_names(stages)
    on_run = longs(cli.commands["run"])
    for stage, cls, *_ in stages[1:]:
        on_stage = longs(cli.commands[stage])
        specs = [s for s in setting_specs(cls) if s.cli]
        assert specs, stage
        missing_stage = [s.cli for s in specs if s.cli not in on_stage]
        missing_run = [names[(stage, s.field)] for s in specs if s.run is not False
                       and names[(stage, s.field)] not in on_run]
        assert not missing_stage and not missing_run, (stage, missing_stage, missing_run)
    for name in ("calib-samples", "val-samples", "bench-min-time", "validate-samples", "eval-samples",
                 "bench-batch-sizes", "bench-threads", "exclude", "workspace", "skip-first-conv", "calib-batch-size",
                 "tol", "config", "print-config"):
        assert name in on_run, name
    assert all("config" in longs(c) for c in cli.commands.values())
