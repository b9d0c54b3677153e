"""Click options generated from settings dataclasses (rexport.core.settings), so a stage command,
``rexport run`` and config files cannot drift: see /tmp/rexport_markers/cli_conventions.md."""
from __future__ import annotations

from typing import Any, Iterable

import click

from rexport.core.settings import SettingSpec, setting_specs


class ListType(click.ParamType):
    """A comma-separated list ("1,8"), or a list from a config file; ``length`` fixes its size."""

    def __init__(self, item: type, length: int | None = None) -> None:
        self.item, self.length = item, length
        self.name = f"{item.__name__}-list"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple) and all(isinstance(v, self.item) for v in value):
            return value
        parts = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        try:
            out = tuple(self.item(str(v).strip()) if self.item is not str else str(v).strip() for v in parts)
        except ValueError:
            self.fail(f"expected comma-separated {self.item.__name__} values, got {value!r}", param, ctx)
        if self.length is not None and len(out) != self.length:
            self.fail(f"takes {self.length} comma-separated values, got {len(out)}", param, ctx)
        return out

    def get_metavar(self, param, *args, **kwargs):  # click 8.1 and 8.2 signatures
        return f"{self.item.__name__.upper()}[,...]" if self.length is None else ",".join(["X"] * self.length)


def _show(default) -> Any:
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return default


def make_option(spec: SettingSpec, name: str, param: str, *, aliases: Iterable[str] = (),
                required: bool = False) -> click.Option:
    """The click option for one setting, called ``--name`` (plus aliases), passed as ``param``."""
    decls = [f"--{name}", *(f"--{a}" for a in aliases), param]
    kw: dict[str, Any] = {"help": spec.help or None}
    if spec.metavar:
        kw["metavar"] = spec.metavar
    if spec.kind == "bool" and not spec.multiple:
        if spec.default:
            decls[0] = f"--{name}/--no-{name}"
        return click.Option(decls, is_flag=True, default=bool(spec.default), show_default=bool(spec.default), **kw)
    if spec.multiple or spec.kind == "dict":
        return click.Option(decls, multiple=True, default=None, **kw)
    if spec.flag_value is not None:  # --ray alone, or --ray ADDRESS
        return click.Option(decls, is_flag=False, flag_value=spec.flag_value, default=None, **kw)
    if spec.parse is not None:
        kind = click.STRING
    elif spec.choices:
        kind = click.Choice(list(spec.choices))
    elif spec.kind == "list":
        kind = ListType(spec.item or str, spec.length)
    else:
        kind = {"int": click.INT, "float": click.FLOAT}.get(spec.kind, click.STRING)
    show = spec.default is not None
    return click.Option(decls, type=kind, default=None if spec.required else _show(spec.default),
                        required=required, show_default=show, **kw)


def value_of(spec: SettingSpec, raw: Any) -> Any:
    """An option's parsed value as the dataclass field wants it."""
    if spec.multiple or spec.kind == "dict":
        raw = tuple(raw or ())
        if spec.parse is not None:
            return spec.parse(raw)
        return raw
    if raw is None:
        return None
    if spec.parse is not None:
        return spec.parse(raw)
    return raw


def settings_options(cls, *, exclude: Iterable[str] = ()):
    """Decorator: one option per field of ``cls`` (named by the field's ``cli`` name, passed by field name)."""
    skip = set(exclude)

    def deco(f):
        for spec in reversed(setting_specs(cls)):
            if spec.cli and spec.field not in skip:
                opt = make_option(spec, spec.cli, spec.field, required=spec.required)
                f.__click_params__ = [*getattr(f, "__click_params__", []), opt]
        return f
    return deco


def settings_from_kwargs(cls, kwargs: dict, **fixed):
    """An instance of ``cls`` from a command's kwargs; pops the field values out of ``kwargs`` (what
    is left are the command's own flags). ``fixed`` gives fields that are not options."""
    values = {}
    for spec in setting_specs(cls):
        if spec.field in kwargs:
            raw = kwargs.pop(spec.field)
            if spec.field not in fixed:
                values[spec.field] = value_of(spec, raw)
    values = {k: v for k, v in values.items() if v is not None or not _required(cls, k)}
    return cls(**{**values, **fixed})


def _required(cls, field: str) -> bool:
    return any(s.field == field and s.required for s in setting_specs(cls))


# -- rexport run: every stage's options ---------------------------------------------------------

def run_names(stages) -> dict[tuple[str, str], str]:
    """(stage, field) -> option name on ``run``. ``stages`` is pipeline.run.run_stages(): (stage, class,
    prefix, prefix_all). An explicit ``setting(run=...)`` wins; else the stage command's name, prefixed
    (once) when the stage prefixes all its fields or another stage uses the same name; the first two
    stages (run's own options, export) keep bare names."""
    count: dict[str, int] = {}
    for stage, cls, *_ in stages:
        for spec in setting_specs(cls):
            if spec.cli and spec.run is not False:
                count[spec.cli] = count.get(spec.cli, 0) + 1
    bare = {stages[0][0], stages[1][0]}
    out = {}
    for stage, cls, prefix, prefix_all in stages:
        for spec in setting_specs(cls):
            if not spec.cli or spec.run is False:
                continue
            name = spec.run if isinstance(spec.run, str) else spec.cli
            if not isinstance(spec.run, str) and stage not in bare and (prefix_all or count[spec.cli] > 1):
                name = name if name.startswith(prefix + "-") else f"{prefix}-{name}"
            out[(stage, spec.field)] = name
    taken: dict[str, tuple[str, str]] = {}
    for key, name in out.items():
        if name in taken:
            raise RuntimeError(f"run option --{name} is declared twice: {taken[name]} and {key}")
        taken[name] = key
    return out


def run_options(stages):
    """Decorator: ``run``'s options, one per (stage, field); the param name is the option name."""
    names = run_names(stages)

    def deco(f):
        for stage, cls, *_ in reversed(stages):
            for spec in reversed(setting_specs(cls)):
                name = names.get((stage, spec.field))
                if name:
                    opt = make_option(spec, name, name.replace("-", "_"), aliases=spec.aliases)
                    f.__click_params__ = [*getattr(f, "__click_params__", []), opt]
        return f
    return deco


def run_values(stages, kwargs: dict, ctx: click.Context | None = None) -> dict[str, dict]:
    """stage -> {field: value} from ``run``'s kwargs (popped): only what the user gave, on the command
    line or in a config file (with ``ctx``, click's ParameterSource tells; a default is left out, so
    the stage's own default, or run's choice such as real images for validation, applies)."""
    from click.core import ParameterSource

    names = run_names(stages)
    out: dict[str, dict] = {stage: {} for stage, *_ in stages}
    for stage, cls, *_ in stages:
        for spec in setting_specs(cls):
            name = names.get((stage, spec.field))
            if name is None:
                continue
            param = name.replace("-", "_")
            v = value_of(spec, kwargs.pop(param))
            if ctx is not None and ctx.get_parameter_source(param) in (ParameterSource.DEFAULT, None):
                continue
            if v is not None:
                out[stage][spec.field] = v
    return out
