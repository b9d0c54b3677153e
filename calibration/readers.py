"""Calibration data readers: one small ORT-style protocol, three sources.

A reader yields ``{input_name: float32 NCHW batch}`` until it returns ``None``; it never holds
more than one batch in memory. ``fingerprint()`` names the data exactly (file contents, array
bytes or the synthetic seed), so a calibration computed from it can be cached and reused.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from rexport.core.errors import InputError
from rexport.core.preprocess import IMAGE_SUFFIXES, PreprocessSpec, list_images

from rexport.calibration.array_reader import ArrayReader, _array_item_shape
from rexport.calibration.reader_protocol import SOURCE_HINT, CalibrationReader, check_counts

__all__ = ["SOURCE_HINT", "ArrayReader", "CalibrationReader", "ImageFolderReader", "SyntheticReader",
           "image_fingerprints", "open_reader"]

_READ_CHUNK = 1 << 20


# -- synthetic ---------------------------------------------------------------------------


class SyntheticReader:
    """Seeded random batches shaped like a normalised image: batch ``i`` is drawn with seed ``seed + i``
    (as Polygraphy's data loader does), standard normal clipped per channel to the values a [0, 1]
    pixel can take after ``spec``'s mean/std. Good for testing the pipeline, not for accuracy."""

    synthetic = True

    def __init__(self, spec: PreprocessSpec, *, input_name: str = "input", samples: int = 512,
                 batch_size: int = 8, seed: int = 0) -> None:
        check_counts(samples, batch_size)
        self.input_name = input_name
        self.shape = spec.input_shape
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
        self._lo = ((0.0 - mean) / std).reshape(1, 3, 1, 1).astype(np.float32)
        self._hi = ((1.0 - mean) / std).reshape(1, 3, 1, 1).astype(np.float32)
        self.description = (f"{samples} synthetic samples (seed {seed}, standard normal clipped to the "
                            f"normalised pixel range)")
        self._batch = 0

    def __len__(self) -> int:
        return self.samples

    def rewind(self) -> None:
        self._batch = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = self._batch * self.batch_size
        if start >= self.samples:
            return None
        n = min(self.batch_size, self.samples - start)
        rng = np.random.default_rng(self.seed + self._batch)
        x = rng.standard_normal((n, *self.shape), dtype=np.float32)
        np.clip(x, self._lo, self._hi, out=x)
        self._batch += 1
        return {self.input_name: x}

    def fingerprint(self) -> str:
        lo = ",".join(f"{v:.6g}" for v in self._lo.ravel())
        hi = ",".join(f"{v:.6g}" for v in self._hi.ravel())
        ident = f"synthetic:{self.seed}:{self.samples}:{self.shape}:{self.batch_size}:{lo}:{hi}"
        return hashlib.sha256(ident.encode()).hexdigest()


# -- image folder ------------------------------------------------------------------------


def _hash_and_check_image(path: Path) -> str | None:
    """The file's sha256 if PIL can fully decode it, else None (one read of the file)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.draft(img.mode, (1, 1))  # JPEG: decode every block, at 1/8 scale (no-op for other formats)
            img.load()
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None
    return hashlib.sha256(data).hexdigest()


class ImageFolderReader:
    """Images under a folder (recursively), preprocessed with ``spec`` one batch at a time.

    Which images: all of them (sorted by path) when there are at most ``samples``; otherwise a
    seeded random subset (numpy ``default_rng(seed)`` permutation), so an ImageNet-style
    ``class/*.jpg`` folder is sampled across classes rather than only its first class. Every
    chosen file is decoded once up front; unreadable ones are skipped (the next candidate takes
    their place), counted and reported in one warning, so ``len()`` is exact before calibration.
    """

    synthetic = False

    def __init__(self, root: str | os.PathLike, spec: PreprocessSpec, *, input_name: str = "input",
                 samples: int = 512, batch_size: int = 8, seed: int = 0) -> None:
        check_counts(samples, batch_size)
        self.root = Path(root)
        self.spec, self.input_name, self.batch_size = spec, input_name, batch_size
        if not self.root.is_dir():
            raise InputError(f"calibration folder {self.root} does not exist", SOURCE_HINT)
        candidates = list_images(self.root)
        if not candidates:
            raise InputError(f"no images in {self.root} (looked for {', '.join(IMAGE_SUFFIXES)})", SOURCE_HINT)
        order: list[Path] = candidates
        subset = len(candidates) > samples
        if subset:
            perm = np.random.default_rng(seed).permutation(len(candidates))
            order = [candidates[i] for i in perm]
        chosen: list[tuple[Path, str]] = []
        self.unreadable: list[Path] = []
        for path in order:
            if len(chosen) == samples:
                break
            digest = _hash_and_check_image(path)
            if digest is None:
                self.unreadable.append(path)
            else:
                chosen.append((path, digest))
        if not chosen:
            raise InputError(f"no usable images in {self.root}: all {len(self.unreadable)} image files are unreadable",
                             "check the files open in an image viewer, or " + SOURCE_HINT)
        chosen.sort(key=lambda item: item[0])
        self.files = [p for p, _ in chosen]
        self._digests = [d for _, d in chosen]
        if self.unreadable:
            shown = ", ".join(str(p.relative_to(self.root)) for p in self.unreadable[:3])
            more = f" and {len(self.unreadable) - 3} more" if len(self.unreadable) > 3 else ""
            warnings.warn(f"skipped {len(self.unreadable)} unreadable image file(s) in {self.root}: {shown}{more}",
                          UserWarning, stacklevel=3)
        how = f"seeded subset (seed {seed}) of {len(candidates)}" if subset else "all"
        skipped = f", {len(self.unreadable)} unreadable skipped" if self.unreadable else ""
        self.description = f"{len(self.files)} images from {self.root} ({how}{skipped})"
        self._pos = 0

    def __len__(self) -> int:
        return len(self.files)

    def rewind(self) -> None:
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.files):
            return None
        batch_files = self.files[self._pos:self._pos + self.batch_size]
        x = np.empty((len(batch_files), *self.spec.input_shape), np.float32)
        for i, path in enumerate(batch_files):
            try:
                x[i] = self.spec.load_image(path)
            except Exception as e:
                raise InputError(f"calibration image {path} became unreadable during calibration "
                                 f"({type(e).__name__})", "do not change the folder while calibrating") from None
        self._pos += len(batch_files)
        return {self.input_name: x}

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"images\n")
        h.update(self.spec.to_json().encode())
        for path, digest in zip(self.files, self._digests):
            h.update(f"\n{path.relative_to(self.root).as_posix()}\0{digest}".encode())
        return h.hexdigest()

    def sample_fingerprints(self) -> set[str]:
        """Content hashes of the images this reader uses (compare with ``image_fingerprints``)."""
        return set(self._digests)


# -- entry points ------------------------------------------------------------------------


def open_reader(source: str | os.PathLike, spec: PreprocessSpec, *, input_name: str = "input", samples: int = 512,
                batch_size: int = 8, seed: int = 0) -> CalibrationReader:
    """A reader for ``source``: an image folder, a .npy/.npz of preprocessed arrays, or ``"synthetic"``."""
    if isinstance(source, str) and source == "synthetic":
        return SyntheticReader(spec, input_name=input_name, samples=samples, batch_size=batch_size, seed=seed)
    path = Path(source)
    if path.is_dir():
        return ImageFolderReader(path, spec, input_name=input_name, samples=samples, batch_size=batch_size, seed=seed)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        if not path.is_file():
            raise InputError(f"calibration data {path} does not exist", SOURCE_HINT)
        return ArrayReader(path, spec, input_name=input_name, samples=samples, batch_size=batch_size)
    if not path.exists():
        raise InputError(f"calibration data {path} does not exist", SOURCE_HINT)
    raise InputError(f"cannot calibrate from {path}: not a folder, .npy or .npz", SOURCE_HINT)


def image_fingerprints(source: str | os.PathLike) -> set[str]:
    """Content hashes of every image under a folder (sha256 of the file bytes), or of every row of a
    .npy/.npz (sha256 of its float32 bytes); empty for ``"synthetic"``. Two sources in the same form
    that share images share hashes, which is how an evaluation warns about calibration leakage."""
    if isinstance(source, str) and source == "synthetic":
        return set()
    path = Path(source)
    if path.is_dir():
        hashes = set()
        for p in list_images(path):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(_READ_CHUNK), b""):
                    h.update(block)
            hashes.add(h.hexdigest())
        return hashes
    if path.suffix.lower() in (".npy", ".npz") and path.is_file():
        shape = _array_item_shape(path)
        spec = PreprocessSpec(input_size=shape[-1], resize=shape[-1])
        return ArrayReader(path, spec, samples=1 << 62).sample_fingerprints()
    raise InputError(f"cannot fingerprint {path}: not a folder, .npy or .npz", SOURCE_HINT)
