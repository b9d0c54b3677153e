"""Quantize stage: the FP16 and INT8 (explicit Q/DQ) ONNX variants, made from the FP32 export.

Precision is decided here, in ONNX, where ONNX Runtime on any CPU can check it; engine
backends only compile these files (TensorRT 11 takes precision from the model alone).
``quantize:int8`` calibrates once and writes both INT8 forms: ``int8`` (TensorRT's placement, float
parts in FP16 when they pass their CPU proof) and ``int8-openvino`` (NNCF parity).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.settings import setting
from rexport.core.preprocess import PreprocessSpec
from rexport.calibration.choice import METHODS as CALIB_METHODS
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome
from rexport.pipeline.summaries import CalibrationSummary, ExportSummary, Fp16Summary, FormSummary, QuantizeSummary

PRECISIONS = ("fp16", "int8")


@dataclass(frozen=True)
class QuantizeSettings:
    precision: str = setting("int8", choices=("fp16", "int8"), run=False, help="The variant to make.")
    calib_data: str = setting("synthetic", help="Image folder, .npy/.npz of preprocessed arrays, or 'synthetic'.")
    calib_samples: int = 512
    calib_method: str = setting("entropy", choices=CALIB_METHODS,
                                help="Calibration method; auto chooses one per tensor from the same statistics.")
    calib_batch_size: int = 8
    percentile: float = setting(99.99, help="Percentile of |x| kept by --calib-method percentile (and auto).")
    num_bins: int = setting(2048, help="Histogram bins per tensor for the histogram methods (>= 256).")
    exclude: tuple[str, ...] = setting((), multiple=True, help="Node name to leave in float (repeatable).")
    skip_first_conv: bool = setting(False, help="Leave the stem convolution in float.")
    skip_classifier: bool = setting(False, help="Leave the final fully connected layer in float.")
    int8_float: str = setting("fp16", choices=("fp16", "fp32"),
                              help="Float parts of the TensorRT INT8 file (int8): fp16 is kept only when it passes "
                                   "its CPU proof against fp32 float parts, else fp32 with the reason recorded.")
    int8_float_data: str = setting("synthetic", help="Inputs for that proof: 'synthetic', an image folder or an "
                                                     ".npz/.npy of preprocessed x.")
    int8_float_samples: int = setting(64, help="How many inputs the FP16-float proof compares.")
    int8_float_val_data: str | None = setting(None, help="Labelled set (class folders or .npz with x, y) on which the "
                                                         "FP16-float proof also checks top-1 accuracy (within 0.2 pt).")
    # the INT8 budget (issue 11; rexport.pipeline.budget): searched on a selection split of budget_val_data,
    # proved on a disjoint confirmation split
    max_accuracy_drop: float | None = setting(None, help="INT8 budget: top-1 points INT8 may lose against FP32 "
                                                         "(labelled --val-data); misses exit 1.")
    max_agreement_loss: float | None = setting(None, help="INT8 budget without labels: percent of images whose "
                                                          "top-1 may differ from FP32.")
    budget_val_data: str | None = setting(None, cli="val-data", run=False,
                                          help="Images the INT8 budget is searched and proved on (on run: the "
                                               "evaluate stage's --val-data); calibration images are left out.")
    budget_fraction: float = setting(0.5, help="Share of the budget images in the selection split (seeded by --seed).")
    budget_samples: int = setting(2000, help="Budget images used at most (selection + confirmation).")
    budget_per_tensor_method: bool = setting(True, help="Try the per-tensor calibration method choice before "
                                                        "any float fallback.")
    budget_max_steps: int = setting(10, help="Float-fallback steps the budget search takes at most.")
    budget_latency: bool = setting(True, help="Time each budget step's OpenVINO INT8 engine (where OpenVINO runs).")
    sensitivity_metric: str = setting("kl", choices=("kl", "mse"), help="Per-layer sensitivity: logit KL or MSE "
                                                                        "to FP32.")
    sensitivity_mode: str = setting("alone", choices=("alone", "leave-out"),
                                    help="Sensitivity of a layer quantized alone, or left alone in float.")
    sensitivity_samples: int = setting(32, help="Selection-split images the sensitivity ranking uses.")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r} for quantize", "use --precision fp16 or int8")
        if self.int8_float not in ("fp16", "fp32"):
            raise InputError(f"unknown --int8-float {self.int8_float!r}", "use --int8-float fp16 or fp32")
        if self.int8_float_samples < 1:
            raise InputError("--int8-float-samples must be positive", "e.g. --int8-float-samples 64")
        if self.precision == "int8":
            from rexport.pipeline.budget_stage import budget_settings

            budget_settings(self)  # bad budget values fail here, before any work


def run_quantize(run: RunDir, settings: QuantizeSettings, *, progress: bool = True, force: bool = False) -> dict:
    run.require_export()
    fp32 = run.file(VARIANT_FILES["fp32"])
    rel = VARIANT_FILES[settings.precision]
    if settings.precision == "fp16":
        from rexport.pipeline.quantization import convert_fp16

        def fp16_action() -> StageOutcome:
            report = convert_fp16(fp32, run.file(rel))
            return StageOutcome(outputs=[rel], summary=Fp16Summary.from_report(report).to_json())

        return run.run_stage("quantize:fp16", inputs={"fp32": fp32}, settings={"precision": "fp16"},
                             action=fp16_action, force=force)

    from rexport.calibration import CalibrationSettings, calibrate, calibration_key, open_reader_for
    from rexport.core.fsio import sha256_file
    from rexport.pipeline.quantization import QdqSettings
    from rexport.pipeline.quantization.forms import FORMS, form_settings, tensors_for_forms, write_int8_forms

    calib = CalibrationSettings(method=settings.calib_method, samples=settings.calib_samples,
                                batch_size=settings.calib_batch_size, seed=settings.seed,
                                percentile=settings.percentile, num_bins=settings.num_bins)
    qdq = QdqSettings(exclude_nodes=tuple(settings.exclude), quantize_first_conv=not settings.skip_first_conv,
                      quantize_classifier=not settings.skip_classifier)
    spec = PreprocessSpec.from_onnx(fp32)
    # Check the Q/DQ plans (e.g. --exclude names), the proof's data and the reader before the stage runs:
    # bad input fails here and writes nothing.
    tensors_for_forms(fp32, qdq)
    proof = _float_proof_inputs(run, settings, spec) if settings.int8_float == "fp16" else None
    reader = open_reader_for(settings.calib_data, spec, calib)
    if spec.raw_pixels:  # a folded-preprocessing model is calibrated on the pixels the images decode to
        from rexport.pipeline.fold_preprocessing import RawPixelReader

        reader = RawPixelReader(reader, spec)
    from rexport.pipeline import budget_stage

    budget = budget_stage.budget_settings(settings)
    splits = None if budget is None else budget_stage.budget_splits(
        run, settings, budget, spec, set() if reader.synthetic else reader.sample_fingerprints())
    stage_settings = {**asdict(settings), "calibration": calib.to_dict(),
                      "qdq": {form: asdict(form_settings(qdq, form)) for form in FORMS},
                      "data_fingerprint": reader.fingerprint()}
    paths = {form: run.file(VARIANT_FILES[form]) for form in FORMS}

    def int8_action() -> StageOutcome:
        if force:  # --force recalibrates: drop this calibration's cache entry first
            key = calibration_key(sha256_file(fp32), reader.fingerprint(), calib)
            for f in (run.path / "calibration").glob(f"{key}.*"):
                f.unlink()
        result = calibrate(fp32, reader, calib, run.path / "calibration", progress=progress, force=force)
        ranges, qdq_used, outcome = result.ranges, qdq, None
        if budget is not None:  # cheaper fixes first, then a float fallback: ranges and exclusions for every form
            auto = {}

            def auto_ranges() -> dict:  # the per-tensor method choice, from the cached statistics
                auto["result"] = calibrate(fp32, reader, dataclasses.replace(calib, method="auto"),
                                           run.path / "calibration", progress=progress)
                return auto["result"].ranges

            outcome = budget_stage.run_budget(run, fp32, budget, splits, qdq, result, auto_ranges=auto_ranges)
            ranges, qdq_used = outcome.ranges, budget_stage.with_exclusions(qdq, outcome.exclude)
            if outcome.method == "auto" and "result" in auto:  # its record and TensorRT cache go with the files
                result = auto["result"]
        forms = write_int8_forms(fp32, ranges, paths, qdq_used, int8_float=settings.int8_float,
                                 fp32_float_path=run.file(FP32_FLOAT_FILE),
                                 proof_inputs=proof[0] if proof else None, labelled=proof[1] if proof else None)
        kept_fp32_float = [FP32_FLOAT_FILE] if forms.fp32_float_path is not None else []
        if not kept_fp32_float:
            run.file(FP32_FLOAT_FILE).unlink(missing_ok=True)  # stale from an earlier FP16-float run
        cal_rel = str(result.json_path.relative_to(run.path))
        # TensorRT 8.x / --legacy: the cache written for the TensorRT form holds only the tensors it quantizes
        # (read from its FP32-float file: same Q/DQ, and opset 17 like the FP32 export).
        from rexport.calibration.tensorrt_cache import write_tensorrt_cache_for_file
        trt_source = forms.fp32_float_path or paths["int8"]
        trt_cache = write_tensorrt_cache_for_file(result.tensorrt_cache_path, trt_source,
                                                  result.tensorrt_cache_path.with_name(f"{result.key}.int8.tensorrt.cache"))
        trt_rel = str(trt_cache["path"].relative_to(run.path))
        layers_rel = str(trt_cache["layers_path"].relative_to(run.path))
        summary = QuantizeSummary(
            calibration=CalibrationSummary(
                method=outcome.method if outcome else calib.method, samples=result.samples, data=settings.calib_data,
                description=result.data_description, synthetic=result.synthetic, key=result.key,
                reused=result.reused, seconds=round(result.seconds, 3), statistics_reused=result.statistics_reused,
                # method "auto": how many tensors got each method (per tensor: the calibration file)
                per_tensor_methods={m: list(result.choices.values()).count(m)
                                    for m in sorted(set(result.choices.values()))},
                # which samples were used, so evaluation can warn about overlap
                sample_sha256=sorted(reader.sample_fingerprints()) if not reader.synthetic else []),
            calibration_file=cal_rel, tensorrt_cache=trt_rel,
            tensorrt_cache_tensors={"kept": trt_cache["kept"], "left_out": trt_cache["left_out"]},
            tensorrt_layers=layers_rel,
            qdq=asdict(forms.reports["int8"]),   # the TensorRT form, the ``int8`` variant
            forms={form: FormSummary(file=VARIANT_FILES[form], target=FORM_TARGETS[form], qdq=asdict(r))
                   for form, r in forms.reports.items()},
            int8_float=forms.int8_float, int8_float_requested=settings.int8_float,
            int8_float_fallback_reason=forms.fallback_reason,
            int8_float_proof=forms.proof.to_dict() if forms.proof else None,
            int8_float_file=asdict(forms.float_report) if forms.float_report else None,
            int8_fp32_float_file=kept_fp32_float[0] if kept_fp32_float else None,
            # a missed budget keeps the best files found, marked as such: status failed (exit 1), never accepted
            budget=outcome.summary if outcome else None,
        ).to_json()
        outputs = [*(VARIANT_FILES[f] for f in FORMS), *kept_fp32_float, cal_rel, trt_rel, layers_rel]
        if outcome is None:
            return StageOutcome(outputs=outputs, summary=summary)
        return StageOutcome(outputs=outputs + budget_stage.budget_outputs(outcome), summary=summary,
                            status="ok" if outcome.met else "failed", reason=None if outcome.met else
                            outcome.summary["message"])

    inputs = {"fp32": fp32, **({"budget_val_data": Path(settings.budget_val_data)} if budget else {})}
    return run.run_stage("quantize:int8", inputs=inputs, settings=stage_settings, action=int8_action,
                         force=force)


#: the FP32-float TensorRT form kept beside an FP16-float ``int8`` (what it was proved against; opset 17,
#: so TensorRT 8.x parses it). Not a variant of its own: the float choice is a setting of ``int8``.
FP32_FLOAT_FILE = "onnx/model.int8.fp32-float.onnx"
FORM_TARGETS = {"int8": "tensorrt", "int8-openvino": "openvino"}


def _float_proof_inputs(run: RunDir, settings: QuantizeSettings, spec: PreprocessSpec):
    """(validation inputs, a function giving the labelled (x, y) batches or None) for the FP16-float proof,
    drawn as the validate stage draws its inputs."""
    from rexport.pipeline.validate import ValidateSettings, make_inputs

    x, _ = make_inputs(spec, ValidateSettings(data=settings.int8_float_data, samples=settings.int8_float_samples,
                                              seed=settings.seed))
    if not settings.int8_float_val_data:
        return x, None
    from rexport.pipeline.labelled import LabelledSet

    num_classes = ExportSummary.of(run).num_classes
    data = LabelledSet(settings.int8_float_val_data, spec, num_classes, None, settings.seed)

    def labelled():
        """The labelled batches, decoded as the evaluate stage decodes them (in this process)."""
        from rexport.pipeline.decode import BatchDecoder

        with BatchDecoder(spec, 0) as decoder:
            for idx, xb in data.batches(data.groups(32), decoder):
                yield xb, np.asarray(data.labels)[idx]
    return x, labelled
