"""The ``rexport`` command line: a thin layer over the stage functions in ``rexport.pipeline``.

One module per command; this one holds the group, the registration and ``main`` (exit codes, one-line errors).
"""
from __future__ import annotations

import sys
import traceback
import warnings

import click

from rexport.cli.common import Ctx
from rexport.core.errors import RexportError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-v", "--verbose", is_flag=True, help="Say more.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable results.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or stage lines.")
@click.option("--progress", "progress", type=click.Choice(["auto", "bar", "plain", "none"]), default="auto",
              show_default=True, help="Progress of long work: a live bar, one line per 10% (logs, CI), or none; "
                                      "auto: a bar on a terminal, plain lines otherwise.")
@click.version_option(package_name="rexport")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool, as_json: bool, quiet: bool, progress: str) -> None:
    """rexport: a ResNet classifier from PyTorch to a validated, measured inference engine."""
    from rexport.core.progress import set_mode

    set_mode("none" if quiet or as_json else progress)
    ctx.obj = Ctx(debug, verbose, as_json, quiet)


# (module under rexport.cli, command function): one line per command; add yours here.
COMMANDS = [
    ("export", "export"),
    ("import_cmd", "import_cmd"),
    ("validate", "validate"),
    ("quantize", "quantize"),
    ("build", "build"),
    ("evaluate", "evaluate"),
    ("bench", "bench"),
    ("report", "report"),
    ("run", "run_cmd"),
    ("infer", "infer"),
    ("bundle", "bundle"),
    ("matrix", "matrix"),
]


def _register() -> None:
    import importlib

    from rexport.cli.config import config_option

    for module, name in COMMANDS:
        command = getattr(importlib.import_module(f"rexport.cli.{module}"), name)
        if not any(p.name == "config" for p in command.params):
            command.params.insert(0, config_option())  # --config FILE on every command
        cli.add_command(command)


_register()


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
        _log_failure(f"error: {e}")
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _log_failure("interrupted")
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # an unexpected failure: one line here, the traceback in run.log (and with --debug)
        if debug:
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        where = _log_failure(f"error: {type(e).__name__}: {first}\n{traceback.format_exc().rstrip()}")
        see = f"the traceback is in {where}" if where else "run with --debug for the traceback"
        click.echo(f"error: {type(e).__name__}: {first} ({see})", err=True)
        sys.exit(1)


def _log_failure(text: str) -> str | None:
    """Append a failure (with its traceback) to the run's run.log, so a bug report carries it."""
    from rexport.cli import common

    run = common.current_run
    if run is None or not run.path.is_dir():  # none, or removed: a failed first export leaves nothing behind
        return None
    try:
        run.log(text)
    except OSError:
        return None
    return str(run.file("run.log"))


if __name__ == "__main__":
    main()
