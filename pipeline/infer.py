"""``rexport infer``: run an artifact (.onnx, .plan, an OpenVINO .xml or an engine folder) on image
files with the model's own preprocessing, and give the top-k classes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.runners import OnnxRuntimeRunner, Runner


def open_artifact(path: str | os.PathLike) -> tuple[Runner, PreprocessSpec]:
    """A runner and the preprocessing for an ONNX file or an engine (folder, .plan or .xml)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} not found", "pass an .onnx file, an engine folder, a model.plan or a model.xml")
    if p.is_file() and p.suffix == ".onnx":
        return OnnxRuntimeRunner(p), PreprocessSpec.from_onnx(p)
    engine_dir = p if p.is_dir() else p.parent
    if not (engine_dir / "sidecar.json").exists():
        raise InputError(f"{p} has no sidecar.json beside it",
                         "pass an engine folder made by 'rexport build' or an .onnx file")
    from rexport.pipeline.backends.sidecar import load_engine, read_sidecar

    sidecar = read_sidecar(engine_dir)
    return load_engine(engine_dir), PreprocessSpec.from_dict(sidecar.get("preprocess") or {})


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def random_init(path: str | os.PathLike) -> bool:
    """Whether an ONNX file written by rexport came from a seeded random init (no --weights)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return props.get("rexport.weights_sha256", "").startswith("random-init")


def infer_images(artifact: str | os.PathLike, images: list[str], *, topk: int = 5) -> list[dict]:
    if not images:
        raise InputError("no images given", "pass one or more image files after the artifact")
    runner, spec = open_artifact(artifact)
    batch = []
    for img in images:
        try:
            batch.append(spec.load_image(img))
        except FileNotFoundError:
            raise InputError(f"image {img} not found", "pass existing image files") from None
        except Exception as e:  # PIL's UnidentifiedImageError, OSError on truncated files...
            raise InputError(f"cannot read image {img} ({type(e).__name__})",
                             "pass jpg/png/bmp/webp image files") from None
    with runner:
        logits = runner.infer(np.stack(batch))
    probs = softmax(logits.astype(np.float64))
    k = max(1, min(topk, probs.shape[1]))
    results = []
    untrained = Path(artifact).suffix == ".onnx" and random_init(artifact)
    for img, p in zip(images, probs):
        order = np.argsort(-p)[:k]
        results.append({"image": str(img), "random_weights": untrained, "top": [
            {"class": int(i), "label": spec.labels[i] if spec.labels and i < len(spec.labels) else None,
             "probability": float(p[i])} for i in order]})
    return results
