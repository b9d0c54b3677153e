"""Labelled samples for the accuracy stage: an ImageFolder tree or an .npz, mapped to the model's
classes, split into fixed batches that a local run and every Ray shard share."""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file
from rexport.core.preprocess import PreprocessSpec, list_images
from rexport.pipeline.decode import BatchDecoder


class LabelledSet:
    """Labelled samples: an ImageFolder layout (``class/*.jpg``, classes sorted or ordered by a
    ``labels.txt``) or an ``.npz`` with preprocessed ``x`` and integer ``y``.

    Folder classes are mapped to the model's outputs by name when the model carries labels
    (export ``--labels``), else by position; a class the model cannot predict is an error, so an
    accuracy figure never rests on a silent misalignment.
    """

    def __init__(self, source: str | os.PathLike, spec: PreprocessSpec, num_classes: int,
                 samples: int | None, seed: int) -> None:
        self.source = Path(source)
        self.spec = spec
        self.num_classes = num_classes
        if self.source.is_dir():
            self._init_folder()
        elif self.source.is_file() and self.source.suffix == ".npz":
            self._init_npz()
        else:
            raise InputError(f"labelled data {self.source} not found or not a folder/.npz",
                             "pass a class_name/*.jpg folder or an .npz with x and y")
        n = len(self.labels)
        keep = np.arange(n)
        if samples is not None and samples < n:
            keep = np.sort(np.random.default_rng(seed).choice(n, samples, replace=False))
        self.labels = self.labels[keep]
        if self._x is not None:
            self._x = self._x[keep]
        else:
            self._items = [self._items[i] for i in keep]

    def _class_indices(self, names: list[str]) -> list[int]:
        if self.spec.labels:
            unknown = [c for c in names if c not in self.spec.labels]
            if unknown:
                raise InputError(f"class folder {unknown[0]!r} in {self.source} is not one of the model's labels",
                                 "name the class folders after the labels given to 'rexport export --labels'")
            return [self.spec.labels.index(c) for c in names]
        if len(names) > self.num_classes:
            raise InputError(f"{self.source} has {len(names)} classes but the model predicts {self.num_classes}",
                             "evaluate on data with the classes the model was trained on")
        return list(range(len(names)))

    def _init_folder(self) -> None:
        dirs = sorted(d.name for d in self.source.iterdir() if d.is_dir())
        order_file = self.source / "labels.txt"
        classes = dirs
        if order_file.is_file():
            classes = [c.strip() for c in order_file.read_text(encoding="utf-8").splitlines() if c.strip()]
            unlisted = sorted(set(dirs) - set(classes))
            if unlisted:
                raise InputError(f"class folder {unlisted[0]!r} is not listed in {order_file}",
                                 "list every class folder in labels.txt, in the model's class order")
        indices = self._class_indices(classes)
        items, labels = [], []
        for idx, cls in zip(indices, classes):
            for f in list_images(self.source / cls):
                items.append(f)
                labels.append(idx)
        if not items:
            raise InputError(f"no labelled images in {self.source}",
                             "expected class_name/*.jpg subfolders (torchvision ImageFolder layout)")
        self.classes = classes
        self._items = items
        self.labels = np.asarray(labels, dtype=np.int64)
        self._x = None

    def _init_npz(self) -> None:
        hint = "save it with np.savez(path, x=preprocessed_float32_nchw, y=integer_labels)"
        try:
            with np.load(self.source) as data:
                x, y = data["x"], data["y"]
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{self.source} is not a readable .npz with arrays x and y ({type(e).__name__})",
                             hint) from None
        if x.ndim != 4 or tuple(x.shape[1:]) != self.spec.input_shape or y.ndim != 1 or len(x) != len(y):
            raise InputError(f"{self.source}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}",
                             f"expected x (N, {', '.join(map(str, self.spec.input_shape))}) and y (N,)")
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise InputError(f"{self.source}: x must be finite floats, preprocessed as the model's metadata says",
                             hint)
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= self.num_classes:
            raise InputError(f"{self.source}: y must be integer class indices in [0, {self.num_classes})", hint)
        self.classes = None
        self._items = None
        self._x = x.astype(np.float32, copy=False)
        self.labels = y.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def groups(self, batch_size: int) -> list[range]:
        """The fixed index ranges evaluated as one batch each: a local run and every Ray shard see
        the same batches, so their logits (and predictions) are the same bit for bit."""
        return [range(i, min(i + batch_size, len(self))) for i in range(0, len(self), batch_size)]

    def batches(self, groups: list[range], decoder: BatchDecoder) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices kept, NCHW float32 batch) per group; unreadable images are left out of their batch."""
        if self._x is not None:
            for g in groups:
                yield np.arange(g.start, g.stop), np.asarray(self._x[g.start:g.stop], dtype=np.float32)
            return
        for g, arrays in zip(groups, decoder.decode([self._items[i] for i in g] for g in groups)):
            keep = [i for i, a in zip(g, arrays) if a is not None]
            x = np.stack([a for a in arrays if a is not None]) if keep else np.zeros((0, *self.spec.input_shape),
                                                                                      np.float32)
            yield np.asarray(keep, dtype=np.int64), x

    def fingerprints(self) -> set[str]:
        """Content hashes of the samples, as calibration readers compute them: sha256 of an image
        file's bytes, or of a preprocessed row's float32 bytes (for the overlap warning)."""
        return set(self.row_fingerprints())

    def row_fingerprints(self) -> list[str]:
        """The content hash of each sample, in sample order (as ``fingerprints``): the INT8 budget's
        seeded splits are drawn over them and recorded by them."""
        if self._items is not None:
            return [sha256_file(p) for p in self._items]
        return [hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32).tobytes()).hexdigest() for row in self._x]
