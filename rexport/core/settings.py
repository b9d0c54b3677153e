"""Settings are data: a stage's settings dataclass is the one source of its CLI options, of
``rexport run``'s options and of the keys of a config file. ``setting()`` declares a field with
what the command line needs to know; the CLI layer (rexport/cli/options.py) reads it back.

This module imports nothing of ours and nothing heavy, so any layer can declare settings.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING
from typing import Any, Callable

_KEY = "rexport"


def setting(default: Any = MISSING, *, help: str = "", cli: str | bool | None = None, run: str | bool | None = None,
            choices: tuple[str, ...] | None = None, parse: Callable[[Any], Any] | None = None,
            multiple: bool = False, metavar: str | None = None, aliases: tuple[str, ...] = (),
            flag_value: Any = None, default_factory: Callable[[], Any] | Any = MISSING) -> Any:
    """A dataclass field with its command-line description.

    cli:  the long option name on the stage command (default: the field name with '-'); False hides it.
    run:  the name on ``rexport run`` (default: the cli name, prefixed with the stage when two stages
          share it); False keeps it off ``run`` (e.g. quantize's --precision, which run decides).
    parse: str (or list, from a config file) -> field value, for types the annotation cannot say.
    multiple: the option may be repeated (``--tol a=1 --tol b=2``); parse then gets the tuple.
    aliases: extra names accepted on ``run`` (old spellings).
    flag_value: the option's value may be left out (``--ray`` alone gives flag_value, ``--ray ADDR`` ADDR).
    """
    meta = {_KEY: {"help": help, "cli": cli, "run": run, "choices": choices, "parse": parse,
                   "multiple": multiple, "metavar": metavar, "aliases": tuple(aliases),
                   "flag_value": flag_value}}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """One field of a settings dataclass, as the command line sees it."""

    field: str                 # the dataclass field name
    cli: str | None            # long option name without '--'; None: not on the stage command
    run: str | bool | None     # explicit run name, False: not on run, None: derived
    kind: str                  # bool | int | float | str | list | dict
    item: type | None          # list item type (int/float/str)
    length: int | None         # fixed list length (mean/std: 3)
    optional: bool             # None allowed
    required: bool             # no default
    default: Any
    help: str
    choices: tuple[str, ...] | None
    parse: Callable[[Any], Any] | None
    multiple: bool
    metavar: str | None
    aliases: tuple[str, ...]
    flag_value: Any = None


def _kind(tp) -> tuple[str, type | None, int | None, bool]:
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if tp is bool:
        return "bool", None, None, optional
    if tp in (int, float, str):
        return tp.__name__, None, None, optional
    if origin in (tuple, list):
        args = typing.get_args(tp)
        item = args[0] if args else str
        length = None if (not args or (len(args) == 2 and args[1] is Ellipsis)) else len(args)
        return "list", item if item in (int, float, str) else str, length, optional
    if origin is dict or tp is dict:
        return "dict", None, None, optional
    return "str", None, None, optional


def setting_specs(cls) -> list[SettingSpec]:
    """The command-line view of every field of ``cls`` (a dataclass), in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        m = dict(f.metadata.get(_KEY) or {})
        if dataclasses.is_dataclass(hints[f.name]):
            continue  # a nested record (ExportSettings.preprocess) is built by the stage's options class
        kind, item, length, optional = _kind(hints[f.name])
        cli = m.get("cli")
        name = None if cli is False else (cli or f.name.replace("_", "-"))
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else (f.default if f.default is not MISSING else f.default_factory())
        out.append(SettingSpec(field=f.name, cli=name, run=m.get("run"), kind=kind, item=item, length=length,
                               optional=optional or default is None, required=required, default=default,
                               help=m.get("help", ""), choices=m.get("choices"), parse=m.get("parse"),
                               multiple=bool(m.get("multiple")), metavar=m.get("metavar"),
                               aliases=tuple(m.get("aliases") or ()), flag_value=m.get("flag_value")))
    return out


def settings_dict(obj) -> dict:
    """A settings object as plain JSON/TOML-able data (tuples as lists), keyed by field name."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v
    return plain(obj)
