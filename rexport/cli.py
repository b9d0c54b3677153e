"""The ``rexport`` command line: a thin layer over the stage functions in ``rexport.pipeline``."""
from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
import traceback
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
        status = "reused" if rec.get("reused") else rec.get("status", "ok")
        extra = f"  ({rec['reason']})" if rec.get("reason") else ""
        self.line(f"{name:<24} {status:<8} {rec.get('duration_s', 0.0):7.1f} s{extra}")

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


def _open_run(out: str | None, model: str = "resnet18"):
    from rexport.pipeline.manifest import RunDir, default_run_dir

    run = RunDir(out or default_run_dir(model))
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
    run = _open_run(out, model)
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


def main() -> None:
    debug = "--debug" in sys.argv[1:]
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
