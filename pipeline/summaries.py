"""Typed stage summaries: what each stage records under ``summary`` in manifest.json, and how a later
stage, the report or the CLI reads it back.

One small frozen dataclass per stage. A writer builds it and stores ``to_json()`` (the plain dict, with
the keys manifest.json has always had); a reader asks ``ExportSummary.of(run).num_classes`` instead of
``run.require_export()["summary"]["num_classes"]``. Reading is tolerant of optional fields an older
run did not record; a record without a required field is one InputError (the run directory comes from
an incompatible rexport), never a KeyError deep inside a stage.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from rexport.core.errors import InputError

if typing.TYPE_CHECKING:
    from rexport.pipeline.manifest import RunDir

_SIMPLE = (bool, int, float, str, dict, list)


def _plain(value: Any) -> Any:
    """A JSON value: nested summaries as their dicts, tuples as lists, paths as strings."""
    if isinstance(value, Summary):
        return value.to_json()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value, default=str))


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def incompatible(stage: str, what: str) -> InputError:
    """The one error for a manifest summary this version cannot read."""
    command, _, target = stage.partition(":")
    again = {"quantize": f"quantize --precision {target or 'int8'} --force", "bench": "bench"}.get(command,
                                                                                                f"{command} --force")
    return InputError(f"the {stage} record in manifest.json {what}: the run directory was made by an "
                      "incompatible version of rexport", f"run 'rexport {again}' again (or start a fresh --out)")


class Summary:
    """Base of the stage summaries: ``to_json`` / ``from_json`` / ``from_stage`` over dataclass fields."""

    #: the manifest stage (or stage prefix) this summary belongs to, for messages
    STAGE: ClassVar[str] = "stage"
    #: fields written only when set; older and simpler records do not have them
    OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()
    #: field -> how its JSON value becomes the typed value (nested summaries)
    NESTED: ClassVar[dict[str, Callable[[Any, str], Any]]] = {}

    def to_json(self) -> dict[str, Any]:
        """The plain dict that goes to the manifest (same keys, same order as the fields)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self.OMIT_WHEN_NONE:
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_json(cls, data: Any, *, stage: str | None = None):
        """The typed summary of a manifest record's ``summary`` dict; unknown keys are ignored."""
        stage = stage or cls.STAGE
        if not isinstance(data, dict):
            raise incompatible(stage, f"has a {type(data).__name__} where its summary should be")
        hints, kwargs = _hints(cls), {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if f.name not in data:
                if required:
                    raise incompatible(stage, f"has no {f.name!r} in its summary")
                continue
            value, hint = data[f.name], hints.get(f.name)
            hint = typing.get_origin(hint) or hint   # dict[str, int] -> dict
            if required and hint in _SIMPLE and not _is(value, hint):
                raise incompatible(stage, f"has {f.name!r} = {value!r} in its summary")
            kwargs[f.name] = cls.NESTED[f.name](value, stage) if f.name in cls.NESTED and value is not None else value
        return cls(**kwargs)

    @classmethod
    def from_stage(cls, record: dict | None, *, stage: str | None = None):
        """The summary of a stage record (as ``run.stage(name)`` or ``run_stage`` returns it); None when
        the stage never ran, or was skipped or failed before writing anything."""
        if not record:
            return None
        data = record.get("summary")
        if not data and record.get("status") in ("skipped", "error"):
            return None
        return cls.from_json(data if data is not None else {}, stage=stage)

    @classmethod
    def of(cls, run: "RunDir", target: str | None = None):
        """The summary of the run's stage (``target``: the variant or engine of validate, evaluate, build),
        None when that stage has none."""
        stage = f"{cls.STAGE}:{target}" if target else cls.STAGE
        return cls.from_stage(run.stage(stage), stage=stage)


def _is(value: Any, hint: type) -> bool:
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _nested(cls: type[Summary]) -> Callable[[Any, str], Any]:
    return lambda value, stage: cls.from_json(value, stage=stage)


def _nested_map(cls: type[Summary]) -> Callable[[Any, str], Any]:
    def convert(value: Any, stage: str) -> dict:
        if not isinstance(value, dict):
            raise incompatible(stage, f"has {value!r} where a mapping of {cls.__name__} should be")
        return {k: cls.from_json(v, stage=stage) for k, v in value.items()}
    return convert


# --- export / import -------------------------------------------------------------------------

class _ModelSummary(Summary):
    """What every stage reads of the stage that made onnx/model.fp32.onnx (export or import)."""

    @classmethod
    def of(cls, run: "RunDir", target: str | None = None) -> "ExportSummary | ImportSummary":
        """The summary of the run's export (or import); exit 2 with a hint when there is none."""
        rec = run.require_export()
        kind = ExportSummary if run.stage("export") else ImportSummary
        return kind.from_stage(rec)


@dataclass(frozen=True)
class ExportSummary(_ModelSummary):
    """``export``: the PyTorch model's ONNX file."""

    STAGE: ClassVar[str] = "export"
    model: str
    num_classes: int
    random_weights: bool | None = None   # absent in the oldest runs: then the settings' weights decide
    weights_sha256: str | None = None
    opset: int | None = None
    batch: str | None = None
    nodes: int | None = None
    ops: dict[str, int] = field(default_factory=dict)
    size_mib: float | None = None
    smoke_max_abs_error: float | None = None
    fold_preprocessing: bool = False
    fold_max_abs_error: float | None = None


@dataclass(frozen=True)
class ImportSummary(_ModelSummary):
    """``import``: an ONNX file made the run's FP32 reference."""

    STAGE: ClassVar[str] = "import"
    model: str
    source: str
    source_sha256: str
    num_classes: int
    random_weights: bool = False
    imported: bool = True
    input_dtype: str | None = None
    source_opset: int | None = None
    opset: int | None = None
    output: str | None = None   # logits | probabilities
    batch: str | None = None
    batch_note: str | None = None
    notes: list[str] = field(default_factory=list)
    nodes: int | None = None
    size_mib: float | None = None
    fold_preprocessing: bool = False
    fold_max_abs_error: float | None = None
    smoke_max_abs_error: float | None = None
    smoke: str | None = None


# --- quantize --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fp16Summary(Summary):
    """``quantize:fp16``: the FP16 file (rexport.pipeline.quantization.FP16Report as plain data)."""

    STAGE: ClassVar[str] = "quantize:fp16"
    path: str
    size_bytes: int | None = None
    fp32_nodes: list[str] = field(default_factory=list)
    clamped_values: int | None = None
    checked_batches: list[int] = field(default_factory=list)

    @classmethod
    def from_report(cls, report: Any) -> "Fp16Summary":
        return cls(**_plain(dataclasses.asdict(report)))


@dataclass(frozen=True)
class CalibrationSummary(Summary):
    """The calibration behind the INT8 files (``quantize:int8`` -> ``calibration``)."""

    STAGE: ClassVar[str] = "quantize:int8"
    method: str
    samples: int
    data: str | None = None
    description: str | None = None
    synthetic: bool = False
    key: str | None = None
    reused: bool = False
    seconds: float | None = None
    statistics_reused: bool = False
    #: method "auto": how many tensors got each method
    per_tensor_methods: dict[str, int] = field(default_factory=dict)
    #: content hashes of the samples calibration used (empty for synthetic data)
    sample_sha256: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FormSummary(Summary):
    """One INT8 file of ``quantize:int8`` (``int8`` for TensorRT, ``int8-openvino`` for OpenVINO)."""

    STAGE: ClassVar[str] = "quantize:int8"
    file: str
    target: str
    qdq: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizeSummary(Summary):
    """``quantize:int8``: one calibration, an INT8 file per target, and the budget search if one ran."""

    STAGE: ClassVar[str] = "quantize:int8"
    OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"budget"})
    NESTED: ClassVar[dict[str, Callable[[Any, str], Any]]] = {
        "calibration": _nested(CalibrationSummary), "forms": _nested_map(FormSummary)}
    calibration: CalibrationSummary
    calibration_file: str | None = None
    tensorrt_cache: str | None = None
    tensorrt_cache_tensors: dict[str, Any] | None = None
    tensorrt_layers: str | None = None
    qdq: dict[str, Any] = field(default_factory=dict)   # the TensorRT form's QdqReport
    forms: dict[str, FormSummary] = field(default_factory=dict)
    int8_float: str | None = None
    int8_float_requested: str | None = None
    int8_float_fallback_reason: str | None = None
    int8_float_proof: dict[str, Any] | None = None
    int8_float_file: dict[str, Any] | None = None
    int8_fp32_float_file: str | None = None
    #: the INT8 budget search (rexport.pipeline.budget's own record), when a budget was given
    budget: dict[str, Any] | None = None

    @staticmethod
    def calibration_samples(run: "RunDir") -> frozenset[str]:
        """Content hashes of the samples the run's INT8 calibration used (empty before calibration)."""
        q = QuantizeSummary.of(run)
        return frozenset(q.calibration.sample_sha256) if q else frozenset()


# --- validate / evaluate / build / bench ----------------------------------------------------

@dataclass(frozen=True)
class ValidateSummary(Summary):
    """``validate:<variant>``: the verdict and worst-case metrics (the full result: validate/<variant>.json)."""

    STAGE: ClassVar[str] = "validate"
    passed: bool
    metrics: dict[str, Any]
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EvaluateSummary(Summary):
    """``evaluate:<variant>``: accuracy on the labelled set (the full result: eval/<variant>.json)."""

    STAGE: ClassVar[str] = "evaluate"
    OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset({"ray"})
    top1: float
    top5: float
    n: int
    drop_top1_vs_reference: float | None = None   # None for the reference itself
    #: the variants the one decoding pass ran (the first stage's duration holds the whole pass)
    one_pass_with: list[str] = field(default_factory=list)
    #: where the pass ran on Ray: shards, hosts, retries
    ray: dict[str, Any] | None = None


@dataclass(frozen=True)
class BuildSummary(Summary):
    """``build:<backend>-<precision>``: the engine and the ONNX file it was compiled from."""

    STAGE: ClassVar[str] = "build"
    backend: str
    precision: str
    engine_dir: str
    source_onnx: str | None = None
    source_variant: str | None = None
    size_mib: float | None = None
    build_seconds: float | None = None


@dataclass(frozen=True)
class BenchSummary(Summary):
    """``bench``: rows by status, and the errors (the figures: bench/results.json)."""

    STAGE: ClassVar[str] = "bench"
    rows: dict[str, int]
    errors: list[str] = field(default_factory=list)


#: every stage's summary class by stage name (or the prefix before ':')
BY_STAGE: dict[str, type[Summary]] = {
    "export": ExportSummary, "import": ImportSummary, "quantize:fp16": Fp16Summary, "quantize:int8": QuantizeSummary,
    "validate": ValidateSummary, "evaluate": EvaluateSummary, "build": BuildSummary, "bench": BenchSummary}


def summary_class(stage: str) -> type[Summary] | None:
    """The summary class of a manifest stage name (``validate:int8`` -> ValidateSummary)."""
    return BY_STAGE.get(stage) or BY_STAGE.get(stage.split(":", 1)[0])
