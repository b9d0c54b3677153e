"""INT8 within an accuracy budget: cheaper fixes first, then a greedy float fallback ranked by sensitivity.

1. The plain INT8 file (the configured calibration method) is measured on the selection split.
2. If it misses, the per-tensor calibration method choice (``auto``: from the statistics already
   collected, no second data pass) is tried.
3. If that misses too, quantizer groups are ranked by sensitivity (:mod:`rexport.pipeline.sensitivity`)
   and the most sensitive ones are left in float one at a time until the budget holds on the selection
   split.
4. The choice is then proved on the disjoint confirmation split. Every figure is measured on a written
   file in ONNX Runtime (accuracy) and on its OpenVINO engine (latency); which split it is says so.

The result is ranges plus an exclude list: the quantize stage writes every INT8 form from them, so
each form keeps its own placement and a fallback layer is simply left without Q/DQ.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rexport.core.errors import InputError
from rexport.core.fsio import atomic_write_json, ensure_dir
from rexport.pipeline.budget_data import BudgetData
from rexport.pipeline.sensitivity import SensitivitySettings, measure_sensitivity


@dataclass(frozen=True)
class BudgetSettings:
    max_accuracy_drop: float | None = None   # top-1 points below FP32
    max_agreement_loss: float | None = None  # percent of images whose top-1 differs from FP32
    fraction: float = 0.5                    # of the usable --val-data images that form the selection split
    max_samples: int = 2000                  # selection + confirmation, at most
    per_tensor_method: bool = True           # try the per-tensor calibration method choice before any fallback
    max_steps: int = 10                      # fallback steps, at most
    latency: bool = True                     # time each step's OpenVINO engine (when OpenVINO is here)
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is None and self.max_agreement_loss is None:
            raise InputError("an INT8 budget needs --max-accuracy-drop or --max-agreement-loss")
        if not 0.0 < self.fraction < 1.0:
            raise InputError(f"the selection fraction must be in (0, 1), got {self.fraction}", "e.g. 0.5")
        if self.max_samples < 2 or self.max_steps < 0:
            raise InputError("the budget needs max_samples >= 2 and max_steps >= 0")


@dataclass
class BudgetOutcome:
    ranges: dict[str, float]
    exclude: tuple[str, ...]   # layers left in float by the fallback (added to the user's exclusions)
    method: str                # the calibration method of the chosen ranges
    met: bool
    summary: dict


def _top1(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(1)


def _ort_logits(path: Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    from rexport.pipeline.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path) as r:
        return np.concatenate([r.infer(x[i:i + batch]) for i in range(0, len(x), batch)])


class _Judge:
    """Figures of a candidate against FP32 on one split, and whether they hold the budget."""

    def __init__(self, settings: BudgetSettings, fp32_logits: np.ndarray, labels: np.ndarray | None) -> None:
        self.s, self.ref, self.labels = settings, _top1(fp32_logits), labels

    def figures(self, logits: np.ndarray) -> dict:
        pred = _top1(logits)
        fig = {"n": len(pred), "agreement_loss_pct": 100.0 * float((pred != self.ref).mean())}
        if self.labels is not None:
            fp32 = 100.0 * float((self.ref == self.labels).mean())
            top1 = 100.0 * float((pred == self.labels).mean())
            fig.update({"fp32_top1_pct": fp32, "top1_pct": top1, "drop_pts": fp32 - top1})
        misses = []
        if self.s.max_accuracy_drop is not None:
            misses.append(fig["drop_pts"] - self.s.max_accuracy_drop)
        if self.s.max_agreement_loss is not None:
            misses.append(fig["agreement_loss_pct"] - self.s.max_agreement_loss)
        fig["misses_by"] = max(misses)
        fig["meets"] = fig["misses_by"] <= 1e-9
        return fig


def openvino_latency_ms(onnx_path: Path, *, min_time: float = 0.3) -> dict:
    """p50 latency (ms, batch 1) of ``onnx_path`` compiled as ``rexport build`` compiles an OpenVINO INT8
    engine (same conversion, unsigned post-ReLU quantizers and load settings; nothing saved), or why not."""
    from rexport.pipeline.backends.openvino import DEVICE, OpenVINOBackend, unsigned_after_relu

    backend = OpenVINOBackend()
    reason = backend.unavailable_reason()
    if reason:
        return {"skipped": reason}
    import openvino as ov
    from rexport.core.preprocess import PreprocessSpec

    model = ov.convert_model(str(onnx_path))
    unsigned_after_relu(model)
    compiled = ov.Core().compile_model(model, DEVICE, backend.load_settings("int8"))
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, *PreprocessSpec.from_onnx(onnx_path).input_shape))
    x = x.astype(np.float32)
    for _ in range(3):
        request.infer([x])
    times, t_end = [], time.perf_counter() + min_time
    while time.perf_counter() < t_end or len(times) < 10:
        t0 = time.perf_counter()
        request.infer([x])
        times.append(time.perf_counter() - t0)
    return {"p50_ms": 1e3 * float(np.median(times)), "runs": len(times), "batch": 1,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


@dataclass
class _Search:
    fp32: Path
    work: Path
    write: Callable[[dict, tuple[str, ...], Path], None]  # (ranges, exclude, out path): the OpenVINO form
    settings: BudgetSettings
    data: BudgetData
    steps: list = field(default_factory=list)

    def __post_init__(self) -> None:
        import onnx

        from rexport.pipeline.qdq_groups import layer_names

        ensure_dir(self.work)
        self.names = layer_names(onnx.load(str(self.fp32), load_external_data=False))
        self.judge = _Judge(self.settings, _ort_logits(self.fp32, self.data.x["selection"]),
                            self.data.labels["selection"])

    def try_step(self, fix: str, ranges: dict, method: str, exclude: tuple[str, ...], layer: str | None) -> dict:
        k, t0 = len(self.steps), time.perf_counter()
        path = self.work / f"step-{k}.onnx"
        self.write(ranges, exclude, path)
        fig = self.judge.figures(_ort_logits(path, self.data.x["selection"]))
        step = {"step": k, "fix": fix, "layer": layer, "calibration_method": method,
                "fallback_layers": list(exclude), "fallback_names": [self.names.get(n, n) for n in exclude],
                "selection": fig,
                "latency": openvino_latency_ms(path) if self.settings.latency else {"skipped": "off"}}
        step["seconds"] = round(time.perf_counter() - t0, 3)  # write, ORT on the selection split, latency
        step["_ranges"], step["_path"] = ranges, path
        self.steps.append(step)
        return step


def search_budget(*, fp32: Path, work: Path, write_form: Callable[[dict, tuple[str, ...], Path], None],
                  ranges: dict[str, float], method: str, auto_ranges: Callable[[], dict[str, float]] | None,
                  data: BudgetData, settings: BudgetSettings, sensitivity_dir: Path, calibration_key: str = "",
                  calibration_seconds: float | None = None) -> BudgetOutcome:
    """Find the cheapest INT8 configuration that holds ``settings``' budget; see the module docstring.

    ``write_form(ranges, exclude, path)`` writes the OpenVINO-form file a step is measured on;
    ``auto_ranges()`` gives the per-tensor method choice's ranges (None: switched off)."""
    t0 = time.perf_counter()
    search = _Search(fp32, work, write_form, settings, data)
    chosen = search.try_step(f"none (plain {method} calibration)", ranges, method, (), None)
    if not chosen["selection"]["meets"] and settings.per_tensor_method and auto_ranges is not None \
            and method != "auto":
        chosen = search.try_step("per-tensor calibration method", auto_ranges(), "auto", (), None)
    sens = None
    if not chosen["selection"]["meets"] and settings.max_steps > 0:
        base = chosen
        sens = measure_sensitivity(base["_path"], fp32, data.x["selection"], data.labels["selection"],
                                   settings.sensitivity, sensitivity_dir, calibration_key=calibration_key)
        exclude: tuple[str, ...] = ()
        taken = 0
        for entry in sens.ranked:
            if taken >= settings.max_steps:
                break
            new = tuple(c for c in entry.group.consumers if c not in exclude)
            if not new:
                continue
            exclude, taken = exclude + new, taken + 1
            chosen = search.try_step("float fallback", base["_ranges"], base["calibration_method"], exclude,
                                     entry.group.name)
            if chosen["selection"]["meets"]:
                break
    if not chosen["selection"]["meets"]:  # the best found: least miss, then fewest float layers
        chosen = min(search.steps, key=lambda s: (s["selection"]["misses_by"], len(s["fallback_layers"])))
    conf_judge = _Judge(settings, _ort_logits(fp32, data.x["confirmation"]), data.labels["confirmation"])
    confirmation = conf_judge.figures(_ort_logits(chosen["_path"], data.x["confirmation"]))
    met = bool(chosen["selection"]["meets"] and confirmation["meets"])
    seconds = time.perf_counter() - t0
    summary = {
        "target": {"max_accuracy_drop_pts": settings.max_accuracy_drop,
                   "max_agreement_loss_pct": settings.max_agreement_loss},
        "splits": data.record,
        "steps": [{k: v for k, v in s.items() if not k.startswith("_")} for s in search.steps],
        "sensitivity": None if sens is None else _named(sens.to_dict(), search.names, sens.path),
        "chosen": {"step": chosen["step"], "fix": chosen["fix"], "calibration_method": chosen["calibration_method"],
                   "fallback_layers": chosen["fallback_layers"], "fallback_names": chosen["fallback_names"],
                   "selection": chosen["selection"],
                   "confirmation": confirmation, "latency": chosen["latency"]},
        "met": met, "search_seconds": round(seconds, 3), "calibration_seconds": calibration_seconds,
        "search_over_calibration": (round(seconds / calibration_seconds, 2)
                                    if calibration_seconds else None),
        "message": _message(settings, chosen, confirmation, met),
    }
    for s in search.steps:
        s["_path"].unlink(missing_ok=True)
    atomic_write_json(work / "search.json", summary)
    return BudgetOutcome(ranges=dict(chosen["_ranges"]), exclude=tuple(chosen["fallback_layers"]),
                         method=chosen["calibration_method"], met=met, summary=summary)


def _named(sens: dict, names: dict[str, str], path: Path) -> dict:
    for r in sens["ranked"]:
        r["layer_names"] = [names.get(c, c) for c in r["consumers"]]
    return {**sens, "file": str(path)}


def _describe(fig: dict) -> str:
    parts = []
    if "drop_pts" in fig:
        parts.append(f"top-1 drop {fig['drop_pts']:.2f} pt")
    parts.append(f"agreement loss {fig['agreement_loss_pct']:.2f}%")
    return ", ".join(parts) + f" on {fig['n']} images"


def _message(settings: BudgetSettings, chosen: dict, confirmation: dict, met: bool) -> str:
    what = (f"{len(chosen['fallback_layers'])} layer(s) in float" if chosen["fallback_layers"] else chosen["fix"])
    if met:
        return (f"budget met by {what}: {_describe(confirmation)} of the confirmation split "
                f"(selection split: {_describe(chosen['selection'])})")
    where = "confirmation" if chosen["selection"]["meets"] else "selection"
    miss = confirmation["misses_by"] if where == "confirmation" else chosen["selection"]["misses_by"]
    return (f"budget not met: the best file found ({what}) misses it by {miss:.2f} on the {where} split; "
            f"confirmation split: {_describe(confirmation)}")


def with_exclusions(qdq, exclude: tuple[str, ...]):
    """``qdq`` (QdqSettings) with ``exclude`` added to its excluded layers."""
    return dataclasses.replace(qdq, exclude_nodes=tuple(dict.fromkeys((*qdq.exclude_nodes, *exclude))))


def budget_lines(summary: dict) -> list[str]:
    """The budget search for a terminal: one line per step (selection split), then the verdict."""
    lines = []
    for s in summary["steps"]:
        fig = s["selection"]
        what = s["fix"] if s["layer"] is None else f"in float: {', '.join(s['fallback_names'])}"
        lat = s["latency"].get("p50_ms")
        lines.append(f"budget step {s['step']}: {what}: {_describe(fig)} (selection split)"
                     + (f", OpenVINO p50 {lat:.2f} ms @b1" if lat is not None else ""))
    if summary.get("sensitivity"):
        sens = summary["sensitivity"]
        lines.append(f"sensitivity: {len(sens['ranked'])} groups, {sens['metric']} on {sens['samples']} selection "
                     f"images in {sens['seconds']:.1f} s{' (cached)' if sens['reused'] else ''}")
    ratio = summary.get("search_over_calibration")
    lines.append(f"budget search {summary['search_seconds']:.1f} s"
                 + (f" ({ratio:.1f}x the calibration's {summary['calibration_seconds']:.1f} s)" if ratio else ""))
    lines.append(summary["message"])
    return lines
