"""The preprocessing spec: stored in the ONNX metadata and the manifest, used identically by
calibration, validation, evaluation, inference and the deployment bundle."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rexport.core.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}
METADATA_KEY = "rexport.preprocess"


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side to ``resize``, centre-crop ``input_size``, scale to [0, 1],
    normalise with ``mean``/``std`` per channel, lay out as NCHW float32."""

    input_size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: str = "RGB"
    interpolation: str = "bilinear"
    labels: tuple[str, ...] | None = field(default=None)
    #: folded preprocessing: the model's graph takes uint8 NHWC pixels in ``channel_order``, at the input
    #: size, and does the scaling, mean/std and layout itself (resize and crop stay outside)
    raw_pixels: bool = False

    def __post_init__(self) -> None:
        if self.input_size < 1 or self.resize < self.input_size:
            raise InputError(f"bad preprocessing: resize {self.resize} must be >= input size {self.input_size} > 0",
                             "pass --resize >= --input-size")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise InputError("bad preprocessing: --mean and --std take three values, std > 0",
                             "e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
        if self.channel_order not in ("RGB", "BGR"):
            raise InputError(f"bad channel order {self.channel_order!r}", "use RGB or BGR")
        if self.interpolation not in _RESAMPLE:
            raise InputError(f"bad interpolation {self.interpolation!r}", f"use one of {sorted(_RESAMPLE)}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["labels"] = list(self.labels) if self.labels is not None else None
        if not self.raw_pixels:  # said only where it holds, so float-input records stay as they were
            d.pop("raw_pixels")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(float(v) for v in known[k])
        if known.get("labels") is not None:
            known["labels"] = tuple(known["labels"])
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> "PreprocessSpec":
        """Read the spec from an ONNX file's metadata_props (without loading its weights)."""
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # onnx raises DecodeError, OSError, ...
            raise InputError(f"{path} is not a readable ONNX model ({type(e).__name__})",
                             "pass an .onnx file written by 'rexport export'") from None
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                return cls.from_dict(json.loads(prop.value))
        return cls._assumed_for(model, path)

    @classmethod
    def _assumed_for(cls, model, path) -> "PreprocessSpec":
        """An ONNX file without our metadata: ImageNet normalisation at the graph's own input size, said aloud."""
        size = 224
        dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
        hw = [d.dim_value for d in dims[2:4]] if len(dims) == 4 else []
        if len(hw) == 2 and hw[0] == hw[1] and hw[0] > 0:
            size = hw[0]
        spec = cls(input_size=size, resize=max(size, round(size * 256 / 224)))
        import warnings

        warnings.warn(f"{path} carries no rexport preprocessing metadata: assuming RGB, ImageNet mean/std, "
                      f"resize {spec.resize}, crop {size}; run 'rexport import --onnx {path}' with the model's "
                      "real preprocessing to set it")
        return spec

    # -- raw pixels (folded preprocessing) ---------------------------------------------------

    def from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 NHWC pixels (in ``channel_order``) -> normalised float32 NCHW, with exactly the
        arithmetic of ``preprocess`` (so the float path and a folded graph see the same numbers)."""
        x = np.asarray(pixels, dtype=np.uint8).astype(np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """Normalised float NCHW -> uint8 NHWC pixels: the exact inverse of ``from_pixels`` for
        decoded images; other values are rounded to the nearest pixel level and clipped."""
        x = np.asarray(x, dtype=np.float64).transpose(0, 2, 3, 1)
        p = (x * np.asarray(self.std) + np.asarray(self.mean)) * 255.0
        return np.ascontiguousarray(np.clip(np.rint(p), 0, 255).astype(np.uint8))

    def model_input(self, x: np.ndarray) -> np.ndarray:
        """What the model's graph takes from a batch: raw pixels for a folded model (a uint8 batch is
        passed as it is), else float32 NCHW."""
        if not self.raw_pixels:
            return np.ascontiguousarray(x, dtype=np.float32)
        return np.ascontiguousarray(x) if x.dtype == np.uint8 else self.to_pixels(x)

    def on_pixel_grid(self, x: np.ndarray) -> np.ndarray:
        """For a folded model, ``x`` moved to the nearest values a decoded image can give, so the
        float path and the raw-pixel graph are fed the same image (seeded noise in validation)."""
        return self.from_pixels(self.to_pixels(x)) if self.raw_pixels else x

    def load_input(self, path: str | os.PathLike) -> np.ndarray:
        """One image as the model takes it: HWC uint8 pixels in ``channel_order`` for a folded
        model, else a CHW float32 array (``load_image``)."""
        if not self.raw_pixels:
            return self.load_image(path)
        with Image.open(path) as img:
            img.load()
            px = self.crop(img)
        return np.ascontiguousarray(px[..., ::-1] if self.channel_order == "BGR" else px)

    # -- images -------------------------------------------------------------------------

    def load_image(self, path: str | os.PathLike) -> np.ndarray:
        """Read one image file (any mode: L, RGBA, CMYK, 16-bit, palette) into a CHW float32 array."""
        with Image.open(path) as img:
            img.load()
            return self.preprocess(img)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        x = self.crop(img).astype(np.float32) / 255.0
        if self.channel_order == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)

    def crop(self, img: Image.Image) -> np.ndarray:
        """The resized, centre-cropped pixels before scaling: HWC uint8 RGB (what a server's own
        preprocessing, e.g. DeepStream's, starts from)."""
        img = to_rgb(img)
        w, h = img.size
        if w <= h:
            nw, nh = self.resize, max(self.resize, round(h * self.resize / w))
        else:
            nw, nh = max(self.resize, round(w * self.resize / h)), self.resize
        img = img.resize((nw, nh), _RESAMPLE[self.interpolation])
        left, top = (nw - self.input_size) // 2, (nh - self.input_size) // 2
        return np.asarray(img.crop((left, top, left + self.input_size, top + self.input_size)), dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB: 16-bit and 32-bit grey are scaled, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / peak * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(a, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        return img.convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root``, recursively, in a stable order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
