"""``rexport infer``: run an artifact (.onnx, .plan, an OpenVINO .xml or an engine folder) on image
files with the model's own preprocessing, and give the top-k classes.

Given a bundle folder (``rexport bundle``), it loads a model the way that layout's server would:
from the files its config names, with the config's I/O checked against the model (a smoke test)."""
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


def has_random_weights(path: str | os.PathLike) -> bool:
    """Whether an ONNX file written by rexport came from a seeded random init (no --weights)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return props.get("rexport.weights_sha256", "").startswith("random-init")


def _read_images(images: list[str], load) -> np.ndarray:
    batch = []
    for img in images:
        try:
            batch.append(load(img))
        except FileNotFoundError:
            raise InputError(f"image {img} not found", "pass existing image files") from None
        except Exception as e:  # PIL's UnidentifiedImageError, OSError on truncated files...
            raise InputError(f"cannot read image {img} ({type(e).__name__})",
                             "pass jpg/png/bmp/webp image files") from None
    return np.stack(batch)


def infer_images(artifact: str | os.PathLike, images: list[str], *, topk: int = 5,
                 model: str | None = None) -> list[dict]:
    """Top-k classes per image. ``model`` picks one served model in a bundle folder (default: its only
    or first one)."""
    if not images:
        raise InputError("no images given", "pass one or more image files after the artifact")
    from rexport.pipeline.deploy import detect_format

    if Path(artifact).is_dir() and detect_format(Path(artifact)) is not None:
        from rexport.pipeline.deploy.loading import open_bundle_model

        served, spec_labels, served_name, served_file = open_bundle_model(Path(artifact), model)
        x = _read_images(images, served.prepare)
        with served.runner:
            logits = served.runner.infer(x)
        untrained = served_file is not None and served_file.suffix == ".onnx" and has_random_weights(served_file)
        extra = {"model": served_name, "served": served.note}
        return _top(images, logits, served.labels or spec_labels, topk, untrained, extra)
    if model is not None:
        raise InputError("--model picks a model in a bundle folder", f"{artifact} is not one: drop --model")
    runner, spec = open_artifact(artifact)
    x = _read_images(images, spec.load_input)   # raw uint8 pixels for a folded-preprocessing model
    with runner:
        logits = runner.infer(x)
    untrained = Path(artifact).suffix == ".onnx" and has_random_weights(artifact)
    return _top(images, logits, spec.labels, topk, untrained, {})


def _top(images: list[str], logits: np.ndarray, labels, topk: int, untrained: bool, extra: dict) -> list[dict]:
    probs = softmax(logits.astype(np.float64))
    k = max(1, min(topk, probs.shape[1]))
    results = []
    for img, p in zip(images, probs):
        order = np.argsort(-p)[:k]
        results.append({"image": str(img), "random_weights": untrained, **extra, "top": [
            {"class": int(i), "label": labels[i] if labels and i < len(labels) else None,
             "probability": float(p[i])} for i in order]})
    return results
