"""report: json, md and html from a real run agree with each other and with the stage files."""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rexport.core.errors import InputError
from rexport.pipeline.bench import BenchSettings, bench_outcome, run_bench
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.report import SYNTHETIC_CALIBRATION_WARNING, fmt, format_table, summary_rows, write_report

CHROMIUM = Path("/usr/bin/chromium")
IMG = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _helpers():
    """tests/pipeline/test_bench.py (its run builder), the already imported module when there is one."""
    path = Path(__file__).with_name("test_bench.py").resolve()
    for mod in list(sys.modules.values()):
        if getattr(mod, "__file__", None) and Path(mod.__file__).resolve() == path:
            return mod
    spec = importlib.util.spec_from_file_location("_rexport_test_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_run) -> RunDir:
    run = _helpers().shared_run(tmp_path_factory, small_run)
    settings = BenchSettings(batch_sizes=(1, 2), warmup=1, min_time=0.1, max_time=0.5, min_iters=3)
    run.run_stage("bench", inputs={}, settings=settings.to_dict(),
                  action=lambda: bench_outcome(run_bench(run, settings, progress=False)), force=True)
    return run


@pytest.fixture(scope="module")
def report(run) -> dict:
    return write_report(run)


@pytest.fixture(scope="module")
def files(run, report) -> dict[str, str]:
    return {ext: run.file(f"report/report.{ext}").read_text(encoding="utf-8") for ext in ("json", "md", "html")}


def test_three_files_and_schema(report, files):
    on_disk = json.loads(files["json"])
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["schema_version"] == 1 and on_disk["model"] == "resnet18"
    assert on_disk["command"].startswith(_helpers().COMMAND)
    assert on_disk["environment"]["source"].startswith("bench/results.json")
    assert "host arrays in and out" in on_disk["latency_definition"]
    assert on_disk["sources"][0] == "manifest.json" and "bench/results.json" in on_disk["sources"]


def test_rows_come_from_the_stage_files(run, report):
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["pytorch", "fp32", "int8", "int8-openvino", "tensorrt"]
    val = json.loads(run.file("validate/int8.json").read_text())
    ev = json.loads(run.file("eval/int8.json").read_text())
    bench = {(r["variant"], r["batch"]): r for r in json.loads(run.file("bench/results.json").read_text())["rows"]}
    i8 = rows["int8"]
    assert i8["max_abs"] == val["metrics"]["max_abs"] and i8["rel_to_range"] == val["metrics"]["rel_to_range"]
    assert i8["top1_agreement"] == val["metrics"]["top1_agreement"]
    assert i8["validation"] == ("pass" if val["passed"] else "FAIL")
    assert i8["accuracy_top1"] == ev["top1"] and i8["accuracy_top5"] == ev["top5"]
    assert i8["p50_ms"] == bench[("int8", 1)]["p50_ms"] and i8["latency_batch"] == 1
    assert i8["throughput_batch"] == 2 and i8["images_per_s"] == bench[("int8", 2)]["images_per_s"]
    assert i8["speedup_vs_pytorch"] == bench[("int8", 1)]["speedup_vs_pytorch"]
    assert i8["size_mib"] == pytest.approx(run.file("onnx/model.int8.onnx").stat().st_size / 2**20)
    assert rows["fp32"]["size_mib"] == pytest.approx(run.file("onnx/model.fp32.onnx").stat().st_size / 2**20)
    assert rows["pytorch"]["size_mib"] is None and "MiB = 2^20 bytes" in report["size_definition"]
    ref_eval = run.file("eval/pytorch.json")
    ref_top1 = json.loads(ref_eval.read_text())["top1"] if ref_eval.exists() else None
    assert rows["pytorch"]["validation"] == "reference" and rows["pytorch"]["accuracy_top1"] == ref_top1
    assert rows["tensorrt"]["status"] == "skipped"
    assert rows["tensorrt"]["reason"] == run.stage("build:tensorrt")["reason"]
    assert [d["tensor"] for d in report["per_layer_int8"]] == [d["tensor"] for d in val["per_layer"]]
    assert sum("Conv" in d["layer"] for d in report["per_layer_int8"]) == 20  # the Conv layers of ResNet-18


def test_table_cells_are_the_formatted_row_values(report):
    keys = report["table"]["keys"]
    assert keys[-1] == "notes" and len(report["table"]["columns"]) == len(keys)
    for r, cells in zip(report["rows"], report["table"]["rows"]):
        assert cells[-1] == "; ".join(r["notes"])
        if r["status"] == "ok":
            assert cells[:-1] == [fmt(k, r.get(k)) for k in keys[:-1]]
        else:
            assert cells[:4] == [r["variant"], r["backend"], "-", f"skipped: {r['reason']}"]
    assert fmt("p50_ms", None) == "-" and fmt("validation", True) == "pass"


def test_md_and_html_show_the_same_numbers(report, files):
    html_text = files["html"].replace("&#x27;", "'").replace("&amp;", "&")
    for r, cells in zip(report["rows"], report["table"]["rows"]):
        md_line = next(line for line in files["md"].splitlines() if line.startswith(f"| {r['variant']} |"))
        assert md_line == "| " + " | ".join(cells) + " |"
        html_row = next(row for row in re.findall(r"<tr[^>]*>.*?</tr>", html_text)
                        if row.split("</td>")[0].endswith(f">{r['variant']}"))
        assert re.findall(r"<td[^>]*>(.*?)</td>", html_row) == cells
        if r["status"] != "ok":
            continue
        for key in ("p50_ms", "images_per_s", "max_abs", "accuracy_top1"):
            if r[key] is not None:
                assert fmt(key, r[key]) in md_line
    # the per-layer table and the bench table carry the same formatted numbers too
    for d in report["per_layer_int8"]:
        cell = fmt("rel_error", d["rel_error"])
        assert cell in files["md"] and f">{cell}</td>" in html_text
    for b in report["bench"]["rows"]:
        if b["status"] == "ok":
            assert f"| {b['variant']} | {b['batch']} | ok | {fmt('p50_ms', b['p50_ms'])} |" in files["md"]


def test_skips_and_warnings_appear_in_all_three(run, report, files):
    reason = run.stage("build:tensorrt")["reason"]
    assert reason.startswith("no CUDA device")
    assert {"stage": "build:tensorrt", "reason": reason, "text": f"TensorRT: skipped, {reason}"} in report["skipped"]
    assert report["weights"]["text"] == "random init (seed 0): accuracy numbers are meaningless"
    assert report["calibration"]["warning"] == SYNTHETIC_CALIBRATION_WARNING
    for text in (files["json"], files["md"], files["html"]):
        assert "TensorRT: skipped, no CUDA device" in text
        assert "skipped: no CUDA device" in text  # the summary table's tensorrt row
        assert "random init (seed 0): accuracy numbers are meaningless" in text
        assert SYNTHETIC_CALIBRATION_WARNING in text
    assert "skipped: no CUDA device" in files["md"] and "skipped: no CUDA device" in files["html"]


def test_html_is_self_contained_with_three_plots(report, files):
    page = files["html"]
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=\"(?!data:)", page)
    pngs = IMG.findall(page)
    assert len(pngs) == 3
    for b64 in pngs:
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    assert [p["drawn"] for p in report["plots"]] == [True, True, True]
    assert "top-1 accuracy" in page  # evaluated: plot (a) uses accuracy, and says so


def test_summary_table_for_the_cli(run, report):
    rows = summary_rows(run)
    assert [r["variant"] for r in rows] == [r["variant"] for r in report["rows"]]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["variant", "backend", "precision"]
    assert "p50 ms @b1" in lines[0] and "img/s @b2" in lines[0] and "speed-up" in lines[0]
    trt = next(line for line in lines if line.startswith("tensorrt"))
    assert "skipped: no CUDA device" in trt
    i8 = next(r for r in rows if r["variant"] == "int8")
    i8_line = next(line for line in lines if line.startswith("int8 "))
    for key in ("size_mib", "max_abs", "top1_agreement", "accuracy_top1", "p50_ms", "images_per_s"):
        assert fmt(key, i8[key]) in i8_line.split()
    pt_line = next(line for line in lines if line.startswith("pytorch "))
    assert pt_line.split()[4] == "-"  # nothing measured against itself


def test_missing_data_is_explained_instead_of_plotted(run, tmp_path):
    """A run with only the export and an edited validate file: no plots, and the report says why."""
    small = RunDir(tmp_path / "small")
    (small.path / "onnx").mkdir(parents=True)
    (small.path / "validate").mkdir()
    shutil.copy(run.file("onnx/model.fp32.onnx"), small.file("onnx/model.fp32.onnx"))
    shutil.copy(run.file("validate/fp32.json"), small.file("validate/fp32.json"))
    manifest = json.loads(run.manifest_path.read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in ("export", "validate:fp32")}
    del manifest["command"]
    small.manifest_path.write_text(json.dumps(manifest))
    with open(small.file("validate/fp32.json"), "a") as f:
        f.write("\n")  # edited after its stage recorded it
    rep = write_report(small)
    page = small.file("report/report.html").read_text()
    md = small.file("report/report.md").read_text()
    assert IMG.findall(page) == [] and [p["drawn"] for p in rep["plots"]] == [False, False, False]
    for text in (page, md):
        assert "No accuracy/latency plot: no variant has a measured latency" in text
        assert "No throughput plot" in text and "No per-layer plot: no INT8 model was validated" in text
        assert "(command not recorded)" in text
    assert rep["environment"]["source"] == "report time (no bench results)"
    assert "validate/fp32.json changed after its stage recorded it" in rep["warnings"]
    assert any(w.startswith("no bench results") for w in rep["warnings"])
    assert [r["variant"] for r in rep["rows"]] == ["pytorch", "fp32"] and rep["rows"][1]["p50_ms"] is None
    assert "| fp32 | onnxruntime | fp32 |" in md


def test_no_manifest_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="run 'rexport export' first"):
        write_report(RunDir(tmp_path / "empty"))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium not installed (apt-get install chromium)")
def test_chromium_renders_and_decodes_the_plots(run, report, tmp_path):
    page = run.file("report/report.html")
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    imgs = re.findall(r"<img [^>]*>", dom.stdout)
    assert len(imgs) == 3
    assert all('data-loaded="yes"' in i for i in imgs), imgs
    assert all(int(re.search(r'data-natural-width="(\d+)"', i).group(1)) > 300 for i in imgs)
    assert 'data-images-decoded="3"' in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([*base, "--window-size=1400,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=60, env=env, check=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("REXPORT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["REXPORT_KEEP_SCREENSHOT"])


def test_a_section_module_is_rendered_in_all_three_files(run, tmp_path, monkeypatch):
    """The report hook: a module with build_section() in the sections package shows up in report.json,
    report.md and report.html, and a file it reads is listed among the report's sources."""
    import rexport.pipeline.reporting.sections as sections

    (tmp_path / "zz_bench_rows.py").write_text(
        "from rexport.pipeline.reporting.sections import Section\n"
        "def build_section(src, report):\n"
        "    data = src.read('bench/results.json')\n"
        "    rows = [[r['variant'], str(r['batch'])] for r in data['rows']]\n"
        "    return Section(key='bench_rows', title='Bench rows again', headers=['variant', 'batch'],\n"
        "                   rows=rows, text=['A section from a module.'], data={'n': len(rows)})\n")
    monkeypatch.setattr(sections, "__path__", [*sections.__path__, str(tmp_path)])
    report = write_report(run)
    sec = next(s for s in report["sections"] if s["key"] == "bench_rows")
    n = len(json.loads(run.file("bench/results.json").read_text())["rows"])
    assert sec["data"] == {"n": n} and len(sec["rows"]) == n
    md = run.file("report/report.md").read_text()
    assert "## Bench rows again" in md and "A section from a module." in md
    assert "<h2>Bench rows again</h2>" in run.file("report/report.html").read_text()
    assert json.loads(run.file("report/report.json").read_text())["sections"] == report["sections"]
    monkeypatch.undo()
    assert not any(s["key"] == "bench_rows" for s in write_report(run)["sections"])
