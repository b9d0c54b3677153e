"""What every command module shares: the context object, option helpers, opening a run directory."""
from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import sys
from typing import Callable, Iterator

import click

from rexport.core.errors import InputError

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


def csv_list(kind):
    def convert(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}") from None
    return convert


def open_run(out: str | None, model: str = "resnet18", *, must_exist: bool = True):
    from rexport.pipeline.manifest import RunDir, default_run_dir

    run = RunDir(out or default_run_dir(model))
    if must_exist and not run.exists():
        raise InputError(f"no run in {run.path} (no manifest.json)", "run 'rexport export' first (or pass --out)")
    return run


@contextlib.contextmanager
def new_run_guard(run, made: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Leave nothing behind for a command that created ``run`` and failed before ``made()`` (e.g. the
    model was exported): a half-made run directory would look like a run."""
    created = not run.path.exists()
    try:
        yield
    except BaseException:
        if created and not made():
            shutil.rmtree(run.path, ignore_errors=True)
        raise


#: the run directory the current command writes to: main() logs a failure's traceback to its run.log
current_run = None


def log_command(run) -> None:
    global current_run
    current_run = run
    run.log("$ rexport " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    ctx = click.get_current_context(silent=True)
    config = ctx.meta.get("rexport.config") if ctx is not None else None
    if config:  # the stage records its effective settings; the log says where they came from
        run.log(f"config: {config['path']} (sha256 {config['sha256'][:12]}, keys: {', '.join(config['keys'])})")


def out_option(f):
    return click.option("--out", "out", type=click.Path(file_okay=False), default=None,
                        help="Run directory (default artifacts/<model>, model default resnet18).")(f)
