"""Real runs for the deployment-layout tests (made by the real stages, once per test module)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

LABELS = ("cat", "dog", "fish")


def make_run(root: Path, *, std=(0.229, 0.224, 0.225), mean=(0.485, 0.456, 0.406), engines: bool = True,
             bench: bool = True):
    """ResNet-18 (3 classes, 32 px): export, int8 with 8 calibration samples, the OpenVINO int8 engine and a
    short bench of fp32 at batch 1 and 4 (what Triton's preferred batch sizes come from)."""
    from rexport.core.preprocess import PreprocessSpec
    from rexport.pipeline.backends import BuildSettings
    from rexport.pipeline.bench import BenchSettings, run_bench
    from rexport.pipeline.build import build_engines
    from rexport.pipeline.export import ExportSettings, run_export
    from rexport.pipeline.manifest import RunDir
    from rexport.pipeline.quantize import QuantizeSettings, run_quantize

    run = RunDir(root)
    spec = PreprocessSpec(input_size=32, resize=36, mean=mean, std=std, labels=LABELS)
    run_export(run, ExportSettings(model="resnet18", num_classes=3, preprocess=spec))
    run_quantize(run, QuantizeSettings(precision="int8", calib_samples=8, calib_batch_size=8), progress=False)
    if engines:
        build_engines(run, backend="openvino", precisions=["int8"],
                      settings=BuildSettings(opt_batch=2, max_batch=4), progress=False)
    if bench:
        run_bench(run, BenchSettings(variants=("fp32",), batch_sizes=(1, 4), warmup=1, min_time=0.0, max_time=0.2,
                                     min_iters=2), progress=False)
    return run


def digit_images(root: Path, count: int = 12) -> list[Path]:
    """Real images: scikit-learn's handwritten digits as 40x40 RGB PNGs (tinted, so channels differ)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    paths = []
    for i in range(count):
        grey = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(grey).resize((40, 40), Image.Resampling.BILINEAR), np.float32)
        tint = np.array([1.0, 0.8 - 0.05 * (i % 4), 0.5 + 0.04 * i], np.float32)
        rgb = np.clip(big[..., None] * tint + 30 * (i % 3), 0, 255).astype(np.uint8)
        p = root / f"digit{i}_{digits.target[i]}.png"
        Image.fromarray(rgb).save(p)
        paths.append(p)
    return paths


@functools.lru_cache(maxsize=1)
def triton_schema():
    """Triton's ModelConfig message, straight from tritonclient's generated model_config_pb2 (protobuf only)."""
    import importlib.util

    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("test_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
