"""DeepStream: per variant a folder with ``config_infer_primary.txt`` for Gst-nvinfer as a primary
classifier (network-type=1), the model, labels in nvinfer's classifier format, and a minimal
``deepstream_app_config.txt`` with a file source.

nvinfer preprocesses with y = net-scale-factor * (x - offsets[c]) on 0..255 pixels: one scale for
all channels. Our y = (x/255 - mean[c]) / std[c] is exact when std is uniform; otherwise the
closest single scale is written and its error is measured in logits on real images.
"""
from __future__ import annotations

import configparser
import contextlib
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.pipeline.deploy.common import (DeployModel, Layout, LayoutContext, copy_file, served_name,
                                            tensor_summary, write_json)

INFER_CONFIG = "config_infer_primary.txt"
LEGACY_CONFIG = "config_infer_primary_legacy.txt"
APP_CONFIG = "deepstream_app_config.txt"
LABELS = "labels.txt"
NETWORK_MODE = {"fp32": 0, "int8": 1, "fp16": 2}
SCALING_FILTER = {"nearest": 0, "bilinear": 1, "bicubic": 2}    # NvBufSurfTransform_Inter: Nearest, Bilinear, Algo1
#: nvinfer compares the top output value with classifier-threshold; ours are logits, not probabilities,
#: so the threshold is set below any logit and the top class is attached to every frame.
LOGIT_THRESHOLD = -1e30
SAMPLE_STREAM = "file:///opt/nvidia/deepstream/deepstream/samples/streams/sample_720p.mp4"
UNIFORM_STD_RTOL = 1e-6


def scale_and_offsets(ctx: LayoutContext) -> tuple[float, list[float], bool]:
    """(net-scale-factor, offsets, exact): offsets are 255*mean in the model's channel order; the scale
    is 1/(255*std) when std is uniform, else the least-squares single scale mean_c(1/(255*std_c))."""
    if ctx.folded:
        return 1.0, [0.0, 0.0, 0.0], True
    std = np.asarray(ctx.spec.std, np.float64)
    exact = bool(np.allclose(std, std[0], rtol=UNIFORM_STD_RTOL, atol=0))
    scale = float(1.0 / (255.0 * std[0])) if exact else float(np.mean(1.0 / (255.0 * std)))
    return scale, [255.0 * float(m) for m in ctx.spec.mean], exact


def nvinfer_input(pixels_hwc_rgb: np.ndarray, scale: float, offsets: list[float], color_format: int,
                  nhwc: bool = False) -> np.ndarray:
    """What nvinfer hands TensorRT for RGB uint8 pixels: y = scale * (x - offsets[c]), planar float32."""
    x = pixels_hwc_rgb[..., ::-1] if color_format == 1 else pixels_hwc_rgb
    y = np.float32(scale) * (x.astype(np.float32) - np.asarray(offsets, np.float32))
    return np.ascontiguousarray(y if nhwc else y.transpose(2, 0, 1), dtype=np.float32)


def _fmt(v: float) -> str:
    return repr(float(v))


def infer_config(m: DeployModel, ctx: LayoutContext, *, legacy_cache: str | None = None) -> dict[str, str]:
    """The [property] keys of config_infer_primary.txt (legacy: fp32 ONNX + our calibration cache, INT8)."""
    scale, offsets, _ = scale_and_offsets(ctx)
    inp = m.inputs[0]
    nhwc = len(inp.shape) == 4 and inp.shape[-1] == 3 and inp.shape[1] != 3
    chw = (inp.shape[3], inp.shape[1], inp.shape[2]) if nhwc else tuple(inp.shape[1:])
    # one file source: batch 1, unless the model's batch is fixed or the engine's profile starts higher
    profile_min = int(((m.sidecar or {}).get("profile") or {}).get("min", [1])[0])
    batch = max(1, profile_min) if m.batching.max_batch > 0 else max(1, inp.shape[0])
    keys = {"gpu-id": "0", "net-scale-factor": _fmt(scale), "offsets": ";".join(_fmt(o) for o in offsets),
            "model-color-format": "1" if ctx.spec.channel_order == "BGR" else "0"}
    if legacy_cache:
        keys.update({"onnx-file": "model.fp32.onnx", "int8-calib-file": legacy_cache})
    elif m.kind == "tensorrt":
        keys["model-engine-file"] = "model.plan"
    else:
        keys["onnx-file"] = "model.onnx"
    keys.update({
        "labelfile-path": LABELS, "batch-size": str(batch),
        "network-mode": str(1 if legacy_cache else NETWORK_MODE.get(m.precision, 0)),
        "network-type": "1", "process-mode": "1", "gie-unique-id": "1",
        "infer-dims": ";".join(str(d) for d in chw), "output-blob-names": m.outputs[0].name,
        "classifier-threshold": _fmt(LOGIT_THRESHOLD), "maintain-aspect-ratio": "0",
        "scaling-filter": str(SCALING_FILTER[ctx.spec.interpolation]),
    })
    if nhwc:
        keys["network-input-order"] = "1"
    return keys


def app_config(infer_file: str = INFER_CONFIG) -> dict[str, dict[str, str]]:
    """A minimal deepstream-app config: one file source, nvinfer with our config, a fakesink."""
    return {
        "application": {"enable-perf-measurement": "1", "perf-measurement-interval-sec": "5"},
        "source0": {"enable": "1", "type": "3", "uri": SAMPLE_STREAM, "num-sources": "1", "gpu-id": "0"},
        "streammux": {"gpu-id": "0", "batch-size": "1", "batched-push-timeout": "40000", "width": "1280",
                      "height": "720", "live-source": "0"},
        "primary-gie": {"enable": "1", "gpu-id": "0", "batch-size": "1", "gie-unique-id": "1",
                        "config-file": infer_file},
        "sink0": {"enable": "1", "type": "1", "sync": "0"},
        "osd": {"enable": "0"},
        "tests": {"file-loop": "0"},
    }


def _ini(sections: dict[str, dict[str, str]], header: str) -> str:
    out = [f"# {line}" for line in header.splitlines()]
    for name, keys in sections.items():
        out += ["", f"[{name}]"] + [f"{k}={v}" for k, v in keys.items()]
    return "\n".join(out) + "\n"


def write(root: Path, models: list[DeployModel], ctx: LayoutContext, *, calibration_cache: Path | None = None,
          fp32_onnx: Path | None = None) -> Layout:
    for label in ctx.labels:
        if ";" in label or "\n" in label:
            raise InputError(f"label {label!r} contains ';' or a newline, which nvinfer's label file cannot hold",
                             "rename the class (export --labels)")
    layout = Layout()
    scale, offsets, exact = scale_and_offsets(ctx)
    error = None if exact else measure_scale_error(ctx, scale, offsets)
    for m in models:
        folder = root / served_name(ctx, m.variant)
        for dst, src in m.files.items():
            copy_file(src, folder / dst)
        (folder / LABELS).write_text(";".join(ctx.labels) + "\n", encoding="utf-8")
        header = f"Gst-nvinfer config for {ctx.name} {m.variant} ({m.kind}), written by rexport."
        (folder / INFER_CONFIG).write_text(_ini({"property": infer_config(m, ctx)}, header), encoding="utf-8")
        (folder / APP_CONFIG).write_text(_ini(app_config(), "deepstream-app -c " + APP_CONFIG), encoding="utf-8")
        entry = {"kind": m.kind, "path": folder.name, "config": f"{folder.name}/{INFER_CONFIG}",
                 "app_config": f"{folder.name}/{APP_CONFIG}", "precision": m.precision}
        if m.precision == "int8" and m.kind == "onnx" and calibration_cache and fp32_onnx:
            copy_file(fp32_onnx, folder / "model.fp32.onnx")
            copy_file(calibration_cache, folder / calibration_cache.name)
            legacy = infer_config(m, ctx, legacy_cache=calibration_cache.name)
            (folder / LEGACY_CONFIG).write_text(_ini({"property": legacy}, header + "\nTensorRT 8.x (JetPack 5.1/6.0): "
                                                     "FP32 ONNX + INT8 calibration cache."), encoding="utf-8")
            entry["legacy_config"] = f"{folder.name}/{LEGACY_CONFIG}"
        if m.kind == "tensorrt":
            entry["tensorrt"] = ((m.sidecar or {}).get("runtime") or {}).get("tensorrt")
            write_json(folder / "sidecar.json", m.sidecar)
        layout.contents[m.variant] = entry
    if error is not None:
        layout.warnings.append(
            f"deepstream: std {list(ctx.spec.std)} differs per channel and nvinfer has one scale: net-scale-factor "
            f"{scale:.6g} is off by up to {error['max_abs_logit_error']:.3g} in logits (max |logit| "
            f"{error['max_abs_logit']:.3g}; top-1 agrees on {error['top1_agreement']:.1%} of {error['images']} "
            f"{error['source']}); export with --fold-preprocessing for an exact config")
        for entry in layout.contents.values():
            entry["preprocessing_error"] = error
    for m in models:
        if not m.inputs[0].dtype.startswith("float"):
            layout.warnings.append(f"deepstream {m.variant}: the model's input is {m.inputs[0].dtype} (folded "
                                   "preprocessing); nvinfer prepares float tensors, so check that your DeepStream "
                                   "and TensorRT accept this input type")
    layout.readme = _readme(models, ctx, layout, scale, offsets, exact)
    return layout


def _readme(models, ctx: LayoutContext, layout: Layout, scale: float, offsets: list[float], exact: bool) -> list[str]:
    lines = ["DeepStream (Gst-nvinfer primary classifier)", "",
             "Run the sample pipeline on one model (edit uri= in the app config for your own file):", ""]
    for m in models:
        e = layout.contents[m.variant]
        lines.append(f"  cd {e['path']} && deepstream-app -c {APP_CONFIG}    # {m.variant}: {m.kind}")
        if e.get("legacy_config"):
            lines.append(f"      TensorRT 8.x: use {LEGACY_CONFIG} (FP32 ONNX + INT8 calibration cache) as config-file")
        if e.get("tensorrt"):
            lines.append(f"      model.plan needs TensorRT {e['tensorrt']} on the GPU it was built for; else nvinfer "
                         "cannot deserialize it (rebuild on the device)")
        lines += [f"      input {tensor_summary(t)}" for t in m.inputs]
    lines += ["", f"Preprocessing: net-scale-factor {scale:.9g}, offsets {[round(o, 6) for o in offsets]} "
              f"({'exact' if exact else 'closest single scale'}); nvinfer scales the whole frame to the input "
              "size (no centre crop): crop upstream to match our resize-and-crop preprocessing.",
              "The model outputs logits: classifier-threshold is compared with the top logit "
              f"({LOGIT_THRESHOLD:g} attaches the top class to every frame)."]
    lines += [f"warning: {w}" for w in layout.warnings]
    return lines


# -- how far one scale is from per-channel std, measured --------------------------------------

def measure_scale_error(ctx: LayoutContext, scale: float, offsets: list[float]) -> dict:
    """Logits of the FP32 ONNX on real images, preprocessed exactly vs as nvinfer would with (scale, offsets)."""
    from PIL import Image

    from rexport.pipeline.manifest import VARIANT_FILES
    from rexport.pipeline.runners import OnnxRuntimeRunner

    images, source = (list(ctx.check_images), "images") if ctx.check_images else (generated_photos(ctx), "generated photos")
    exact, approx = [], []
    color = 1 if ctx.spec.channel_order == "BGR" else 0
    for item in images:
        with (Image.open(item) if isinstance(item, (str, Path)) else contextlib.nullcontext(item)) as img:
            img.load()
            exact.append(ctx.spec.preprocess(img))
            approx.append(nvinfer_input(ctx.spec.crop(img), scale, offsets, color))
    with OnnxRuntimeRunner(ctx.run.file(VARIANT_FILES["fp32"])) as runner:
        ref, got = runner.infer(np.stack(exact)), runner.infer(np.stack(approx))
    return {"images": len(images), "source": source if source != "images" else f"images from {Path(images[0]).parent}",
            "max_abs_logit_error": float(np.max(np.abs(ref - got))),
            "mean_abs_logit_error": float(np.mean(np.abs(ref - got))),
            "max_abs_logit": float(np.max(np.abs(ref))),
            "top1_agreement": float(np.mean(np.argmax(ref, 1) == np.argmax(got, 1)))}


def generated_photos(ctx: LayoutContext, count: int = 16, seed: int = 0) -> list:
    """Photo-like RGB images (smooth colour gradients, blurred shapes, sensor noise), seeded."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    size = max(ctx.spec.resize + ctx.spec.resize // 4, 32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(0, 255, (3, 3))
        base = np.stack([a[i] * (1 - xx) + b[i] * yy + c[i] * xx * (1 - yy) for i in range(3)], -1) / 2
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, size, 2)
            r = int(rng.integers(size // 8, size // 3))
            draw.ellipse([int(x0) - r, int(y0) - r, int(x0) + r, int(y0) + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img = img.filter(ImageFilter.GaussianBlur(radius=size / 40))
        noisy = np.asarray(img, np.float32) + rng.normal(0, 4, (size, size, 3))
        out.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return out


# -- loading a model the way nvinfer does ------------------------------------------------------

def read_infer_config(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        parser.read_string(path.read_text(encoding="utf-8"))
    except (OSError, configparser.Error) as e:
        raise InputError(f"{path} is not a readable nvinfer config ({type(e).__name__})", "bundle again") from None
    if "property" not in parser:
        raise InputError(f"{path} has no [property] group", "bundle again")
    return dict(parser["property"])


def served_models(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if (d / INFER_CONFIG).is_file())


def open_served(root: Path, name: str, spec=None, folded: bool = False):
    """``name`` as nvinfer would load it: the model file the config
    names (ONNX Runtime stands in for TensorRT on an ONNX here) and nvinfer's own preprocessing."""
    from PIL import Image

    from rexport.pipeline.deploy.serving import Served, ServedTensor, open_onnx, open_plan

    folder = root / name
    keys = read_infer_config(folder / INFER_CONFIG)
    c, h, w = (int(d) for d in keys["infer-dims"].split(";"))      # always channel;height;width
    nhwc = keys.get("network-input-order") == "1"
    # nvinfer names no input and fixes no dtype here: the engine's own (float unless folded)
    declared = ServedTensor("", (-1, h, w, c) if nhwc else (-1, c, h, w), "")
    outputs = [(keys["output-blob-names"].split(";")[0], None)]
    model_file = keys.get("model-engine-file") or keys.get("onnx-file")
    if not model_file or not (folder / model_file).is_file():
        raise InputError(f"{folder / (model_file or '?')} not found (named by {folder / INFER_CONFIG})", "bundle again")
    if model_file.endswith(".onnx"):
        runner = open_onnx(folder / model_file, declared, outputs)
    else:
        runner = open_plan(folder / model_file, declared, outputs)
    scale = float(keys["net-scale-factor"])
    offsets = [float(o) for o in keys.get("offsets", "0;0;0").split(";")]
    color = int(keys.get("model-color-format", "0"))
    resample = {v: k for k, v in SCALING_FILTER.items()}.get(int(keys.get("scaling-filter", "0")), "nearest")

    def prepare(image) -> np.ndarray:
        from rexport.core.preprocess import _RESAMPLE, to_rgb

        with Image.open(image) as img:
            img.load()
            frame = np.asarray(to_rgb(img).resize((w, h), _RESAMPLE[resample]), dtype=np.uint8)
        return nvinfer_input(frame, scale, offsets, color, nhwc)

    labels_file = folder / keys.get("labelfile-path", LABELS)
    labels = tuple(labels_file.read_text(encoding="utf-8").strip().split(";")) if labels_file.is_file() else ()
    note = "nvinfer's preprocessing (whole frame scaled to the input size)" + (
        "; ONNX Runtime stands in for the TensorRT engine nvinfer builds from onnx-file" if model_file.endswith(".onnx") else "")
    return Served(runner, declared, prepare, labels, note, folder / model_file)
