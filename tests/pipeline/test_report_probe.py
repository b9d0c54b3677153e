"""The machine's yardstick in the report: a '% of probe' column with the real bench's figure, and the
probe figures with the machine in the facts, in report.json/md/html and the terminal summary table."""
from __future__ import annotations

import pytest

from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.bench import BenchSettings, run_bench_stage
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.report import fmt, format_table, summary_rows, write_report
from rexport.pipeline.reporting.details import machine_text


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """resnet18 at 32 px, exported and benched (PyTorch and ONNX Runtime FP32, batches 1 and 2, briefly)."""
    from rexport.pipeline.export import ExportSettings, run_export

    run = RunDir(tmp_path_factory.mktemp("probe") / "resnet18")
    with run.locked():
        run_export(run, ExportSettings(model="resnet18", num_classes=10,
                                       preprocess=PreprocessSpec(input_size=32, resize=37)))
        run_bench_stage(run, BenchSettings(batch_sizes=(1, 2), warmup=1, min_time=0.1, max_time=0.5, min_iters=3),
                        progress=False)
    return run


@pytest.fixture(scope="module")
def report(run) -> dict:
    return write_report(run)


def test_percent_of_probe_column_holds_the_bench_figure(run, report):
    bench = {(r["variant"], r["batch"]): r for r in report["bench"]["rows"]}
    cols, keys = report["table"]["columns"], report["table"]["keys"]
    assert "% of probe @b2" in cols and keys[cols.index("% of probe @b2")] == "percent_of_probe"
    row = next(r for r in report["rows"] if r["variant"] == "fp32")
    measured = bench[("fp32", 2)]["percent_of_probe"]
    assert isinstance(measured, float) and measured > 0 and row["percent_of_probe"] == measured
    cell = report["table"]["rows"][report["rows"].index(row)][keys.index("percent_of_probe")]
    assert cell == fmt("percent_of_probe", measured) and cell.endswith("%") and float(cell[:-1]) > 0
    md = run.file("report/report.md").read_text()
    html = run.file("report/report.html").read_text()
    assert "% of probe @b2" in md and "% of probe @b2" in html
    assert next(ln for ln in md.splitlines() if ln.startswith("| fp32 |")).count(f"| {cell} |") == 1
    assert f">{cell}</td>" in html
    # the bench table (every row) carries it per batch
    b1 = fmt("percent_of_probe", bench[("fp32", 1)]["percent_of_probe"])
    assert "| % of probe |" in md and f"| {b1} |" in md


def test_machine_and_probe_figures_are_in_the_report(run, report):
    machine = report["machine"]
    peaks = machine["peaks"]
    assert machine["id"] and machine["ops_per_image"] > 0 and peaks["fp32_gflops"] > 0
    text = machine_text(machine)
    assert f"FP32 {peaks['fp32_gflops']} GFLOP/s" in text and "not a datasheet figure" in text
    assert machine["cpu"]["model_name"] in text
    for ext in ("md", "html"):
        page = run.file(f"report/report.{ext}").read_text()
        assert f"FP32 {peaks['fp32_gflops']} GFLOP/s" in page and "% of probe" in page
    assert machine_text(None).startswith("not recorded")


def test_terminal_summary_table_shows_percent_of_probe(run):
    rows = summary_rows(run)
    lines = format_table(rows).splitlines()
    assert "% of probe @b2" in lines[0]
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    line = next(ln for ln in lines if ln.startswith("fp32 "))
    assert fmt("percent_of_probe", fp32["percent_of_probe"]) in line.split()
