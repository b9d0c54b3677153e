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
@click.version_option(package_name="rexport")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool, as_json: bool, quiet: bool) -> None:
    """rexport: a ResNet classifier from PyTorch to a validated, measured inference engine."""
    ctx.obj = Ctx(debug, verbose, as_json, quiet)


# (module under rexport.cli, command function): one line per command; add yours here.
COMMANDS = [
    ("export", "export"),
    ("validate", "validate"),
    ("quantize", "quantize"),
    ("build", "build"),
    ("evaluate", "evaluate"),
    ("bench", "bench"),
    ("report", "report"),
    ("run", "run_cmd"),
    ("infer", "infer"),
    ("bundle", "bundle"),
]


def _register() -> None:
    import importlib

    for module, name in COMMANDS:
        cli.add_command(getattr(importlib.import_module(f"rexport.cli.{module}"), name))


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
