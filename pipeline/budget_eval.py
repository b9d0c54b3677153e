"""Accuracy on the INT8 budget's splits, for the evaluate stage: on a run whose INT8 file was chosen
within a budget, the selection split helped choose it, so a figure over a set that holds selection
images is optimistic. Each eval record gets the confirmation split's figures beside the full set's,
and says how many of its images were in the selection split."""
from __future__ import annotations

import numpy as np

from rexport.core.fsio import read_json
from rexport.pipeline.budget_stage import SPLITS_FILE
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.summaries import QuantizeSummary

_FINGERPRINTS: dict[tuple[str, int], list[str]] = {}


def _row_fingerprints(data) -> list[str]:
    key = (str(data.source), len(data))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS.clear()
        _FINGERPRINTS[key] = data.row_fingerprints()
    return _FINGERPRINTS[key]


def budget_split_figures(run: RunDir, data, kept: np.ndarray, result: dict, ref: dict | None) -> dict:
    """{"budget_splits": ...} for an eval record (``result``, over ``data`` rows ``kept``), or {} when the
    run's INT8 file was not chosen within a budget."""
    q = QuantizeSummary.of(run)
    if not (q and q.budget) or not run.file(SPLITS_FILE).is_file():
        return {}
    splits = read_json(run.file(SPLITS_FILE))["fingerprints"]
    fps = _row_fingerprints(data)
    rows = [fps[i] for i in kept]
    pred, labels = np.asarray(result["predictions"]), np.asarray(result["labels"])
    ref_pred = pred if ref is None else np.asarray(ref["predictions"])
    out = {}
    for split in ("selection", "confirmation"):
        members = set(splits[split])
        mask = np.array([r in members for r in rows], dtype=bool)
        n = int(mask.sum())
        out[split] = {"n": n} if n == 0 else {
            "n": n, "top1": float((pred[mask] == labels[mask]).mean()),
            "reference_top1": float((ref_pred[mask] == labels[mask]).mean()),
            "agreement_top1_vs_reference": float((pred[mask] == ref_pred[mask]).mean())}
        if n:
            out[split]["drop_top1_vs_reference"] = out[split]["reference_top1"] - out[split]["top1"]
    note = (f"{out['selection']['n']} of these {len(rows)} images are in the INT8 budget's selection split, which "
            f"chose the INT8 file: the full-set figure includes them; the confirmation split "
            f"({out['confirmation']['n']} images) is held out" if out["selection"]["n"] else
            "no image of this set was in the INT8 budget's selection split")
    return {"budget_splits": {**out, "full_set_includes_selection": out["selection"]["n"] > 0, "note": note}}
