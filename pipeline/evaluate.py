"""Evaluate stage: top-1/top-5 accuracy of every variant on labelled data, and each variant's
drop and agreement against the PyTorch FP32 reference."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json, sha256_file
from rexport.core.preprocess import PreprocessSpec, list_images
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.variants import REFERENCE, list_variants, open_variant


@dataclass(frozen=True)
class EvaluateSettings:
    val_data: str
    samples: int | None = None     # None: every labelled sample
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.samples is not None and self.samples < 1) or self.batch_size < 1:
            raise InputError("--samples and the batch size must be at least 1", "e.g. --samples 1000")


#: preprocessed images are decoded once and kept for every variant up to this size; larger sets stream
PRELOAD_BYTES = 1_500_000_000


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
        self.unreadable = 0
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
            self._preload()

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

    def _load(self, path: Path) -> np.ndarray | None:
        try:
            return self.spec.load_image(path)
        except Exception:  # PIL raises UnidentifiedImageError, OSError, ValueError... for broken files
            return None

    def _preload(self) -> None:
        """Decode every image once (unreadable ones are left out and counted) when the set fits in memory."""
        per_image = 4 * int(np.prod(self.spec.input_shape))
        if len(self._items) * per_image > PRELOAD_BYTES:
            return
        arrays, keep = [], []
        for i, p in enumerate(self._items):
            a = self._load(p)
            if a is not None:
                arrays.append(a)
                keep.append(i)
        self.unreadable = len(self._items) - len(keep)
        if not arrays:
            raise InputError(f"no readable images in {self.source}", "pass jpg/png/bmp/webp images")
        if self.unreadable:
            warnings.warn(f"{self.unreadable} unreadable images in {self.source} were left out", stacklevel=2)
        self._items = [self._items[i] for i in keep]
        self.labels = self.labels[keep]
        self._x = np.stack(arrays)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            if self._x is not None:
                yield np.asarray(self._x[i:i + batch_size], dtype=np.float32)
                continue
            arrays = []
            for p in self._items[i:i + batch_size]:
                a = self._load(p)
                if a is None:
                    raise InputError(f"cannot read image {p}", "remove or replace the broken file")
                arrays.append(a)
            yield np.stack(arrays)

    def fingerprints(self) -> set[str]:
        """Content hashes of the samples, as calibration readers compute them: sha256 of an image
        file's bytes, or of a preprocessed row's float32 bytes (for the overlap warning)."""
        if self._items is not None:
            return {sha256_file(p) for p in self._items}
        return {hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32).tobytes()).hexdigest() for row in self._x}


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(1)


def run_evaluate(run: RunDir, settings: EvaluateSettings, variants: list[str] | None = None,
                 *, force: bool = False) -> list[dict]:
    run.require_export()
    spec = PreprocessSpec.from_onnx(run.file(VARIANT_FILES["fp32"]))
    num_classes = int(run.stage("export")["summary"]["num_classes"])
    data = LabelledSet(settings.val_data, spec, num_classes, settings.samples, settings.seed)
    variants = variants or list_variants(run)
    if REFERENCE in variants:  # the reference goes first: every drop is measured against it
        variants = [REFERENCE] + [v for v in variants if v != REFERENCE]
    else:
        variants = [REFERENCE] + variants
    warnings_: list[str] = []
    overlap = _calibration_overlap(run, data)
    if overlap:
        warnings_.append(f"{overlap} evaluation images are also in the calibration set: INT8 accuracy is optimistic")
    records = []
    for v in variants:
        rel = f"eval/{v}.json"
        artifact = (run.file(VARIANT_FILES[v]) if v in VARIANT_FILES else
                    None if v == REFERENCE else run.path / "engines" / v / "sidecar.json")
        inputs = {"val_data": Path(settings.val_data), "fp32": run.file(VARIANT_FILES["fp32"]), "artifact": artifact}
        if v != REFERENCE:  # drop and agreement are measured against the reference's results
            inputs["reference"] = run.file(f"eval/{REFERENCE}.json")

        def action(v=v, rel=rel) -> StageOutcome:
            logits = []
            with open_variant(run, v) as runner:
                for xb in data.batches(settings.batch_size):
                    logits.append(runner.infer(xb))
            y = np.concatenate(logits)
            pred = y.argmax(1)
            top1 = float(topk_correct(y, data.labels, 1).mean())
            top5 = float(topk_correct(y, data.labels, 5).mean())
            ref = None if v == REFERENCE else json.loads(run.file(f"eval/{REFERENCE}.json").read_text())
            result = {"variant": v, "top1": top1, "top5": top5, "n": len(data),
                      "drop_top1_vs_fp32": 0.0 if ref is None else ref["top1"] - top1,
                      "agreement_top1_vs_fp32": 1.0 if ref is None else
                      float((np.asarray(ref["predictions"]) == pred).mean()),
                      "dataset": {"source": str(settings.val_data), "n": len(data), "classes": data.classes},
                      "warnings": warnings_, "predictions": pred.tolist()}
            atomic_write_json(run.file(rel), result)
            return StageOutcome(outputs=[rel], summary={k: result[k] for k in ("top1", "top5", "n",
                                                                              "drop_top1_vs_fp32")})

        st_settings = {"samples": settings.samples, "batch_size": settings.batch_size, "seed": settings.seed}
        rec = run.run_stage(f"evaluate:{v}", inputs=inputs, settings=st_settings, action=action, force=force)
        records.append({"variant": v, **rec, "warnings": warnings_})
    return records


def _calibration_overlap(run: RunDir, data: LabelledSet) -> int:
    """How many evaluation samples the INT8 calibration also used (by content hash)."""
    st = run.stage("quantize:int8")
    used = ((st or {}).get("summary") or {}).get("calibration", {}).get("sample_sha256") or []
    return len(set(used) & data.fingerprints()) if used else 0
