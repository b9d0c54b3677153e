"""The ``rexport`` command line: a thin layer over the stage functions in ``rexport.pipeline``."""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import traceback
import warnings
from pathlib import Path

import click

from rexport.core.errors import CheckFailed, InputError, RexportError

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d")


class Ctx:
    def __init__(self, debug: bool, verbose: bool, as_json: bool, quiet: bool) -> None:
        self.debug, self.verbose, self.json, self.quiet = debug, verbose, as_json, quiet

    def line(self, text: str) -> None:
        if not self.json and not self.quiet:
            click.echo(text)

    def stage(self, name: str, rec: dict) -> None:
        """One line per stage: name, status, elapsed time."""
        reused = rec.get("reused")
        status = "reused" if reused else rec.get("status", "ok")
        extra = f"  ({rec['reason']})" if rec.get("reason") else ""
        elapsed = 0.0 if reused else rec.get("duration_s", 0.0)  # a reused stage did no work now
        self.line(f"{name:<24} {status:<8} {elapsed:7.1f} s{extra}")

    def emit(self, obj) -> None:
        if self.json:
            click.echo(json.dumps(obj, indent=2, default=str))


def _csv(kind):
    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}") from None
    return convert


def _open_run(out: str | None, model: str = "resnet18", *, must_exist: bool = True):
    from rexport.pipeline.manifest import RunDir, default_run_dir

    run = RunDir(out or default_run_dir(model))
    if must_exist and not run.exists():
        raise InputError(f"no run in {run.path} (no manifest.json)", "run 'rexport export' first (or pass --out)")
    return run


def _log_command(run) -> None:
    run.log("$ rexport " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


def out_option(f):
    return click.option("--out", "out", type=click.Path(file_okay=False), default=None,
                        help="Run directory (default artifacts/<model>, model default resnet18).")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-v", "--verbose", is_flag=True, help="Say more.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or stage lines.")
@click.version_option(package_name="rexport")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool, as_json: bool, quiet: bool) -> None:
    """rexport: a ResNet classifier from PyTorch to a validated, measured inference engine."""
    ctx.obj = Ctx(debug, verbose, as_json, quiet)


# -- export ----------------------------------------------------------------------------------

def _floats3(ctx, param, value):
    if value is None:
        return None
    vals = _csv(float)(ctx, param, value)
    if len(vals) != 3:
        raise click.BadParameter("takes three comma-separated values, e.g. 0.485,0.456,0.406")
    return vals


@cli.command()
@click.option("--model", default="resnet18", show_default=True, help=f"One of: {', '.join(MODEL_NAMES)}.")
@click.option("--weights", type=str, default=None, help="Checkpoint (.pth/.pt/.safetensors); none = seeded random init.")
@click.option("--num-classes", type=int, default=None, help="Head size (default: from the checkpoint, else 1000).")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickles that run code. Only for files you trust.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random init.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 17: TensorRT 8.5 and later).")
@click.option("--input-size", type=int, default=224, show_default=True)
@click.option("--resize", type=int, default=None, help="Shorter side before the centre crop (default input*256/224).")
@click.option("--mean", callback=_floats3, default=None, help="Per-channel mean (default ImageNet).")
@click.option("--std", callback=_floats3, default=None, help="Per-channel std (default ImageNet).")
@click.option("--bgr", is_flag=True, help="The model expects BGR channel order.")
@click.option("--labels", type=str, default=None, help="Text file with one class name per line.")
@click.option("--batch", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--force", is_flag=True, help="Redo even if unchanged.")
@out_option
@click.pass_obj
def export(c: Ctx, model, weights, num_classes, trust_checkpoint, seed, opset, input_size, resize, mean, std,
           bgr, labels, batch, force, out):
    """PyTorch -> ONNX (onnx/model.fp32.onnx), with the preprocessing in its metadata."""
    from rexport.pipeline.export import export_settings_from_options, run_export

    settings = export_settings_from_options(model=model, weights=weights, num_classes=num_classes,
                                            trust_checkpoint=trust_checkpoint, seed=seed, opset=opset,
                                            input_size=input_size, resize=resize, mean=mean, std=std, bgr=bgr,
                                            labels=labels, batch=batch)
    run = _open_run(out, model, must_exist=False)
    created = not run.path.exists()
    try:
        with run.locked():
            _log_command(run)
            rec = run_export(run, settings, force=force)
    except BaseException:
        if created:  # leave nothing behind for a run that never produced a model
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    c.stage("export", rec)
    if rec["summary"].get("random_weights"):
        c.line(f"note: no --weights given: seeded random init (seed {seed}); accuracy figures mean nothing")
    c.line(f"wrote {run.file('onnx/model.fp32.onnx')}")
    c.emit(rec)


# -- validate --------------------------------------------------------------------------------

@cli.command()
@click.option("--variant", "variants", multiple=True, help="Variant(s) to check (default: every one present).")
@click.option("--onnx", "onnx_file", type=str, default=None, help="Check this ONNX file instead of a run variant.")
@click.option("--data", default="synthetic", show_default=True, help="Image folder, or 'synthetic'.")
@click.option("--samples", type=int, default=16, show_default=True)
@click.option("--batch-sizes", callback=_csv(int), default="1,8", show_default=True)
@click.option("--tol", "tols", multiple=True, help="Override a tolerance, e.g. --tol cosine_min=0.99.")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def validate(c: Ctx, variants, onnx_file, data, samples, batch_sizes, tols, force, out):
    """Compare variants with the PyTorch FP32 reference (exit 1 when out of tolerance)."""
    from rexport.pipeline.validate import ValidateSettings, run_validate, validate_onnx_file

    overrides = {}
    for t in tols:
        name, sep, value = t.partition("=")
        try:
            overrides[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"bad --tol {t!r}", "use NAME=NUMBER, e.g. --tol cosine_min=0.99") from None
    settings = ValidateSettings(data=data, samples=samples, batch_sizes=batch_sizes, tolerances=overrides)
    run = _open_run(out)
    if onnx_file:
        res = validate_onnx_file(onnx_file, run, settings)
        _print_validation(c, res["variant"], res)
        c.emit(res)
        if not res["passed"]:
            raise CheckFailed(f"{res['variant']}: out of tolerance: {'; '.join(res['failures'])}")
        return
    with run.locked():
        _log_command(run)
        recs = run_validate(run, settings, list(variants) or None, force=force)
    if run.require_export()["summary"].get("random_weights"):
        c.line("note: the model has seeded random weights (no --weights): agreement figures are not a trained model's")
    failed = []
    for rec in recs:
        c.stage(f"validate:{rec['variant']}", rec)
        res = json.loads(run.file(f"validate/{rec['variant']}.json").read_text())
        _print_validation(c, rec["variant"], res)
        if not res["passed"]:
            failed.append(rec["variant"])
    c.emit([json.loads(run.file(f"validate/{r['variant']}.json").read_text()) for r in recs])
    if failed:
        raise CheckFailed(f"out of tolerance: {', '.join(failed)} (see {run.path / 'validate'})")


def _print_validation(c: Ctx, name: str, res: dict) -> None:
    m = res["metrics"]
    c.line(f"  {name}: max abs {m['max_abs']:.3g}, err/max {m['err_over_max']:.3g}, err/range {m['rel_to_range']:.3g}, "
           f"cosine {m['cosine_min']:.6f}, top-1 agree {m['top1_agreement']:.1%} "
           f"[{res['inputs']['kind']}, {res['inputs']['samples']} samples] -> {'PASS' if res['passed'] else 'FAIL'}")
    if res.get("against_source"):
        a = res["against_source"]
        c.line(f"    vs its {a['variant']} ONNX: err/range {a['metrics']['rel_to_range']:.3g}, "
               f"cosine {a['metrics']['cosine_min']:.6f} -> {'PASS' if a['passed'] else 'FAIL'}")
    for f in res["failures"]:
        c.line(f"    {f}")


# -- quantize --------------------------------------------------------------------------------

@cli.command()
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True)
@click.option("--calib-data", default="synthetic", show_default=True,
              help="Image folder, .npy/.npz of preprocessed arrays, or 'synthetic'.")
@click.option("--calib-samples", type=int, default=512, show_default=True)
@click.option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile"]), default="entropy",
              show_default=True)
@click.option("--calib-batch-size", type=int, default=8, show_default=True)
@click.option("--exclude", multiple=True, help="Node name to leave in float (repeatable).")
@click.option("--skip-first-conv", is_flag=True, help="Leave the stem convolution in float.")
@click.option("--skip-classifier", is_flag=True, help="Leave the final fully connected layer in float.")
@click.option("--residual-qdq", type=click.Choice(["both", "residual"]), default="both", show_default=True,
              help="Q/DQ on both inputs of each residual Add (OpenVINO fuses Conv+Add), or on the residual "
                   "input only (TensorRT's recommended placement).")
@click.option("--quiet", "no_progress", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def quantize(c: Ctx, precision, calib_data, calib_samples, calib_method, calib_batch_size, exclude,
             skip_first_conv, skip_classifier, residual_qdq, no_progress, force, out):
    """FP16 (mixed precision) or INT8 (explicit Q/DQ from our calibration) ONNX variants."""
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    settings = QuantizeSettings(precision=precision, calib_data=calib_data, calib_samples=calib_samples,
                                calib_method=calib_method, calib_batch_size=calib_batch_size, exclude=exclude,
                                skip_first_conv=skip_first_conv, skip_classifier=skip_classifier,
                                residual_add=residual_qdq)
    run = _open_run(out)
    with run.locked():
        _log_command(run)
        rec = run_quantize(run, settings, progress=not (c.quiet or c.json or no_progress), force=force)
    c.stage(f"quantize:{precision}", rec)
    cal = rec.get("summary", {}).get("calibration")
    if cal:
        c.line(f"  calibration: {cal['method']} on {cal['description']}"
               f"{' (cache reused)' if cal.get('reused') else ''}")
        if cal.get("synthetic"):
            c.line("  warning: synthetic calibration data: INT8 ranges are not representative of real images")
    c.line(f"wrote {run.file(f'onnx/model.{precision}.onnx')}")
    c.emit(rec)


# -- build -----------------------------------------------------------------------------------

@cli.command()
@click.option("--backend", default="auto", show_default=True, help="auto, tensorrt or openvino.")
@click.option("--precision", "precisions", multiple=True, help="Engine precision(s); default: all the backend offers.")
@click.option("--min-batch", type=int, default=1, show_default=True)
@click.option("--opt-batch", type=int, default=8, show_default=True)
@click.option("--max-batch", type=int, default=32, show_default=True)
@click.option("--workspace", type=int, default=None, help="TensorRT workspace limit in MiB.")
@click.option("--timing-cache", type=str, default=None, help="TensorRT timing cache file, reused across builds.")
@click.option("--builder-opt-level", type=int, default=None, help="TensorRT builder optimization level (0-5).")
@click.option("--legacy", is_flag=True, help="TensorRT: weak-typed network with precision flags (automatic on 8.x).")
@click.option("--dla-core", type=int, default=None, help="TensorRT legacy path: build for this DLA core.")
@click.option("--version-compatible", is_flag=True, help="TensorRT >= 8.6: a plan for later TensorRT versions.")
@click.option("--hardware-compatible", is_flag=True, help="TensorRT >= 8.6: a plan for all Ampere+ GPUs.")
@click.option("--threads", type=int, default=None, help="OpenVINO inference threads (default: all cores).")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def build(c: Ctx, backend, precisions, min_batch, opt_batch, max_batch, workspace, timing_cache, builder_opt_level,
          legacy, dla_core, version_compatible, hardware_compatible, threads, force, out):
    """Compile the ONNX variants into engines (TensorRT on a GPU, OpenVINO on a CPU)."""
    from rexport.pipeline.backends import BuildSettings
    from rexport.pipeline.build import build_engines

    settings = BuildSettings(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_mib=workspace,
                             timing_cache=timing_cache, builder_opt_level=builder_opt_level, legacy=legacy,
                             dla_core=dla_core, version_compatible=version_compatible,
                             hardware_compatible=hardware_compatible, threads=threads)
    from rexport.pipeline.backends import get_backend

    run = _open_run(out)
    run.require_export()
    chosen = get_backend(backend)
    if chosen.unavailable_reason():  # refuse before touching the run directory
        raise chosen.missing_dependency()
    with run.locked():
        _log_command(run)
        recs = build_engines(run, backend=backend, precisions=list(precisions) or None, settings=settings,
                             progress=not (c.quiet or c.json))
    for r in recs:
        c.stage(r.get("name", "build"), r)
    c.emit(recs)


# -- evaluate --------------------------------------------------------------------------------

@cli.command()
@click.option("--val-data", required=True, help="Labelled data: class_name/*.jpg folder or .npz with x and y.")
@click.option("--samples", type=int, default=None, help="Evaluate a seeded random subset of this size.")
@click.option("--variant", "variants", multiple=True, help="Variant(s) to evaluate (default: every one present).")
@click.option("--force", is_flag=True)
@out_option
@click.pass_obj
def evaluate(c: Ctx, val_data, samples, variants, force, out):
    """Top-1/top-5 accuracy of every variant on labelled data, and the drop against FP32."""
    from rexport.pipeline.evaluate import EvaluateSettings, run_evaluate

    run = _open_run(out)
    with run.locked():
        _log_command(run)
        recs = run_evaluate(run, EvaluateSettings(val_data=val_data, samples=samples), list(variants) or None,
                            force=force)
    for r in recs:
        c.stage(f"evaluate:{r['variant']}", r)
        res = json.loads(run.file(f"eval/{r['variant']}.json").read_text())
        drop = res["drop_top1_vs_fp32"]
        c.line(f"  {r['variant']}: top-1 {res['top1']:.2%}, top-5 {res['top5']:.2%} on {res['n']} images"
               + (f", drop vs FP32 {drop * 100:+.2f} pt" if drop is not None and r['variant'] != 'pytorch' else ""))
    for w in (recs[0].get("warnings") if recs else []) or []:
        c.line(f"warning: {w}")
    c.emit([json.loads(run.file(f"eval/{r['variant']}.json").read_text()) for r in recs])


# -- bench -----------------------------------------------------------------------------------

@cli.command()
@click.option("--backends", callback=_csv(str), default=None, help="Filter: pytorch,onnxruntime,openvino,tensorrt.")
@click.option("--precisions", callback=_csv(str), default=None, help="Filter: fp32,fp16,bf16,int8.")
@click.option("--batch-sizes", callback=_csv(int), default="1,8", show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--min-time", type=float, default=1.0, show_default=True, help="Seconds of timed runs per row, at least.")
@click.option("--threads", type=int, default=None)
@out_option
@click.pass_obj
def bench(c: Ctx, backends, precisions, batch_sizes, warmup, min_time, threads, out):
    """Latency (p50/p90/p99, mean, std) and throughput per variant x batch size."""
    from rexport.pipeline.bench import BenchSettings
    from rexport.pipeline.run import _artifact_inputs, _bench_action, _bench_record

    settings = BenchSettings(backends=backends, precisions=precisions, batch_sizes=batch_sizes, warmup=warmup,
                             min_time=min_time, threads=threads)
    run = _open_run(out)
    run.require_export()
    with run.locked():
        _log_command(run)
        rec = run.run_stage("bench", inputs=_artifact_inputs(run), settings=_bench_record(settings),
                            action=lambda: _bench_action(run, settings, not (c.quiet or c.json)), force=True)
    c.stage("bench", rec)
    results = json.loads(run.file("bench/results.json").read_text())
    for r in results["rows"]:
        if r.get("status") == "ok":
            c.line(f"  {r['variant']:<16} b{r['batch']:<3} p50 {r['p50_ms']:8.2f} ms  {r['images_per_s']:8.1f} img/s")
        else:
            c.line(f"  {r['variant']:<16} b{r.get('batch', '-')!s:<3} {r.get('status')}: {r.get('reason')}")
    c.emit(results)


# -- report ----------------------------------------------------------------------------------

@cli.command()
@out_option
@click.pass_obj
def report(c: Ctx, out):
    """Write report/report.{json,md,html} from the manifest and the stage results."""
    from rexport.pipeline.run import _report_action

    run = _open_run(out)
    run.require_export()
    with run.locked():
        _log_command(run)
        rec = run.run_stage("report", inputs={}, settings={}, action=lambda: _report_action(run), force=True)
    c.stage("report", rec)
    c.line(f"report: {run.file('report/report.html')}")
    c.emit(json.loads(run.file("report/report.json").read_text()))


# -- run -------------------------------------------------------------------------------------

@cli.command("run")
@click.option("--model", default="resnet18", show_default=True)
@click.option("--weights", type=str, default=None)
@click.option("--num-classes", type=int, default=None)
@click.option("--trust-checkpoint", is_flag=True)
@click.option("--labels", type=str, default=None)
@click.option("--input-size", type=int, default=224, show_default=True)
@click.option("--resize", type=int, default=None, help="Shorter side before the centre crop (default input*256/224).")
@click.option("--mean", callback=_floats3, default=None, help="Per-channel mean (default ImageNet).")
@click.option("--std", callback=_floats3, default=None, help="Per-channel std (default ImageNet).")
@click.option("--opset", type=int, default=None)
@click.option("--calib-data", default="synthetic", show_default=True)
@click.option("--calib-samples", type=int, default=512, show_default=True)
@click.option("--calib-method", type=click.Choice(["entropy", "minmax", "percentile"]), default="entropy",
              show_default=True)
@click.option("--val-data", default=None, help="Labelled data for the accuracy stage.")
@click.option("--val-samples", type=int, default=None)
@click.option("--precisions", callback=_csv(str), default="fp32,fp16,int8", show_default=True)
@click.option("--backend", default="auto", show_default=True)
@click.option("--bench-min-time", type=float, default=1.0, show_default=True)
@out_option
@click.pass_obj
def run_cmd(c: Ctx, model, weights, num_classes, trust_checkpoint, labels, input_size, resize, mean, std, opset,
            calib_data,
            calib_samples, calib_method, val_data, val_samples, precisions, backend, bench_min_time, out):
    """Every stage: export, validate, fp16, int8, engines, evaluate, bench, report."""
    from rexport.pipeline.export import export_settings_from_options
    from rexport.pipeline.report import format_table, summary_rows
    from rexport.pipeline.run import RunSettings, run_all, run_notes

    export_settings = export_settings_from_options(
        model=model, weights=weights, num_classes=num_classes, trust_checkpoint=trust_checkpoint, seed=0,
        opset=opset, input_size=input_size, resize=resize, mean=mean, std=std, bgr=False, labels=labels,
        batch="dynamic")
    settings = RunSettings(export=export_settings, precisions=precisions, backend=backend, calib_data=calib_data,
                           calib_samples=calib_samples, calib_method=calib_method, val_data=val_data,
                           val_samples=val_samples, bench_min_time=bench_min_time,
                           command="rexport " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                           progress=not (c.quiet or c.json))
    run = _open_run(out, model, must_exist=False)
    created = not run.path.exists()
    try:
        with run.locked():
            _log_command(run)
            outcome = run_all(run, settings, c.stage)
    except BaseException:
        if created and (run.stage("export") or {}).get("status") != "ok":
            shutil.rmtree(run.path, ignore_errors=True)  # nothing usable was made: leave nothing behind
        raise
    say = (lambda text: None) if c.json else click.echo   # the summary shows even with -q
    say("")
    say(format_table(summary_rows(run)))
    for note in run_notes(run, weights=weights, calib_data=calib_data, precisions=precisions, val_data=val_data):
        say(f"note: {note}")
    say(f"report: {run.file('report/report.html')}  ({outcome['seconds']:.0f} s)")
    c.emit({"failed": outcome["failed"], "report": str(run.file("report/report.json"))})
    if outcome["failed"]:
        raise CheckFailed(f"checks failed: {', '.join(outcome['failed'])} (see the report)")


# -- infer / bundle --------------------------------------------------------------------------

@cli.command()
@click.argument("artifact")
@click.argument("images", nargs=-1)
@click.option("--topk", type=click.IntRange(min=1), default=5, show_default=True)
@click.pass_obj
def infer(c: Ctx, artifact, images, topk):
    """Classify image files with an .onnx, a .plan, an OpenVINO .xml or an engine folder."""
    from rexport.pipeline.infer import infer_images

    results = infer_images(artifact, list(images), topk=topk)
    if results and results[0]["random_weights"]:
        c.line("note: this model has seeded random weights (exported without --weights): its classes mean nothing")
    for r in results:
        c.line(r["image"])
        for t in r["top"]:
            name = f" {t['label']}" if t["label"] else ""
            c.line(f"  {t['probability']:7.2%}  class {t['class']}{name}")
    c.emit(results)


@cli.command()
@click.option("--variants", callback=_csv(str), default=None, help="Variants to bundle (default: see README).")
@click.option("--dest", type=str, default=None, help="Bundle folder or .tar.gz path (default RUN/bundle).")
@click.option("--archive", is_flag=True, help="Write a .tar.gz instead of a folder.")
@click.option("--build-on-device", is_flag=True, help="Carry ONNX + calibration caches + a build script, not plans.")
@out_option
@click.pass_obj
def bundle(c: Ctx, variants, dest, archive, build_on_device, out):
    """A folder or .tar.gz to copy to a device: engines/ONNX, sidecars, labels, preprocessing, a runner."""
    from rexport.pipeline.bundle import make_bundle

    run = _open_run(out)
    run.require_export()
    with run.locked():
        _log_command(run)
        path = make_bundle(run, variants=variants, dest=Path(dest) if dest else None, archive=archive,
                           build_on_device=build_on_device)
    c.line(f"wrote {path}")
    c.emit({"bundle": str(path)})


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    if not debug:
        warnings.formatwarning = _one_line_warning
    try:
        cli.main(standalone_mode=False, prog_name="rexport")
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except RexportError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # an unexpected failure: one line, traceback only with --debug
        if debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        click.echo(f"error: {type(e).__name__}: {first} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
