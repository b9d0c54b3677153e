"""--config FILE: flags win over the file; an unknown key names the nearest valid one; --print-config
writes a file that reproduces the settings; a stage command reads the same kind of file; plain progress
lines when stderr is not a terminal; a failure's traceback goes to run.log. (A whole run from a config
file against the same run from flags: tests/test_run.py.)"""
from __future__ import annotations

import json
import re

import pytest

from conftest import rexport_cli

FLAGS = ["--input-size", "32", "--num-classes", "4", "--precisions", "fp32", "--calib-samples", "16",
         "--validate-samples", "4", "--bench-batch-sizes", "1", "--bench-min-time", "0.05",
         "--bench-max-time", "0.5"]


def toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def _one_line_error(proc, code: int) -> str:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(small_run, tmp_path_factory):
    """A copy of the session's exported resnet18 (64 px), for stage commands to write into."""
    import shutil

    out = tmp_path_factory.mktemp("cfg") / "run"
    shutil.copytree(small_run.path, out)
    return out


def test_flags_override_the_file(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml({"calib-samples": 64, "calib_method": "minmax", "bench-threads": 2}))
    proc = rexport_cli("run", "--config", cfg, "--calib-samples", "8", "--print-config")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert re.search(r"^calib-samples = 8$", text, re.M)          # the flag wins
    assert re.search(r'^calib-method = "minmax"$', text, re.M)     # `_` or `-` in keys
    assert re.search(r"^bench-threads = 2$", text, re.M)
    assert not (tmp_path / "artifacts").exists()


def test_run_validates_on_the_real_images_it_was_given(tmp_path):
    """A run option left at its default is not "given": run still picks real images for validation."""
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    proc = rexport_cli("run", "--calib-data", tmp_path / "imgs", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert f'validate-data = "{tmp_path / "imgs"}"' in proc.stdout
    proc = rexport_cli("run", "--calib-data", tmp_path / "imgs", "--validate-data", "synthetic", "--print-config")
    assert 'validate-data = "synthetic"' in proc.stdout


def test_print_config_reproduces_the_settings(tmp_path):
    proc = rexport_cli("run", *FLAGS, "--tol", "int8.cosine_min=0.97", "--exclude", "/fc/Gemm", "--print-config")
    assert proc.returncode == 0, proc.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(proc.stdout)
    again = rexport_cli("run", "--config", printed, "--print-config")
    assert again.returncode == 0, again.stderr
    body = lambda s: [line for line in s.splitlines() if not line.startswith("# rexport run")]  # noqa: E731
    assert body(again.stdout) == body(proc.stdout)
    assert 'tol = ["int8.cosine_min=0.97"]' in proc.stdout and 'exclude = ["/fc/Gemm"]' in proc.stdout


@pytest.mark.parametrize("name,text,words", [
    ("typo.toml", "calib-sample = 16\n", ["calib-sample", "did you mean 'calib-samples'"]),
    ("stage.toml", "min-time = 0.1\n", ["min-time", "bench-min-time"]),
    ("bad.toml", "calib-samples = = 3\n", ["not valid TOML"]),
    ("typo.yaml", "input_sise: 32\n", ["input_sise", "input-size"]),
])
def test_bad_config_is_one_line_exit_2(tmp_path, name, text, words):
    cfg = tmp_path / name
    cfg.write_text(text)
    proc = rexport_cli("run", "--config", cfg, "--out", tmp_path / "run")
    line = _one_line_error(proc, 2)
    for w in words:
        assert w in line, line
    assert not (tmp_path / "run").exists()


def test_stage_command_reads_a_config_and_plain_progress(run_dir, tmp_path):
    out = run_dir
    cfg = tmp_path / "bench.toml"
    cfg.write_text(toml({"batch-sizes": [2], "min-time": 0.05, "max-time": 0.3, "backends": ["onnxruntime"]}))
    proc = rexport_cli("--progress", "plain", "bench", "--config", cfg, "--out", out, "--warmup", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "bench" / "results.json").read_text())
    assert results["settings"]["batch_sizes"] == [2] and results["settings"]["warmup"] == 1
    assert {r["variant"] for r in results["rows"] if r["status"] == "ok"} == {"fp32"}
    assert "\r" not in proc.stderr and "bench fp32 b2" in proc.stderr
    proc = rexport_cli("bench", "--config", cfg, "--out", out, "--bogus-flag")
    assert proc.returncode == 2
    log = (out / "run.log").read_text()
    assert re.search(r"bench: ok in [0-9.]+ s; rows\.ok=1", log), log[-500:]


def test_calibration_progress_is_plain_lines_off_a_terminal(run_dir):
    out = run_dir
    proc = rexport_cli("--progress", "plain", "quantize", "--precision", "int8", "--calib-samples", "20",
                       "--calib-batch-size", "2", "--calib-method", "minmax", "--int8-float-samples", "4",
                       "--out", out)  # min-max, few proof inputs: the progress lines are what is checked
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("calibrating:")]
    assert 2 <= len(lines) <= 10 and "100% 20/20 img" in lines[-1] and "\r" not in proc.stderr, proc.stderr


def test_an_unexpected_failure_leaves_its_traceback_in_run_log(run_dir, tmp_path):
    """A results file edited by hand (a bench row without its batch) breaks the report: the terminal
    shows one line pointing at run.log, and run.log holds the traceback for a bug report."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "bench").mkdir(exist_ok=True)
    (out / "bench" / "results.json").write_text(json.dumps({"rows": [{"variant": "fp32"}]}))
    proc = rexport_cli("report", "--out", out)
    line = _one_line_error(proc, 1)
    assert "KeyError" in line and "run.log" in line, line
    log = (out / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "KeyError" in log.split("$ rexport report")[-1]


def test_progress_modes_in_process(capsys):
    """plain: a line per 10% step (not per update) and none when disabled; none: silent."""
    from rexport.core import progress

    old = progress._mode
    try:
        progress.set_mode("plain")
        with progress.progress_bar(1000, desc="work", unit="img") as bar:
            for _ in range(1000):
                bar.update(1)
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 10 and lines[0].startswith("work:  10% 100/1000 img") and "100%" in lines[-1]
        with progress.progress_bar(1000, desc="work", enabled=False) as bar:
            bar.update(1000)
        progress.set_mode("none")
        with progress.progress_bar(10, desc="work") as bar:
            bar.update(10)
        progress.say("a line")
        assert capsys.readouterr().err == ""
        with pytest.raises(ValueError):
            progress.set_mode("loud")
    finally:
        progress.set_mode(old)
