"""INT8 calibration: streaming activation ranges for an FP32 ONNX model, cached by content.

It imports only ``rexport.core`` (never ``rexport.pipeline``) and no torch.
"""
from rexport.calibration.calibrate import (CalibrationResult, CalibrationSettings, calibrate, calibration_key,
                                           load_calibration, open_reader_for)
from rexport.calibration.readers import (ArrayReader, CalibrationReader, ImageFolderReader, SyntheticReader,
                                         image_fingerprints, open_reader)
from rexport.calibration.choice import CRITERION, METHODS, TensorChoice, choose_ranges, compute_ranges
from rexport.calibration.histogram import numba_available
from rexport.calibration.statistics import ActivationStatistics, collect
from rexport.calibration.tensorrt_cache import (algorithm_for, read_tensorrt_cache, read_tensorrt_cache_header,
                                                read_tensorrt_scales, tensorrt_version_tag, write_tensorrt_cache)

__all__ = [
    "CRITERION", "METHODS", "ActivationStatistics", "TensorChoice", "choose_ranges", "numba_available", "ArrayReader", "CalibrationReader", "CalibrationResult", "CalibrationSettings",
    "ImageFolderReader", "SyntheticReader", "algorithm_for", "calibrate", "calibration_key", "collect",
    "compute_ranges", "image_fingerprints", "load_calibration", "open_reader", "open_reader_for",
    "read_tensorrt_cache", "read_tensorrt_cache_header", "read_tensorrt_scales", "tensorrt_version_tag",
    "write_tensorrt_cache",
]
