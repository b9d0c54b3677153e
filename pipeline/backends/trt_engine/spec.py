"""The vocabulary of a TensorRT build: the error a user can fix, what to build (``BuildSpec``), the
precisions and the two build paths. Imports nothing but the standard library."""
from __future__ import annotations

from dataclasses import dataclass

STRONGLY_TYPED, WEAK_TYPED = "strongly_typed", "weak_typed"
PRECISIONS = ("fp32", "fp16", "int8")
FLOAT_PARTS = ("fp16", "fp32")


class TrtError(Exception):
    """A problem the user can fix: shown as one line (exit 2); ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class BuildSpec:
    """What to build. ``int8_float``: on the weak path, the precision of what the INT8 file keeps in float
    (None: the file's own, from its layer intent; fp16 without one)."""

    precision: str = "int8"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int | None = None
    timing_cache: str | None = None
    builder_opt_level: int | None = None
    legacy: bool = False
    dla_core: int | None = None
    version_compatible: bool = False
    hardware_compatible: bool = False
    int8_float: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise TrtError(f"tensorrt has no precision {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise TrtError(f"bad batch profile {self.min_batch}/{self.opt_batch}/{self.max_batch}",
                           "need 1 <= min batch <= opt batch <= max batch")
        if self.int8_float not in (None, *FLOAT_PARTS):
            raise TrtError(f"int8_float must be fp16 or fp32, not {self.int8_float!r}")
