"""Errors that reach the user as one line and an exit code (see ARCHITECTURE.md)."""
from __future__ import annotations


class RexportError(Exception):
    """Base error: ``message`` says what was wrong, ``hint`` what to do about it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class InputError(RexportError):
    """Bad input, usage or environment: exit code 2."""

    exit_code = 2


class MissingDependency(InputError):
    """An optional runtime (TensorRT, a CUDA device, BF16 hardware...) is not available here."""


class CheckFailed(RexportError):
    """A measured check failed (numerics out of tolerance, accuracy target missed): exit code 1."""

    exit_code = 1


def first_line(e: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to ``limit``:
    how a third-party failure is quoted in a one-line error."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text[:limit] if limit else text
