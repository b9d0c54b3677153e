"""``--config FILE`` on every command: a TOML (or YAML, with pyyaml) file whose keys are the
command's long option names (``calib-samples`` or ``calib_samples``). Flags given on the command
line override the file: the file only fills click's default map, and click's ParameterSource says
which value came from where. An unknown key is an error naming the nearest valid one."""
from __future__ import annotations

import difflib
import hashlib
import math
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from rexport.core.errors import InputError

#: the keys every command accepts that are not options of its own
_NOT_KEYS = {"config", "help", "print_config"}


def option_names(command: click.Command) -> dict[str, str]:
    """long option name (without '--', '-' separated) -> click parameter name, for ``command``."""
    out = {}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in _NOT_KEYS:
            continue
        for opt in [*p.opts, *p.secondary_opts]:
            if opt.startswith("--") and not opt.startswith("--no-"):
                out[opt[2:]] = p.name
    return out


def read_config(path: Path) -> dict[str, Any]:
    """The file's top-level table; bad syntax or a non-table is an InputError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}",
                         "pass a readable UTF-8 .toml or .yaml file") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{path} is YAML and pyyaml is not installed",
                             "pip install pyyaml, or write the config as TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}",
                             "fix the file (keys are the long option names)") from None
        data = {} if data is None else data
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise InputError("reading TOML on Python 3.10 needs tomli", "pip install tomli") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"config file {path} is not valid TOML: {e}",
                             "fix the file (keys are the long option names, e.g. calib-samples = 64)") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} is not a table of options", "write key = value lines")
    return data


def config_to_default_map(command: click.Command, data: dict[str, Any], path: Path) -> dict[str, Any]:
    """{parameter name: value} for click's default map; an unknown key raises InputError."""
    names = option_names(command)
    out = {}
    for key, value in data.items():
        norm = str(key).replace("_", "-")
        if norm not in names:
            near = difflib.get_close_matches(norm, list(names), n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(sorted(names))}"
            raise InputError(f"unknown key '{key}' in config file {path} for 'rexport {command.name}'", hint)
        if isinstance(value, dict):
            raise InputError(f"key '{key}' in config file {path} is a table",
                             "keys are flat: the long option names of the command")
        out[names[norm]] = value
    return out


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    path = Path(value)
    data = read_config(path)
    default_map = dict(ctx.default_map or {})
    default_map.update(config_to_default_map(ctx.command, data, path))
    ctx.default_map = default_map
    ctx.meta["rexport.config"] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                  "keys": sorted(data)}


def config_option() -> click.Option:
    """``--config FILE``: added to every command by rexport.cli (eager: read before other options)."""
    return click.Option(["--config"], type=click.Path(exists=True, dir_okay=False), is_eager=True,
                        expose_value=False, callback=_load,
                        help="TOML (or YAML) file of this command's options (keys: long option names); "
                             "flags on the command line win.")


def sources(ctx: click.Context) -> dict[str, list[str]]:
    """Which options came from the command line and which from the config file (long names)."""
    by_param = {p: n for n, p in option_names(ctx.command).items()}
    out: dict[str, list[str]] = {"command_line": [], "config_file": []}
    for pname, name in sorted(by_param.items()):
        src = ctx.get_parameter_source(pname)
        if src == ParameterSource.COMMANDLINE:
            out["command_line"].append(name)
        elif src == ParameterSource.DEFAULT_MAP:
            out["config_file"].append(name)
    return out


# -- writing a config back (rexport run --print-config) -----------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) else "nan"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def _toml_key(k: str) -> str:
    return k if all(c.isalnum() or c in "-_" for c in k) else _toml_value(k)


def to_toml(values: dict[str, Any], header: list[str] = ()) -> str:
    """Flat ``key = value`` lines; a None value (not set: the default applies) is a comment."""
    lines = [f"# {h}" for h in header]
    for k, v in values.items():
        lines.append(f"# {k} =   (not set)" if v is None else f"{_toml_key(k)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
