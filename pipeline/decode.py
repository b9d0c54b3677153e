"""Image decoding for evaluation: every image decoded and preprocessed once, in worker processes,
with a bounded number of batches in flight so memory stays flat in the number of images."""
from __future__ import annotations

import collections
import multiprocessing
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from rexport.core.preprocess import PreprocessSpec

#: called in this process once per image decoded (readable or not), with its path: counts for tests/benchmarks
DECODE_HOOKS: list[Callable[[Path], None]] = []


def default_decode_workers() -> int:
    """Worker processes for decoding: one per usable core (the affinity mask, not the machine's count),
    none on a single core. benchmarks/bench_evaluate.py measured 0, 1 and 2 workers on 2 cores (7 variants,
    ResNet-18 at 224): 2 won every run (load 5.4 -> 2.1: 0.84x of pure inference, none 0.94x; load 10-15:
    0.88x/0.62x, 1 worker 1.05x/0.64x, none 1.25x/0.92x). On one core a decode process can only take turns with
    inference, and starting it costs an interpreter and its imports."""
    from rexport.core.machine import usable_cores

    cores = usable_cores()
    return cores if cores > 1 else 0


def load_or_none(spec: PreprocessSpec, path: Path) -> np.ndarray | None:
    """One image as a CHW float32 array, or None when the file cannot be decoded."""
    try:
        return spec.load_image(path)
    except Exception:  # PIL raises UnidentifiedImageError, OSError, ValueError... for broken files
        return None


_worker_spec: PreprocessSpec | None = None


def _init_worker(spec_json: str) -> None:
    global _worker_spec
    import json

    _worker_spec = PreprocessSpec.from_dict(json.loads(spec_json))


def _decode_group(paths: list[str]) -> list[np.ndarray | None]:
    return [load_or_none(_worker_spec, Path(p)) for p in paths]


class BatchDecoder:
    """Decodes groups of image paths in order; ``workers=0`` decodes in this process.

    At most ``prefetch`` groups are decoded ahead of the consumer, so memory does not grow with the
    number of images however fast the workers are. Use as a context manager (it owns the pool)."""

    def __init__(self, spec: PreprocessSpec, workers: int | None = None, prefetch: int | None = None) -> None:
        self.spec = spec
        self.workers = default_decode_workers() if workers is None else max(0, workers)
        self.prefetch = prefetch or max(2, 2 * self.workers)
        self._pool = None

    def __enter__(self) -> "BatchDecoder":
        if self.workers:
            # spawn, not fork: the parent holds ONNX Runtime / OpenMP thread pools that fork would copy broken
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.spec.to_json(),))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def decode(self, groups: Iterable[list[Path]]) -> Iterator[list[np.ndarray | None]]:
        """Yield, for each group in order, its decoded arrays (None for an unreadable file)."""
        if self._pool is None:
            for group in groups:
                yield self._counted(group, [load_or_none(self.spec, p) for p in group])
            return
        pending: collections.deque = collections.deque()
        it = iter(groups)
        for group in it:
            pending.append((group, self._pool.apply_async(_decode_group, ([str(p) for p in group],))))
            if len(pending) >= self.prefetch:
                break
        while pending:
            group, res = pending.popleft()
            arrays = res.get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, self._pool.apply_async(_decode_group, ([str(p) for p in nxt],))))
            yield self._counted(group, arrays)

    @staticmethod
    def _counted(group: list[Path], arrays: list[np.ndarray | None]) -> list[np.ndarray | None]:
        for p in group:
            for hook in DECODE_HOOKS:
                hook(p)
        return arrays
