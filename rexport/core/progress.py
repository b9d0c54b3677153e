"""Progress output that fits the place: a live bar on a terminal; one line per 10% of long work when
stderr is not a terminal (CI logs, ``make engine | tee``); nothing with ``--progress none``.
Every stage's progress goes through ``progress_bar`` (tqdm is imported only for a live bar)."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

MODES = ("auto", "bar", "plain", "none")
_mode = os.environ.get("REXPORT_PROGRESS", "auto")


def set_mode(mode: str) -> None:
    """The process-wide progress mode (the CLI's global ``--progress``)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} is not one of {MODES}")
    _mode = mode


def mode() -> str:
    """bar | plain | none: 'auto' is a bar on a terminal and plain lines elsewhere."""
    if _mode != "auto":
        return _mode
    return "bar" if sys.stderr.isatty() else "plain"


class _Plain:
    """One line at each 10% step (and at the end), with the rate so far."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.next_step, self.t0 = 0, 1, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.total:
            return
        step = min(10, self.n * 10 // self.total)
        if step >= self.next_step:
            self.next_step = step + 1
            self._line()

    def _line(self) -> None:
        dt = time.perf_counter() - self.t0
        rate = f", {self.n / dt:.1f} {self.unit}/s" if dt > 0 and self.n else ""
        of = f"/{self.total}" if self.total else ""
        pct = f" {100 * self.n // self.total:3d}%" if self.total else ""
        print(f"{self.desc}:{pct} {self.n}{of} {self.unit} in {dt:.1f} s{rate}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.total:
            self._line()


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int | None, *, desc: str, unit: str = "it", enabled: bool = True) -> Iterator:
    """``with progress_bar(n, desc="calibrating", unit="img", enabled=progress) as bar: bar.update(k)``.
    ``enabled=False`` (a caller that was asked for quiet) wins over the global mode."""
    m = mode() if enabled else "none"
    if m == "none":
        yield _Silent()
    elif m == "plain":
        bar = _Plain(total, desc, unit)
        try:
            yield bar
        finally:
            bar.close()
    else:
        from tqdm import tqdm

        with tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False) as bar:
            yield bar


def say(text: str, *, enabled: bool = True) -> None:
    """A progress line on stderr (e.g. 'bench: resnet18 fp32 b8'), unless progress is off."""
    if enabled and mode() != "none":
        print(text, file=sys.stderr, flush=True)
