"""The INT8 budget's data: ``--val-data`` split by a seeded draw into a *selection* split (where the
search looks) and a disjoint *confirmation* split (where the result is proved), neither holding a
calibration image (by content hash). The splits are recorded by their samples' hashes."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file, sha256_json
from rexport.core.preprocess import PreprocessSpec, list_images

SPLITS = ("selection", "confirmation")


@dataclass
class BudgetData:
    x: dict[str, np.ndarray]               # split -> NCHW float32
    labels: dict[str, np.ndarray | None]   # split -> class indices (None: unlabelled)
    fingerprints: dict[str, list[str]]     # split -> per-sample content hashes
    record: dict                           # what the manifest records

    @property
    def labelled(self) -> bool:
        return self.labels["selection"] is not None


def _has_class_dirs(path: Path) -> bool:
    return path.is_dir() and any(d.is_dir() for d in path.iterdir())


def _npz_has_labels(path: Path) -> bool:
    with np.load(path) as data:
        return "y" in data.files


def _row_hash(row: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32).tobytes()).hexdigest()


class _Source:
    """Uniform access to a labelled set (LabelledSet) or unlabelled images/arrays."""

    def __init__(self, source: str | os.PathLike, spec: PreprocessSpec, num_classes: int, need_labels: bool) -> None:
        path = Path(source)
        self.spec = spec
        labelled = (_has_class_dirs(path) or (path.suffix == ".npz" and path.is_file() and _npz_has_labels(path)))
        if need_labels and not labelled:
            raise InputError(f"--max-accuracy-drop needs labelled data; {path} has no class folders / y array",
                             "pass class_name/*.jpg folders or an .npz with x and y, or use --max-agreement-loss")
        self.labelled_set = None
        self._items: list[Path] | None = None
        self._x: np.ndarray | None = None
        if labelled:
            from rexport.pipeline.labelled import LabelledSet

            self.labelled_set = LabelledSet(path, spec, num_classes, None, 0)
            self.fingerprints = self.labelled_set.row_fingerprints()
        elif path.is_dir():
            self._items = list_images(path)
            self.fingerprints = [sha256_file(p) for p in self._items]
        elif path.suffix in (".npy", ".npz") and path.is_file():
            x = np.load(path) if path.suffix == ".npy" else np.load(path)["x"]
            if x.ndim != 4 or tuple(x.shape[1:]) != spec.input_shape:
                raise InputError(f"{path}: x has shape {tuple(x.shape)}",
                                 f"expected (N, {', '.join(map(str, spec.input_shape))}), preprocessed")
            self._x = np.asarray(x, dtype=np.float32)
            self.fingerprints = [_row_hash(r) for r in self._x]
        else:
            raise InputError(f"budget data {path} not found or not a folder/.npz/.npy",
                             "pass --val-data class_name/*.jpg folders or an .npz with x (and y)")
        if not self.fingerprints:
            raise InputError(f"no images in {path}", "pass a folder of jpg/png images or an .npz")

    def load(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
        """(x, labels, kept indices) for ``indices``; unreadable images are left out."""
        if self.labelled_set is not None:
            from rexport.pipeline.decode import BatchDecoder

            ls = self.labelled_set
            xs, kept = [], []
            with BatchDecoder(self.spec, 0) as dec:
                for idx, xb in ls.batches([range(i, i + 1) for i in indices], dec):
                    if len(idx):
                        xs.append(xb)
                        kept.append(int(idx[0]))
            labels = np.asarray(ls.labels)[kept] if kept else np.zeros(0, np.int64)
            return (np.concatenate(xs) if xs else np.zeros((0, *self.spec.input_shape), np.float32)), labels, kept
        if self._x is not None:
            return self._x[indices], None, list(indices)
        xs, kept = [], []
        for i in indices:
            try:
                xs.append(self.spec.load_image(self._items[i]))
                kept.append(i)
            except Exception:  # a broken image file: left out, as evaluation does
                continue
        return (np.stack(xs) if xs else np.zeros((0, *self.spec.input_shape), np.float32)), None, kept


def split_budget_data(source: str | os.PathLike, spec: PreprocessSpec, num_classes: int, *, need_labels: bool,
                      calibration_fingerprints: set[str], fraction: float, max_samples: int,
                      seed: int) -> BudgetData:
    """Draw the selection and confirmation splits (seeded), leaving calibration images and repeated
    images out, at most ``max_samples`` in all."""
    src = _Source(source, spec, num_classes, need_labels)
    seen: set[str] = set()
    candidates, in_calibration, repeats = [], 0, 0
    for i, fp in enumerate(src.fingerprints):
        if fp in calibration_fingerprints:
            in_calibration += 1
        elif fp in seen:
            repeats += 1
        else:
            seen.add(fp)
            candidates.append(i)
    order = [candidates[k] for k in np.random.default_rng(seed).permutation(len(candidates))][:max_samples]
    n_sel = int(round(fraction * len(order)))
    if n_sel < 1 or len(order) - n_sel < 1:
        raise InputError(f"{source} has {len(order)} usable images (after leaving out {in_calibration} calibration "
                         f"images): too few for a selection and a confirmation split",
                         "pass a larger --val-data set, disjoint from the calibration images")
    picks = {"selection": sorted(order[:n_sel]), "confirmation": sorted(order[n_sel:])}
    x, labels, fps, record = {}, {}, {}, {}
    for split in SPLITS:
        x[split], labels[split], kept = src.load(picks[split])
        fps[split] = [src.fingerprints[i] for i in kept]
        record[split] = {"n": len(kept), "sha256": sha256_json(sorted(fps[split])),
                         "unreadable": len(picks[split]) - len(kept)}
    record.update({"source": str(source), "seed": seed, "fraction": fraction, "max_samples": max_samples,
                   "labelled": src.labelled_set is not None, "left_out_calibration": in_calibration,
                   "left_out_repeats": repeats})
    return BudgetData(x, labels, fps, record)
