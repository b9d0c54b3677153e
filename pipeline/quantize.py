"""Quantize stage: the FP16 and INT8 (explicit Q/DQ) ONNX variants, made from the FP32 export.

Precision is decided here, in ONNX, where ONNX Runtime on any CPU can check it; engine
backends only compile these files (TensorRT 11 takes precision from the model alone).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from rexport.core.errors import InputError
from rexport.core.settings import setting
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.manifest import VARIANT_FILES, RunDir, StageOutcome

PRECISIONS = ("fp16", "int8")


@dataclass(frozen=True)
class QuantizeSettings:
    precision: str = setting("int8", choices=("fp16", "int8"), run=False, help="The variant to make.")
    calib_data: str = setting("synthetic", help="Image folder, .npy/.npz of preprocessed arrays, or 'synthetic'.")
    calib_samples: int = 512
    calib_method: str = setting("entropy", help="Calibration method (rexport.calibration.METHODS).")
    calib_batch_size: int = 8
    exclude: tuple[str, ...] = setting((), multiple=True, help="Node name to leave in float (repeatable).")
    skip_first_conv: bool = setting(False, help="Leave the stem convolution in float.")
    skip_classifier: bool = setting(False, help="Leave the final fully connected layer in float.")
    residual_add: str = setting("both", cli="residual-qdq", choices=("both", "residual"),
                                help="Q/DQ on both inputs of each residual Add (OpenVINO fuses Conv+Add), or on the "
                                     "residual input only (TensorRT's recommended placement).")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r} for quantize", "use --precision fp16 or int8")


def run_quantize(run: RunDir, settings: QuantizeSettings, *, progress: bool = True, force: bool = False) -> dict:
    run.require_export()
    fp32 = run.file(VARIANT_FILES["fp32"])
    rel = VARIANT_FILES[settings.precision]
    if settings.precision == "fp16":
        from rexport.pipeline.quantization import convert_fp16

        def fp16_action() -> StageOutcome:
            report = convert_fp16(fp32, run.file(rel))
            return StageOutcome(outputs=[rel], summary=asdict(report))

        return run.run_stage("quantize:fp16", inputs={"fp32": fp32}, settings={"precision": "fp16"},
                             action=fp16_action, force=force)

    from rexport.calibration import CalibrationSettings, calibrate, calibration_key, open_reader_for
    from rexport.core.fsio import sha256_file
    from rexport.pipeline.quantization import QdqSettings, insert_qdq, tensors_to_calibrate

    calib = CalibrationSettings(method=settings.calib_method, samples=settings.calib_samples,
                                batch_size=settings.calib_batch_size, seed=settings.seed)
    qdq = QdqSettings(exclude_nodes=tuple(settings.exclude), quantize_first_conv=not settings.skip_first_conv,
                      quantize_classifier=not settings.skip_classifier, residual_add=settings.residual_add)
    spec = PreprocessSpec.from_onnx(fp32)
    # Check the Q/DQ plan (e.g. --exclude names) and open the reader before the stage runs:
    # bad input fails here and writes nothing.
    tensors_to_calibrate(fp32, qdq)
    reader = open_reader_for(settings.calib_data, spec, calib)
    stage_settings = {**asdict(settings), "calibration": calib.to_dict(), "qdq": asdict(qdq),
                      "data_fingerprint": reader.fingerprint()}

    def int8_action() -> StageOutcome:
        if force:  # --force recalibrates: drop this calibration's cache entry first
            key = calibration_key(sha256_file(fp32), reader.fingerprint(), calib)
            for f in (run.path / "calibration").glob(f"{key}.*"):
                f.unlink()
        result = calibrate(fp32, reader, calib, run.path / "calibration", progress=progress)
        report = insert_qdq(fp32, result.ranges, run.file(rel), qdq)
        cal_rel = str(result.json_path.relative_to(run.path))
        # TensorRT 8.x / --legacy: the cache written for this file holds only the tensors it quantizes.
        from rexport.calibration.tensorrt_cache import write_tensorrt_cache_for_file
        trt_cache = write_tensorrt_cache_for_file(result.tensorrt_cache_path, run.file(rel),
                                                  result.tensorrt_cache_path.with_name(f"{result.key}.int8.tensorrt.cache"))
        trt_rel = str(trt_cache["path"].relative_to(run.path))
        layers_rel = str(trt_cache["layers_path"].relative_to(run.path))
        summary = {
            "calibration": {"method": calib.method, "samples": result.samples, "data": settings.calib_data,
                            "description": result.data_description, "synthetic": result.synthetic,
                            "key": result.key, "reused": result.reused, "seconds": round(result.seconds, 3),
                            # which samples were used, so evaluation can warn about overlap
                            "sample_sha256": sorted(reader.sample_fingerprints()) if not reader.synthetic else []},
            "calibration_file": cal_rel, "tensorrt_cache": trt_rel,
            "tensorrt_cache_tensors": {"kept": trt_cache["kept"], "left_out": trt_cache["left_out"]},
            "tensorrt_layers": layers_rel,
            "qdq": asdict(report),
        }
        return StageOutcome(outputs=[rel, cal_rel, trt_rel, layers_rel], summary=summary)

    return run.run_stage("quantize:int8", inputs={"fp32": fp32}, settings=stage_settings, action=int8_action,
                         force=force)
