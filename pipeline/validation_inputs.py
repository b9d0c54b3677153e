"""The inputs every variant is validated on: real images, rows of an .npz/.npy, or seeded noise,
with the samples INT8 calibration used left out (by content hash), so INT8 is judged on held-out data."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file
from rexport.core.preprocess import PreprocessSpec, list_images


def make_inputs(spec: PreprocessSpec, settings,
                exclude_sha256: frozenset[str] = frozenset()) -> tuple[np.ndarray, dict]:
    """The validation inputs: real images preprocessed as the model's metadata says (a seeded subset
    drawn across the whole folder tree, so every class is represented), rows of an .npz/.npy of
    preprocessed arrays, or seeded noise shaped like a normalised image. The noise uses its own seed
    stream, so it never repeats calibration batches. Samples whose content hash is in
    ``exclude_sha256`` (the ones INT8 calibration used) are left out, so INT8 is judged on held-out data."""
    rng = np.random.default_rng([settings.seed, 0x7A11D])
    if settings.data == "synthetic":
        mean = np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)
        x = rng.standard_normal((settings.samples, *spec.input_shape), dtype=np.float32)
        x = np.clip(x, (0.0 - mean) / std, (1.0 - mean) / std).astype(np.float32)
        x = spec.on_pixel_grid(x)  # folded preprocessing: values a decoded image gives, for both paths
        return x, {"kind": "synthetic", "source": f"seeded normal noise in the normalised pixel range "
                   f"(seed {settings.seed})", "samples": settings.samples}
    root = Path(settings.data)
    if root.suffix.lower() in (".npz", ".npy") and root.is_file():
        return _array_inputs(root, spec, settings, rng, exclude_sha256)
    if not root.is_dir():
        raise InputError(f"validation data {root} is not a folder or an .npz/.npy file",
                         "pass an image folder, an .npz with x (N,3,H,W preprocessed), or 'synthetic'")
    files = list_images(root)
    held_out = 0
    if exclude_sha256:
        kept = [f for f in files if sha256_file(f) not in exclude_sha256]
        held_out, files = len(files) - len(kept), kept
        if not files:
            raise InputError(f"every image in {root} was used for INT8 calibration",
                             "validate on held-out images (--val-data / --data another folder)")
    if len(files) > settings.samples:
        files = [files[i] for i in np.sort(rng.choice(len(files), settings.samples, replace=False))]
    arrays, bad = [], []
    for f in files:
        try:
            arrays.append(spec.load_image(f))
        except Exception:  # PIL raises many types for broken files
            bad.append(f)
    if not arrays:
        raise InputError(f"no usable images in {root}", "pass a folder of jpg/png/bmp/webp images or 'synthetic'")
    if bad:
        shown = ", ".join(str(Path(b).relative_to(root)) for b in bad[:3])
        warnings.warn(f"validation skipped {len(bad)} unreadable image file(s) in {root}: {shown}"
                      f"{' ...' if len(bad) > 3 else ''}")
    return np.stack(arrays), {"kind": "images", "source": str(root), "samples": len(arrays), "unreadable": len(bad),
                              "calibration_samples_left_out": held_out}


def _array_inputs(path: Path, spec: PreprocessSpec, settings, rng,
                  exclude_sha256: frozenset[str]) -> tuple[np.ndarray, dict]:
    """Rows of ``x`` (an .npz, as evaluate takes) or of an .npy: preprocessed NCHW float32 samples."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise InputError(f"{path} has no array 'x'", "save it with np.savez(path, x=x[, y=y])")
                x = z["x"]
        else:
            x = np.load(path, allow_pickle=False)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read {path} as numpy arrays ({type(e).__name__})",
                         "pass an .npz with x (N,3,H,W) or an .npy of that shape") from None
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise InputError(f"{path}: x has shape {tuple(x.shape)}, the model takes (N, {', '.join(map(str, spec.input_shape))})",
                         "preprocess the arrays as the model's metadata says (see 'rexport export --input-size')")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError(f"{path}: x contains NaN or infinite values", "validation data must be finite")
    rows = np.arange(len(x))
    held_out = 0
    if exclude_sha256:
        keep = np.array([hashlib.sha256(r.tobytes()).hexdigest() not in exclude_sha256 for r in x], bool)
        held_out, rows = int((~keep).sum()), rows[keep]
        if not len(rows):
            raise InputError(f"every row of {path} was used for INT8 calibration", "validate on held-out data")
    if len(rows) > settings.samples:
        rows = np.sort(rng.choice(rows, settings.samples, replace=False))
    return x[rows], {"kind": "arrays", "source": str(path), "samples": int(len(rows)),
                     "calibration_samples_left_out": held_out}
