"""Extra report sections, one module each: a module in this package that defines
``build_section(src, report) -> Section | None`` (and optionally ``ORDER``, default 100) is found
and rendered in report.json (``report["sections"]``), report.md and report.html, after the
built-in tables. ``src`` is the report's Sources (manifest, stage results; ``src.read(rel)`` reads
and records another result file); ``report`` is the report dict built so far. Return None when
the run has nothing for the section. See /tmp/rexport_markers/report_api.md.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Section:
    """A titled table (and optional paragraphs) with the data behind it."""

    key: str                                   # identifier: report.json's sections[i]["key"]
    title: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)   # already formatted cells (use reporting.formatting.fmt)
    text: list[str] = field(default_factory=list)          # paragraphs shown above the table
    data: Any = None                                       # the numbers behind the table, for report.json


def section_builders() -> list:
    """Every ``build_section`` in this package, by ORDER then module name."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "build_section"):
            found.append((getattr(mod, "ORDER", 100), info.name, mod.build_section))
    return [b for _, _, b in sorted(found, key=lambda t: (t[0], t[1]))]


def section_plots() -> list:
    """Every plot function a section module lists in ``PLOTS``; each takes the report dict and returns
    (png base64 | None, caption), with an empty caption when the run has nothing to plot."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            found += list(getattr(importlib.import_module(f"{__name__}.{info.name}"), "PLOTS", ()))
    return found


def build_sections(src, report: dict) -> list[dict]:
    out = []
    for build in section_builders():
        sec = build(src, report)
        if sec is not None:
            out.append(asdict(sec))
    return out
