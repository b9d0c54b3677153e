"""Evaluate stage: top-1/top-5 accuracy of every variant on labelled data, and each variant's
drop and agreement against the PyTorch FP32 reference.

One pass for all variants: every batch is decoded once (in worker processes) and fed to each
variant in lockstep, so a 7-variant evaluation decodes each image once, and only the top-5
classes of each image are kept, so memory is flat in the number of images. The same pass runs
per shard on Ray (``distributed.py``) and gives the same predictions bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.settings import setting
from rexport.core.fsio import atomic_write_json
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.decode import BatchDecoder
from rexport.pipeline.labelled import LabelledSet
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.summaries import EvaluateSummary, ExportSummary, QuantizeSummary
from rexport.pipeline.variants import REFERENCE, list_variants, open_variant, reference_variant

__all__ = ["EvaluateSettings", "LabelledSet", "Predictions", "run_evaluate", "predict", "open_labelled_set"]

#: classes kept per image (top-5 accuracy needs five; predictions are the first)
TOPK = 5


@dataclass(frozen=True)
class EvaluateSettings:
    val_data: str = setting(run="val-data", help="Labelled data: class_name/*.jpg folder or .npz with x and y.")
    samples: int | None = setting(None, aliases=("val-samples",),
                                  help="Evaluate a seeded random subset of this size (default: every sample).")
    batch_size: int = 16
    seed: int = 0
    decode_workers: int | None = setting(None, help="Image decoding processes (default: one per usable "
                                                    "core, none on one core; 0: decode in this process).")
    # --ray [ADDRESS] takes an optional value, which the generated options cannot say: the evaluate
    # command declares it by hand, and matrix passes it on.
    ray: str | None = setting(None, cli=False, run=False,
                              help="Shard over Ray: 'default' (ray.init()) or a cluster address.")
    ray_shards: int | None = setting(None, run=False, help="Ray shards (default: one per CPU of the cluster).")

    def __post_init__(self) -> None:
        if (self.samples is not None and self.samples < 1) or self.batch_size < 1:
            raise InputError("--samples and the batch size must be at least 1", "e.g. --samples 1000")
        if (self.decode_workers is not None and self.decode_workers < 0) or \
                (self.ray_shards is not None and self.ray_shards < 1):
            raise InputError("--decode-workers must be >= 0 and --ray-shards >= 1", "e.g. --decode-workers 1")

    def stage_settings(self) -> dict:
        """What the results depend on (decoding and where it runs do not change a prediction)."""
        return {"samples": self.samples, "batch_size": self.batch_size, "seed": self.seed}


@dataclass
class Predictions:
    """The pass over the labelled set: which samples were readable and each variant's top classes."""

    kept: np.ndarray                                 # indices into the labelled set, in order
    top: dict[str, np.ndarray]                       # variant -> (len(kept), TOPK) classes, best first
    info: dict = field(default_factory=dict)         # how it ran (Ray shards, retries): for the manifest


def top_classes(logits: np.ndarray, k: int = TOPK) -> np.ndarray:
    """The k best classes per row, best first; ties go to the lower index, as argmax does."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :min(k, logits.shape[1])]
    return order.astype(np.int32)


def open_labelled_set(run: RunDir, settings: EvaluateSettings) -> LabelledSet:
    spec = PreprocessSpec.from_onnx(run.file(VARIANT_FILES["fp32"]))
    num_classes = ExportSummary.of(run).num_classes
    return LabelledSet(settings.val_data, spec, num_classes, settings.samples, settings.seed)


def predict(run: RunDir, data: LabelledSet, variants: list[str], groups: list[range], *,
            decode_workers: int | None = None, threads: int | None = None) -> Predictions:
    """Decode each batch of ``groups`` once and run it through every variant (all loaded once)."""
    kept, tops = [], {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        runners = {v: stack.enter_context(open_variant(run, v, threads=threads)) for v in variants}
        decoder = stack.enter_context(BatchDecoder(data.spec, decode_workers))
        for idx, xb in data.batches(groups, decoder):
            if not len(idx):
                continue
            kept.append(idx)
            for v, runner in runners.items():
                tops[v].append(top_classes(runner.infer(xb)))
    empty = np.zeros((0, TOPK), np.int32)
    return Predictions(kept=np.concatenate(kept) if kept else np.zeros(0, np.int64),
                       top={v: np.concatenate(t) if t else empty for v, t in tops.items()})


def run_evaluate(run: RunDir, settings: EvaluateSettings, variants: list[str] | None = None,
                 *, force: bool = False) -> list[dict]:
    run.require_export()
    data = open_labelled_set(run, settings)
    variants = variants or list_variants(run)
    # the reference goes first: every drop is measured against it (an imported run's is its fp32 ONNX)
    reference = reference_variant(run)
    variants = [reference] + [v for v in variants if v != reference]
    overlap = _calibration_overlap(run, data)
    common_warnings = ([f"{overlap} evaluation images are also in the calibration set: INT8 accuracy is optimistic"]
                       if overlap else [])
    st_settings = settings.stage_settings()
    stage_inputs = {v: _inputs(run, settings, v) for v in variants}
    ref_stale = force or not run.is_fresh(f"evaluate:{reference}", stage_inputs[reference], st_settings)
    # a new reference result invalidates every drop and agreement: then the one pass covers all
    todo = [v for v in variants if ref_stale or not run.is_fresh(f"evaluate:{v}", stage_inputs[v], st_settings)]
    done: dict[str, Predictions] = {}

    def the_pass() -> Predictions:
        if not done:
            done["p"] = _run_pass(run, data, todo, settings)
        return done["p"]

    records = []
    for v in variants:
        def action(v=v) -> StageOutcome:
            p = the_pass()
            ref = None if v == reference else json.loads(run.file(f"eval/{reference}.json").read_text())
            result = eval_result(v, p, data, ref, settings, common_warnings)
            from rexport.pipeline.budget_eval import budget_split_figures  # INT8 budget: the held-out split

            result.update(budget_split_figures(run, data, p.kept, result, ref))
            atomic_write_json(run.file(f"eval/{v}.json"), result)
            # one pass ran every variant here; the first stage's duration holds the whole pass
            summary = EvaluateSummary(top1=result["top1"], top5=result["top5"], n=result["n"],
                                      drop_top1_vs_reference=result["drop_top1_vs_reference"],
                                      one_pass_with=list(p.top), ray=p.info or None)
            return StageOutcome(outputs=[f"eval/{v}.json"], summary=summary.to_json())

        rec = run.run_stage(f"evaluate:{v}", inputs=stage_inputs[v], settings=st_settings, action=action,
                            force=v in todo)
        records.append({"variant": v, **rec, "warnings": common_warnings})
    if done and len(done["p"].kept) < len(data):
        warnings.warn(f"{len(data) - len(done['p'].kept)} unreadable images in {settings.val_data} were left out",
                      stacklevel=2)
    return records


def _inputs(run: RunDir, settings: EvaluateSettings, v: str) -> dict:
    artifact = (run.file(VARIANT_FILES[v]) if v in VARIANT_FILES else
                None if v == REFERENCE else run.path / "engines" / v / "sidecar.json")
    inputs = {"val_data": Path(settings.val_data), "fp32": run.file(VARIANT_FILES["fp32"]), "artifact": artifact}
    reference = reference_variant(run)
    if v != reference:  # drop and agreement are measured against the reference's results
        inputs["reference"] = run.file(f"eval/{reference}.json")
    return inputs


def _run_pass(run: RunDir, data: LabelledSet, variants: list[str], settings: EvaluateSettings) -> Predictions:
    groups = data.groups(settings.batch_size)
    if settings.ray is not None:
        from rexport.pipeline.distributed import predict_on_ray

        p = predict_on_ray(run, settings, variants, len(groups))
    else:
        p = predict(run, data, variants, groups, decode_workers=settings.decode_workers)
    if not len(p.kept):
        raise InputError(f"no readable images in {data.source}", "pass jpg/png/bmp/webp images")
    return p


def eval_result(v: str, p: Predictions, data: LabelledSet, ref: dict | None, settings: EvaluateSettings,
                warnings_: list[str]) -> dict:
    """The eval/<variant>.json record: accuracy, drop and agreement, per-image predictions and labels,
    and a per-class confusion summary (all from the pass; nothing here depends on how it ran)."""
    top, labels = p.top[v], data.labels[p.kept]
    pred = top[:, 0]
    top1 = float((pred == labels).mean())
    top5 = float((top == labels[:, None]).any(1).mean())
    unreadable = len(data) - len(p.kept)
    notes = list(warnings_) + ([f"{unreadable} unreadable images were left out"] if unreadable else [])
    return {"variant": v, "top1": top1, "top5": top5, "n": len(labels),
            "reference": v if ref is None else ref.get("variant"),   # pytorch, or the FP32 ONNX of an import
            "drop_top1_vs_reference": 0.0 if ref is None else ref["top1"] - top1,
            "agreement_top1_vs_reference": 1.0 if ref is None else float((np.asarray(ref["predictions"]) == pred).mean()),
            "dataset": {"source": str(settings.val_data), "n": len(labels), "unreadable": unreadable,
                        "classes": data.classes},
            "warnings": notes, "predictions": pred.tolist(), "labels": labels.tolist(),
            "per_class": confusion_summary(labels, pred, list(data.spec.labels or data.classes or []) or None)}


def confusion_summary(labels: np.ndarray, pred: np.ndarray, names: list[str] | None, top: int = 3) -> list[dict]:
    """Per true class: its count, top-1 accuracy and the classes it is most often mistaken for."""
    out = []
    for c in np.unique(labels):
        mask = labels == c
        wrong = pred[mask][pred[mask] != c]
        cls, counts = np.unique(wrong, return_counts=True)
        order = np.lexsort((cls, -counts))[:top]
        out.append({"label": int(c), "n": int(mask.sum()), "top1": float((pred[mask] == c).mean()),
                    "confused_with": [{"label": int(cls[i]), "n": int(counts[i])} for i in order]})
    if names:  # the model's labels, else the class folders by position
        for row in out:
            row["name"] = names[row["label"]] if row["label"] < len(names) else None
    return out


def _calibration_overlap(run: RunDir, data: LabelledSet) -> int:
    """How many evaluation samples the INT8 calibration also used (by content hash)."""
    used = QuantizeSummary.calibration_samples(run)
    return len(used & data.fingerprints()) if used else 0
