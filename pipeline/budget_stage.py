"""The INT8 budget inside the quantize stage: settings from QuantizeSettings, the seeded splits, and the
search (:mod:`rexport.pipeline.budget`) over files written with the OpenVINO form's placement.

Run-directory files: ``budget/splits.json`` (every sample hash of both splits), ``budget/search.json``
(every step, what the report shows) and ``sensitivity/<key>.json`` (the cached ranking).
"""
from __future__ import annotations

from pathlib import Path

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.budget import BudgetOutcome, BudgetSettings, search_budget, with_exclusions
from rexport.pipeline.budget_data import BudgetData, split_budget_data
from rexport.pipeline.manifest import RunDir
from rexport.pipeline.sensitivity import SensitivitySettings
from rexport.pipeline.summaries import ExportSummary

__all__ = ["budget_settings", "budget_splits", "run_budget", "budget_outputs", "with_exclusions"]

SPLITS_FILE = "budget/splits.json"
SEARCH_FILE = "budget/search.json"


def budget_settings(settings) -> BudgetSettings | None:
    """The budget a QuantizeSettings asks for (None: no budget). Bad values raise InputError."""
    if settings.max_accuracy_drop is None and settings.max_agreement_loss is None:
        return None
    if not settings.budget_val_data:
        raise InputError("an INT8 budget (--max-accuracy-drop / --max-agreement-loss) needs --val-data",
                         "pass the images to search and prove it on (labelled for --max-accuracy-drop)")
    return BudgetSettings(max_accuracy_drop=settings.max_accuracy_drop, max_agreement_loss=settings.max_agreement_loss,
                          fraction=settings.budget_fraction, max_samples=settings.budget_samples,
                          per_tensor_method=settings.budget_per_tensor_method, max_steps=settings.budget_max_steps,
                          latency=settings.budget_latency,
                          sensitivity=SensitivitySettings(metric=settings.sensitivity_metric,
                                                          mode=settings.sensitivity_mode,
                                                          samples=settings.sensitivity_samples))


def budget_splits(run: RunDir, settings, budget: BudgetSettings, spec: PreprocessSpec,
                  calibration_fingerprints: set[str]) -> BudgetData:
    """The selection and confirmation splits of ``--val-data``; drawn (and checked) before any work."""
    num_classes = ExportSummary.of(run).num_classes
    return split_budget_data(settings.budget_val_data, spec, num_classes,
                             need_labels=budget.max_accuracy_drop is not None,
                             calibration_fingerprints=calibration_fingerprints, fraction=budget.fraction,
                             max_samples=budget.max_samples, seed=settings.seed)


def run_budget(run: RunDir, fp32: Path, budget: BudgetSettings, data: BudgetData, qdq, result, *,
               auto_ranges) -> BudgetOutcome:
    """Search the budget from calibration ``result``; ``auto_ranges()`` gives the per-tensor method
    choice's ranges from the same statistics. Writes splits.json and search.json."""
    from rexport.pipeline.quantization import insert_qdq
    from rexport.pipeline.quantization.forms import OPENVINO_FORM, form_settings

    atomic_write_json(run.file(SPLITS_FILE), {**data.record, "fingerprints": data.fingerprints})

    def write_form(ranges: dict, exclude: tuple[str, ...], path: Path) -> None:
        insert_qdq(fp32, ranges, path, form_settings(with_exclusions(qdq, exclude), OPENVINO_FORM))

    from rexport.calibration import load_calibration

    doc = load_calibration(result.json_path)  # its method, and how long it took when it was computed
    return search_budget(fp32=fp32, work=run.file("budget"), write_form=write_form, ranges=result.ranges,
                         method=doc["settings"]["method"], auto_ranges=auto_ranges, data=data, settings=budget,
                         sensitivity_dir=run.file("sensitivity"), calibration_key=result.key,
                         calibration_seconds=float(doc["seconds"]))


def budget_outputs(outcome: BudgetOutcome | None) -> list[str]:
    return [SPLITS_FILE, SEARCH_FILE] if outcome is not None else []


