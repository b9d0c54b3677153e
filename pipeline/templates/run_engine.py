#!/usr/bin/env python3
"""Classify images with a model from this bundle: an ONNX file (ONNX Runtime), an OpenVINO engine
folder or a TensorRT engine folder / .plan file.

    python run_engine.py MODEL_PATH IMAGE... [--topk 5] [--json]

Needs only numpy, pillow and the runtime of the model you pass (onnxruntime, openvino, or tensorrt
with polygraphy's CUDA wrapper through trt_engine/ beside this file; imported when needed); it does
not need rexport or torch. Images are preprocessed
exactly as rexport does (rexport/core/preprocess.py) using preprocess.json: shorter side resized
with PIL, centre crop, /255, mean/std per channel, NCHW float32; any image mode (16-bit grey,
palette, CMYK, RGBA...) is converted to 8-bit RGB first.

Written by 'rexport bundle'; keep in step with rexport/core/preprocess.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
_RESAMPLING = getattr(Image, "Resampling", Image)      # Pillow < 9.1 (JetPack 5's apt pillow) has no enum
_RESAMPLE = {"bilinear": _RESAMPLING.BILINEAR, "bicubic": _RESAMPLING.BICUBIC, "nearest": _RESAMPLING.NEAREST}


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


# -- preprocessing (same arithmetic as rexport.core.preprocess) -------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit and 32-bit grey are scaled, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / peak * 255.0, 0, 255).astype(np.uint8))     # 2-D uint8 -> mode L
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        return img.convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def preprocess(img: Image.Image, spec: dict) -> np.ndarray:
    """One image as a CHW float32 array (HWC uint8 pixels for a folded-preprocessing engine)."""
    size, resize = int(spec["input_size"]), int(spec["resize"])
    img = to_rgb(img)
    w, h = img.size
    if w <= h:
        nw, nh = resize, max(resize, round(h * resize / w))
    else:
        nw, nh = max(resize, round(w * resize / h)), resize
    img = img.resize((nw, nh), _RESAMPLE[spec.get("interpolation", "bilinear")])
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    if spec.get("raw_pixels"):  # folded preprocessing: the engine takes the HWC uint8 pixels themselves
        px = np.asarray(img, dtype=np.uint8)
        return np.ascontiguousarray(px[..., ::-1] if spec.get("channel_order", "RGB") == "BGR" else px)
    x = np.asarray(img, dtype=np.float32) / 255.0
    if spec.get("channel_order", "RGB") == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_image(path: str, spec: dict) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return preprocess(img, spec)
    except (OSError, ValueError, SyntaxError) as e:   # PIL: UnidentifiedImageError is an OSError
        raise UsageError(f"cannot read image {path}: {e}") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


# -- runtimes -------------------------------------------------------------------------------------


class OnnxRuntimeModel:
    def __init__(self, path: Path, load_settings: dict) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("onnxruntime is not installed: pip install onnxruntime") from None
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        providers = load_settings.get("providers") or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.input = self.session.get_inputs()[0].name
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.description = f"onnxruntime {ort.__version__} ({', '.join(self.session.get_providers())})"
        self.min_batch = 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: x})[0], dtype=np.float32)


class OpenVINOModel:
    def __init__(self, xml: Path, load_settings: dict) -> None:
        try:
            import openvino as ov
            core = ov.Core()
        except (ImportError, AttributeError):
            try:
                from openvino.runtime import Core    # OpenVINO 2022.x/2023.x
                core = Core()
            except ImportError:
                raise UsageError("openvino is not installed: pip install openvino") from None
        # The engine's recorded load-time settings (e.g. INFERENCE_PRECISION_HINT) decide its numerics.
        config = {k: v for k, v in load_settings.items() if k.isupper()}
        device = load_settings.get("device", "CPU")
        self.compiled = core.compile_model(core.read_model(str(xml)), device, config)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        self.description = f"openvino on {device} {config}" if config else f"openvino on {device}"
        self.min_batch = 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: x})[self.output], dtype=np.float32)


class TensorRTModel:
    """A TensorRT plan through trt_engine.EngineRunner (beside this file: the same package rexport uses)."""

    def __init__(self, plan: Path, sidecar: dict | None) -> None:
        sys.path.insert(0, str(HERE))
        try:
            import trt_engine
        except ImportError:     # run from rexport's source tree instead of a bundle
            from rexport.pipeline.backends import trt_engine
        try:
            version = trt_engine.tensorrt_version()
            if sidecar:
                device = trt_engine.cuda_device()
                here = {"tensorrt": version, "gpu": device["name"],
                        "compute_capability": device["compute_capability"]}
                problems = trt_engine.compat_problems(sidecar, here)
                if problems:
                    raise UsageError("; ".join(problems))
            graphs = bool(((sidecar or {}).get("load_settings") or {}).get("cuda_graphs"))
            self.runner = trt_engine.EngineRunner(plan.read_bytes(), cuda_graphs=graphs).__enter__()
        except trt_engine.TrtError as e:
            raise UsageError(f"{e}" + (f" ({e.hint})" if e.hint else "")) from None
        self.min_batch = self.runner.min_batch
        self.description = f"tensorrt {version}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.runner.infer(x)


# -- model discovery ------------------------------------------------------------------------------


def open_model(model_path: str):
    """(model, sidecar or None) for an .onnx file, an engine folder, a .plan/.engine or an .xml file."""
    p = Path(model_path)
    if not p.exists():
        raise UsageError(f"{p} not found")
    sidecar = None
    folder = p if p.is_dir() else p.parent
    if (folder / "sidecar.json").is_file():
        sidecar = json.loads((folder / "sidecar.json").read_text(encoding="utf-8"))
    load_settings = (sidecar or {}).get("load_settings") or {}
    if p.is_dir():
        if sidecar is None:
            raise UsageError(f"{p} has no sidecar.json: pass an engine folder from the bundle or a model file")
        backend = sidecar.get("backend")
        files = list((sidecar.get("engine_files") or {}).keys())
        if backend == "openvino":
            xml = next((f for f in files if f.endswith(".xml")), "model.xml")
            return OpenVINOModel(p / xml, load_settings), sidecar
        if backend == "tensorrt":
            plan = next((f for f in files if f.endswith((".plan", ".engine"))), "model.plan")
            return TensorRTModel(p / plan, sidecar), sidecar
        raise UsageError(f"{p}: unknown backend {backend!r} in sidecar.json")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return OnnxRuntimeModel(p, {}), None
    if suffix == ".xml":
        return OpenVINOModel(p, load_settings), sidecar
    if suffix in (".plan", ".engine", ".trt"):
        return TensorRTModel(p, sidecar), sidecar
    raise UsageError(f"{p}: pass an .onnx file, an engine folder, a .plan or an OpenVINO .xml")


def find_preprocess(explicit: str | None, sidecar: dict | None, model) -> dict:
    if explicit:
        return json.loads(Path(explicit).read_text(encoding="utf-8"))
    if sidecar and sidecar.get("preprocess"):
        return sidecar["preprocess"]
    if (HERE / "preprocess.json").is_file():
        return json.loads((HERE / "preprocess.json").read_text(encoding="utf-8"))
    meta = getattr(model, "metadata", None) or {}
    if "rexport.preprocess" in meta:
        return json.loads(meta["rexport.preprocess"])
    raise UsageError("no preprocess.json beside run_engine.py and none in the model; pass --preprocess FILE")


def find_labels(explicit: str | None, spec: dict) -> list[str] | None:
    path = Path(explicit) if explicit else HERE / "labels.txt"
    if path.is_file():
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    return list(spec["labels"]) if spec.get("labels") else None


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images with a model from a rexport bundle.")
    ap.add_argument("model", help="an .onnx file, an engine folder (engines/<backend>-<precision>), a .plan or .xml")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--topk", type=int, default=5, help="how many classes to print (default 5)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    ap.add_argument("--preprocess", help="preprocess.json to use (default: the model's, then the bundle's)")
    ap.add_argument("--labels", help="labels.txt, one class name per line (default: the bundle's)")
    args = ap.parse_args(argv)
    try:
        if args.topk < 1:
            raise UsageError("--topk must be at least 1")
        model, sidecar = open_model(args.model)
        spec = find_preprocess(args.preprocess, sidecar, model)
        labels = find_labels(args.labels, spec)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    results, failed = [], 0
    for image in args.images:
        try:
            x = load_image(image, spec)[None]
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        batch = np.repeat(x, model.min_batch, axis=0) if model.min_batch > 1 else x
        logits = model(batch)[0].reshape(-1)
        probs = softmax(logits)
        order = np.argsort(-probs, kind="stable")[: args.topk]
        top = [{"index": int(i), "label": labels[i] if labels and i < len(labels) else f"class {int(i)}",
                "probability": float(probs[i]), "logit": float(logits[i])} for i in order]
        results.append({"image": image, "top": top})

    if args.json:
        print(json.dumps({"model": args.model, "runtime": model.description, "results": results}, indent=2))
    else:
        for r in results:
            print(r["image"])
            for rank, t in enumerate(r["top"], 1):
                print(f"  {rank}. {t['label']:<24} {t['probability']:.4f}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
