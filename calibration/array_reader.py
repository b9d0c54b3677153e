"""Already-preprocessed float arrays (.npy memory-mapped, .npz streamed row by row) as calibration data."""
from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec

from rexport.calibration.reader_protocol import SOURCE_HINT, check_counts


class _NpyStream:
    """Sequential row reads from one .npy member of a .npz, without loading the whole array."""

    def __init__(self, path: Path, member: str) -> None:
        self.path, self.member = path, member
        with zipfile.ZipFile(path) as zf, zf.open(member) as f:
            self.shape, self.fortran, self.dtype = _read_npy_header(f)

    def rows(self, count: int) -> Iterator[np.ndarray]:
        """Yield the first ``count`` rows in chunks of at most 64 MiB."""
        row_shape = self.shape[1:] if len(self.shape) == 4 else self.shape
        row_bytes = int(np.prod(row_shape)) * self.dtype.itemsize
        per_chunk = max(1, (64 << 20) // max(row_bytes, 1))
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            _read_npy_header(f)
            done = 0
            while done < count:
                n = min(per_chunk, count - done)
                buf = f.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise InputError(f"{self.path}: array {self.member} is truncated", "re-save it with numpy.savez")
                yield np.frombuffer(buf, self.dtype).reshape((n, *row_shape))
                done += n


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


class ArrayReader:
    """Already-preprocessed float arrays, ``N x 3 x H x W`` (or one ``3 x H x W``), from a .npy file
    (memory-mapped) or a .npz file (key ``x`` or its only array, streamed row by row). The first
    ``samples`` rows are used."""

    synthetic = False

    def __init__(self, path: str | os.PathLike, spec: PreprocessSpec, *, input_name: str = "input",
                 samples: int = 512, batch_size: int = 8) -> None:
        check_counts(samples, batch_size)
        self.path = Path(path)
        self.input_name, self.batch_size = input_name, batch_size
        self._mmap: np.ndarray | None = None
        self._stream: _NpyStream | None = None
        try:
            if self.path.suffix.lower() == ".npy":
                self._mmap = np.load(self.path, mmap_mode="r", allow_pickle=False)
                shape, dtype = self._mmap.shape, self._mmap.dtype
                label = str(self.path)
            else:
                member = _npz_member(self.path)
                self._stream = _NpyStream(self.path, member)
                shape, dtype = self._stream.shape, self._stream.dtype
                if self._stream.fortran:
                    raise InputError(f"{self.path}: array {member[:-4]!r} is stored in Fortran order",
                                     "re-save it with numpy.savez(path, x=numpy.ascontiguousarray(x))")
                label = f"{self.path}[{member[:-4]}]"
        except InputError:
            raise
        except Exception as e:  # zipfile.BadZipFile, ValueError (pickled / bad header), OSError
            raise InputError(f"cannot read {self.path} as a numpy array ({type(e).__name__}: {e})", SOURCE_HINT) from None
        expected = spec.input_shape
        rows_shape = (1, *shape) if tuple(shape) == expected else tuple(shape)
        if len(rows_shape) != 4 or tuple(rows_shape[1:]) != expected or rows_shape[0] < 1:
            raise InputError(f"{label} has shape {tuple(shape)}, expected (N, {', '.join(map(str, expected))}) "
                             f"or {expected} for this model's input",
                             "save already-preprocessed NCHW float arrays at the model's input size")
        if dtype.kind != "f":
            raise InputError(f"{label} holds {dtype} values, expected already-preprocessed floats",
                             "normalise the images first, or pass the image folder instead")
        self.dtype = dtype
        self._spec = spec
        self.count = min(samples, int(rows_shape[0]))
        self.description = f"{self.count} preprocessed samples from {label}"
        self._pos = 0
        self._chunks: Iterator[np.ndarray] | None = None
        self._pending: np.ndarray | None = None
        self._fingerprint: str | None = None
        self._row_hashes: list[str] | None = None

    def __len__(self) -> int:
        return self.count

    def rewind(self) -> None:
        self._pos, self._chunks, self._pending = 0, None, None

    def _rows(self, start: int, n: int) -> np.ndarray:
        if self._mmap is not None:
            rows = self._mmap.reshape((-1, *self._mmap.shape[-3:]))[start:start + n]
            return np.ascontiguousarray(rows, dtype=np.float32)
        # .npz: sequential stream; the caller only ever asks for the next rows in order
        assert self._stream is not None
        if self._chunks is None:
            self._chunks = self._stream.rows(self.count)
        parts, have = [], 0
        while have < n:
            if self._pending is None or len(self._pending) == 0:
                self._pending = next(self._chunks)
            take = self._pending[: n - have]
            self._pending = self._pending[len(take):]
            parts.append(take)
            have += len(take)
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self.count:
            return None
        n = min(self.batch_size, self.count - self._pos)
        x = self._rows(self._pos, n)
        if not np.isfinite(x).all():
            bad = self._pos + int(np.flatnonzero(~np.isfinite(x).reshape(n, -1).all(axis=1))[0])
            raise InputError(f"{self.path}: sample {bad} contains NaN or infinite values",
                             "calibration data must be finite")
        self._pos += n
        return {self.input_name: x}

    def _hash_rows(self) -> None:
        whole = hashlib.sha256(b"arrays\n")
        rows: list[str] = []
        saved = (self._pos, self._chunks, self._pending)
        self.rewind()
        lo, hi = np.inf, -np.inf
        try:
            pos = 0
            while pos < self.count:
                n = min(64, self.count - pos)
                x = self._rows(pos, n)
                lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
                if not np.isfinite(x).all():  # refuse before any stage runs, not mid-calibration
                    bad = pos + int(np.flatnonzero(~np.isfinite(x).reshape(n, -1).all(axis=1))[0])
                    raise InputError(f"{self.path}: sample {bad} contains NaN or infinite values",
                                     "calibration data must be finite")
                for row in x:
                    digest = hashlib.sha256(row.tobytes()).hexdigest()
                    rows.append(digest)
                    whole.update(digest.encode())
                pos += n
        finally:
            self._pos, self._chunks, self._pending = saved
        self._warn_if_not_normalised(lo, hi)
        whole.update(f"\n{(self.count, *self._shape_tail())}".encode())
        self._fingerprint, self._row_hashes = whole.hexdigest(), rows

    def _warn_if_not_normalised(self, lo: float, hi: float) -> None:
        """Arrays far outside the range the model's preprocessing gives (e.g. raw 0-255 pixels) are
        the commonest cause of INT8 accuracy collapse: say so before calibrating on them."""
        mean, std = np.asarray(self._spec.mean), np.asarray(self._spec.std)
        want_lo, want_hi = float(((0 - mean) / std).min()), float(((1 - mean) / std).max())
        slack = 2 * (want_hi - want_lo)
        if lo < want_lo - slack or hi > want_hi + slack:
            warnings.warn(f"{self.path} values span [{lo:.3g}, {hi:.3g}], far outside [{want_lo:.3g}, {want_hi:.3g}] "
                          "that this model's preprocessing gives: were they resized, scaled to [0, 1] and "
                          "normalised with the model's mean/std?", stacklevel=2)

    def _shape_tail(self) -> tuple[int, ...]:
        src = self._mmap.shape if self._mmap is not None else self._stream.shape  # type: ignore[union-attr]
        return tuple(src[-3:])

    def fingerprint(self) -> str:
        """sha256 over the float32 bytes of the rows used (computed once, streaming)."""
        if self._fingerprint is None:
            self._hash_rows()
        return self._fingerprint  # type: ignore[return-value]

    def sample_fingerprints(self) -> set[str]:
        """sha256 of each row used, as float32 bytes."""
        if self._row_hashes is None:
            self._hash_rows()
        return set(self._row_hashes or [])


def _npz_member(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".npy")]
    if "x.npy" in names:
        return "x.npy"
    if len(names) == 1:
        return names[0]
    raise InputError(f"{path} holds {len(names)} arrays ({', '.join(n[:-4] for n in names[:5])}) and none is named 'x'",
                     "save the calibration array as numpy.savez(path, x=array)")


def _array_item_shape(path: Path) -> tuple[int, ...]:
    try:
        if path.suffix.lower() == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        else:
            shape = _NpyStream(path, _npz_member(path)).shape
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {path} as a numpy array ({type(e).__name__})", SOURCE_HINT) from None
    if len(shape) < 3 or shape[-3] != 3 or shape[-1] != shape[-2]:
        raise InputError(f"{path} has shape {tuple(shape)}, expected (N, 3, H, H)", SOURCE_HINT)
    return tuple(shape)
