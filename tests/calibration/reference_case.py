"""The fixed inputs of the reference-ranges fixture (data/reference_ranges.json)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

METHODS = ("minmax", "percentile", "entropy")
PERCENTILE = 99.99
NUM_BINS = 2048
SAMPLES = 32


def export_model(path: Path, seed: int = 0) -> Path:
    """ResNet-18, 10 classes, seeded weights, 64x64 input."""
    import torch

    from rexport.models.resnet import resnet18

    torch.manual_seed(seed)
    model = resnet18(num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def synthetic_batches():
    """(name, batch) in fold order: seeded numpy draws (the same on every machine) whose range grows
    from batch to batch, so the histograms are widened and re-binned, with exact zeros, a
    ReLU-like tensor, heavy tails and an all-zero tensor."""
    rng = np.random.default_rng(1234)
    for step in range(6):
        grow = 1.0 + 0.7 * step
        relu = np.maximum(rng.standard_normal((4, 16, 9, 9), dtype=np.float32) * grow, 0)
        yield "relu", relu
        yield "normal", rng.standard_normal((4, 8, 7, 7), dtype=np.float32) * np.float32(grow)
        heavy = rng.standard_t(2.0, (4, 8, 7, 7)).astype(np.float32)
        heavy[0, 0, 0, : step + 1] = 40.0 * grow  # a few outliers
        yield "heavy", heavy
        yield "zeros", np.zeros((4, 3, 5, 5), np.float32)
        yield "shifted", (rng.uniform(0.5, 2.0, (4, 32)) * (1 + step % 3)).astype(np.float32)


def synthetic_statistics():
    from rexport.calibration.statistics import ActivationStatistics, AbsHistogram, TensorStatistics

    stats = ActivationStatistics()
    for name in ("relu", "normal", "heavy", "zeros", "shifted"):
        stats.tensors[name] = TensorStatistics(histogram=AbsHistogram.empty(NUM_BINS))
    for name, x in synthetic_batches():
        stats.update(name, float(x.min()), float(x.max()), x, owned=False)
    stats.samples = 24
    return stats
