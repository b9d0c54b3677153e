"""Calibration readers on real files: image folders in every mode, .npy/.npz arrays, synthetic data."""
from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rexport.calibration import (ArrayReader, CalibrationReader, ImageFolderReader, SyntheticReader,
                                 image_fingerprints, open_reader)
from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec

SPEC = PreprocessSpec(input_size=32, resize=36)


def _rgb(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _drain(reader: CalibrationReader) -> list[np.ndarray]:
    batches = []
    while (feed := reader.get_next()) is not None:
        batches.append(feed[reader.input_name])
    return batches


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    """Eight readable images in five formats and six modes, one unreadable file, one non-image."""
    root = tmp_path / "calib"
    (root / "sub").mkdir(parents=True)
    _rgb(0).save(root / "a.jpg")
    _rgb(1).save(root / "b.png")
    _rgb(2).save(root / "c.bmp")
    _rgb(3).save(root / "sub" / "d.webp")
    _rgb(4).convert("L").save(root / "e_gray.png")
    rgba = _rgb(5).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "f_rgba.png")
    deep = (np.random.default_rng(6).integers(0, 65536, (40, 48))).astype(np.uint16)
    Image.fromarray(deep).save(root / "g_16bit.png")
    assert Image.open(root / "g_16bit.png").mode == "I;16"
    _rgb(7).convert("CMYK").save(root / "h_cmyk.jpg")
    assert Image.open(root / "h_cmyk.jpg").mode == "CMYK"
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_reads_every_mode_and_counts_unreadable(mixed_folder: Path) -> None:
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\).*broken\.jpg"):
        reader = open_reader(mixed_folder, SPEC, samples=100, batch_size=3)
    assert isinstance(reader, ImageFolderReader) and isinstance(reader, CalibrationReader)
    assert len(reader) == 8
    assert not reader.synthetic
    assert "8 images" in reader.description and "1 unreadable skipped" in reader.description
    batches = _drain(reader)
    assert [b.shape for b in batches] == [(3, 3, 32, 32), (3, 3, 32, 32), (2, 3, 32, 32)]
    assert all(b.dtype == np.float32 and np.isfinite(b).all() for b in batches)
    # every image is distinct after preprocessing (16-bit and CMYK were really decoded)
    flat = np.concatenate(batches).reshape(8, -1)
    assert len({row.tobytes() for row in flat}) == 8
    reader.rewind()
    assert all(np.array_equal(a, b) for a, b in zip(batches, _drain(reader)))


def test_image_folder_fingerprint_follows_content(mixed_folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = open_reader(mixed_folder, SPEC).fingerprint()
        assert open_reader(mixed_folder, SPEC).fingerprint() == first
        _rgb(99).save(mixed_folder / "b.png")
        assert open_reader(mixed_folder, SPEC).fingerprint() != first
        other_spec = PreprocessSpec(input_size=32, resize=40)
        assert open_reader(mixed_folder, other_spec).fingerprint() != open_reader(mixed_folder, SPEC).fingerprint()


def test_image_folder_seeded_subset(tmp_path: Path) -> None:
    for i in range(12):
        _rgb(i).save(tmp_path / f"img{i:02d}.png")
    a = open_reader(tmp_path, SPEC, samples=4, seed=0)
    b = open_reader(tmp_path, SPEC, samples=4, seed=0)
    assert len(a) == 4 and a.files == b.files and a.fingerprint() == b.fingerprint()
    assert a.files == sorted(a.files)
    assert "seeded subset (seed 0) of 12" in a.description
    others = [open_reader(tmp_path, SPEC, samples=4, seed=s) for s in range(1, 6)]
    assert any(o.files != a.files for o in others)
    assert all(o.fingerprint() != a.fingerprint() for o in others if o.files != a.files)
    everything = open_reader(tmp_path, SPEC, samples=50, seed=3)
    assert len(everything) == 12 and "all" in everything.description


def test_folder_without_usable_images_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "readme.txt").write_text("hello")
    (tmp_path / "only_text" / "data.csv").write_text("1,2")
    with pytest.raises(InputError, match="no images in"):
        open_reader(tmp_path / "only_text", SPEC)
    (tmp_path / "only_broken").mkdir()
    (tmp_path / "only_broken" / "x.png").write_bytes(b"garbage")
    (tmp_path / "only_broken" / "y.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="no usable images") as err:
        open_reader(tmp_path / "only_broken", SPEC)
    assert "all 2 image files are unreadable" in str(err.value)
    assert err.value.exit_code == 2 and err.value.hint


def test_empty_or_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images in"):
        open_reader(tmp_path / "empty", SPEC)
    with pytest.raises(InputError, match="does not exist") as err:
        open_reader(tmp_path / "missing", SPEC)
    assert "image folder, a .npy/.npz file or 'synthetic'" in err.value.hint
    with pytest.raises(InputError, match="does not exist"):
        open_reader(tmp_path / "missing.npz", SPEC)
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder, .npy or .npz") as err:
        open_reader(tmp_path / "model.onnx", SPEC)
    assert "'synthetic'" in str(err.value)


def test_npz_and_npy_arrays(tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=data, labels=np.arange(10))
    np.savez_compressed(tmp_path / "only.npz", whatever=data.astype(np.float64))
    np.save(tmp_path / "x.npy", data)
    np.save(tmp_path / "one.npy", data[0])
    for name in ("x.npz", "only.npz", "x.npy"):
        reader = open_reader(tmp_path / name, SPEC, samples=7, batch_size=4)
        assert isinstance(reader, ArrayReader) and len(reader) == 7
        batches = _drain(reader)
        assert [b.shape[0] for b in batches] == [4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), data[:7])
        reader.rewind()
        np.testing.assert_array_equal(np.concatenate(_drain(reader)), data[:7])
    fps = {open_reader(tmp_path / n, SPEC, samples=7).fingerprint() for n in ("x.npz", "only.npz", "x.npy")}
    assert len(fps) == 1  # same float32 rows, same fingerprint, whatever the container
    assert open_reader(tmp_path / "x.npy", SPEC, samples=8).fingerprint() not in fps
    single = open_reader(tmp_path / "one.npy", SPEC)
    assert len(single) == 1
    np.testing.assert_array_equal(_drain(single)[0], data[:1])


def test_array_with_wrong_shape_names_both_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "small.npy", np.zeros((5, 3, 16, 16), np.float32))
    with pytest.raises(InputError) as err:
        open_reader(tmp_path / "small.npy", SPEC)
    assert "(5, 3, 16, 16)" in str(err.value) and "(N, 3, 32, 32)" in str(err.value)
    np.savez(tmp_path / "nhwc.npz", x=np.zeros((5, 32, 32, 3), np.float32))
    with pytest.raises(InputError, match=r"\(5, 32, 32, 3\)"):
        open_reader(tmp_path / "nhwc.npz", SPEC)
    np.save(tmp_path / "ints.npy", np.zeros((5, 3, 32, 32), np.uint8))
    with pytest.raises(InputError, match="uint8"):
        open_reader(tmp_path / "ints.npy", SPEC)
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 3, 32, 32)), b=np.zeros((1, 3, 32, 32)))
    with pytest.raises(InputError, match="none is named 'x'"):
        open_reader(tmp_path / "two.npz", SPEC)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="cannot read"):
        open_reader(tmp_path / "junk.npz", SPEC)


def test_array_with_nan_is_refused(tmp_path: Path) -> None:
    data = np.zeros((4, 3, 32, 32), np.float32)
    data[2, 1, 5, 5] = np.nan
    np.save(tmp_path / "nan.npy", data)
    reader = open_reader(tmp_path / "nan.npy", SPEC, batch_size=2)
    reader.get_next()
    with pytest.raises(InputError, match="sample 2 contains NaN"):
        reader.get_next()


def test_synthetic_is_seeded_per_batch() -> None:
    a = open_reader("synthetic", SPEC, samples=10, batch_size=4, seed=5)
    assert isinstance(a, SyntheticReader) and a.synthetic and len(a) == 10
    batches = _drain(a)
    assert [b.shape for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    b = open_reader("synthetic", SPEC, samples=10, batch_size=4, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(batches, _drain(b)))
    # batch i is drawn with seed + i: batch 1 of seed 5 is batch 0 of seed 6
    c = open_reader("synthetic", SPEC, samples=4, batch_size=4, seed=6)
    np.testing.assert_array_equal(_drain(c)[0], batches[1])
    a.rewind()
    np.testing.assert_array_equal(a.get_next()["input"], batches[0])
    # values look like a normalised image: within what a [0, 1] pixel becomes per channel
    lo = (0 - np.array(SPEC.mean)) / np.array(SPEC.std)
    hi = (1 - np.array(SPEC.mean)) / np.array(SPEC.std)
    x = np.concatenate(batches)
    assert (x.min(axis=(0, 2, 3)) >= lo - 1e-6).all() and (x.max(axis=(0, 2, 3)) <= hi + 1e-6).all()
    assert 0.5 < x.std() < 1.1
    fps = {open_reader("synthetic", SPEC, samples=n, batch_size=4, seed=s).fingerprint()
           for n, s in ((10, 5), (11, 5), (10, 6))}
    assert len(fps) == 3
    assert b.fingerprint() == open_reader("synthetic", SPEC, samples=10, batch_size=4, seed=5).fingerprint()


def test_bad_counts_are_input_errors() -> None:
    with pytest.raises(InputError, match="at least one sample"):
        open_reader("synthetic", SPEC, samples=0)
    with pytest.raises(InputError, match="batch size"):
        open_reader("synthetic", SPEC, batch_size=0)


def test_image_fingerprints_find_shared_images(tmp_path: Path, mixed_folder: Path) -> None:
    evaluation = tmp_path / "eval" / "cat"
    evaluation.mkdir(parents=True)
    shutil.copy(mixed_folder / "a.jpg", evaluation / "renamed.jpg")
    _rgb(50).save(evaluation / "fresh.png")
    calib = image_fingerprints(mixed_folder)
    assert hashlib.sha256((mixed_folder / "a.jpg").read_bytes()).hexdigest() in calib
    assert len(calib & image_fingerprints(tmp_path / "eval")) == 1
    with pytest.warns(UserWarning):
        reader = open_reader(mixed_folder, SPEC)
    assert reader.sample_fingerprints() <= calib and len(reader.sample_fingerprints()) == 8
    data = np.random.default_rng(1).standard_normal((6, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "a.npy", data)
    np.savez(tmp_path / "b.npz", x=np.concatenate([data[4:], np.ones((2, 3, 32, 32), np.float32)]))
    assert len(image_fingerprints(tmp_path / "a.npy")) == 6
    assert len(image_fingerprints(tmp_path / "a.npy") & image_fingerprints(tmp_path / "b.npz")) == 2
    assert image_fingerprints("synthetic") == set()
    with pytest.raises(InputError):
        image_fingerprints(tmp_path / "nothing-here")


def test_raw_pixel_arrays_are_flagged(tmp_path):
    """Arrays that were not normalised (raw 0-255 pixels) get a warning before calibration."""
    from rexport.calibration import open_reader

    spec = PreprocessSpec(input_size=16, resize=16)
    raw = np.random.default_rng(0).uniform(0, 255, (4, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "raw.npy", raw)
    with pytest.warns(UserWarning, match="far outside"):
        open_reader(tmp_path / "raw.npy", spec, samples=4, batch_size=2).fingerprint()
    ok = ((raw / 255.0 - 0.45) / 0.225).astype(np.float32)
    np.save(tmp_path / "ok.npy", ok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_reader(tmp_path / "ok.npy", spec, samples=4, batch_size=2).fingerprint()
