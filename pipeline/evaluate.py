"""Evaluate stage: top-1/top-5 accuracy of every variant on labelled data, and each variant's
drop and agreement against the PyTorch FP32 reference."""
from __future__ import annotations

import json
import os
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


class LabelledSet:
    """Labelled samples: an ImageFolder layout (``class/*.jpg``, classes sorted or ordered by a
    ``labels.txt``) or an ``.npz`` with preprocessed ``x`` and integer ``y``."""

    def __init__(self, source: str | os.PathLike, spec: PreprocessSpec, samples: int | None, seed: int) -> None:
        self.source = Path(source)
        self.spec = spec
        if self.source.is_dir():
            self._init_folder()
        elif self.source.is_file() and self.source.suffix == ".npz":
            self._init_npz()
        else:
            raise InputError(f"labelled data {self.source} not found or not a folder/.npz",
                             "pass a class_name/*.jpg folder or an .npz with x and y")
        n = len(self.labels)
        if samples is not None and samples < n:
            keep = np.sort(np.random.default_rng(seed).choice(n, samples, replace=False))
            self.labels = self.labels[keep]
            self._items = [self._items[i] for i in keep] if self._items is not None else None
            self._index = keep
        else:
            self._index = np.arange(n)

    def _init_folder(self) -> None:
        order_file = self.source / "labels.txt"
        if order_file.is_file():
            classes = [c.strip() for c in order_file.read_text(encoding="utf-8").splitlines() if c.strip()]
        else:
            classes = sorted(d.name for d in self.source.iterdir() if d.is_dir())
        items, labels = [], []
        for idx, cls in enumerate(classes):
            for f in list_images(self.source / cls):
                items.append(f)
                labels.append(idx)
        if not items:
            raise InputError(f"no labelled images in {self.source}",
                             "expected class_name/*.jpg subfolders (torchvision ImageFolder layout)")
        self.classes = classes
        self._items: list[Path] | None = items
        self.labels = np.asarray(labels, dtype=np.int64)
        self._x = None

    def _init_npz(self) -> None:
        try:
            data = np.load(self.source)
            x, y = data["x"], data["y"]
        except (KeyError, ValueError, OSError) as e:
            raise InputError(f"{self.source} is not an .npz with arrays x and y ({type(e).__name__})",
                             "save it with np.savez(path, x=images_nchw_float32, y=int_labels)") from None
        if x.ndim != 4 or tuple(x.shape[1:]) != self.spec.input_shape or len(x) != len(y):
            raise InputError(f"{self.source}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}",
                             f"expected x (N, {', '.join(map(str, self.spec.input_shape))}) and y (N,)")
        self.classes = None
        self._items = None
        self._x = x
        self.labels = np.asarray(y, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            if self._items is not None:
                yield np.stack([self.spec.load_image(p) for p in self._items[i:i + batch_size]])
            else:
                yield np.asarray(self._x[self._index[i:i + batch_size]], dtype=np.float32)

    def fingerprints(self) -> set[str]:
        """Content hashes of the images (for the calibration/evaluation overlap warning)."""
        if self._items is not None:
            return {sha256_file(p) for p in self._items}
        return set()


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(1)


def run_evaluate(run: RunDir, settings: EvaluateSettings, variants: list[str] | None = None,
                 *, force: bool = False) -> list[dict]:
    run.require_export()
    spec = PreprocessSpec.from_onnx(run.file(VARIANT_FILES["fp32"]))
    data = LabelledSet(settings.val_data, spec, settings.samples, settings.seed)
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
    st = run.stage("quantize:int8")
    if not st or not data.fingerprints():
        return 0
    source = st.get("settings", {}).get("calib_data")
    if not source or source == "synthetic" or not Path(source).exists():
        return 0
    from rexport.calibration import image_fingerprints

    return len(image_fingerprints(source) & data.fingerprints())
