"""Atomic writes leave files and folders with the modes a plain write would (the umask's), not
mkstemp's 0600 / mkdtemp's 0700: a model server running as another user must be able to read them."""
from __future__ import annotations

import os
import stat

import pytest

from rexport.core.fsio import atomic_dir, atomic_path, atomic_write_json, current_umask


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_get_the_umask_modes(tmp_path, umask_022):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"1")
    with atomic_dir(tmp_path / "engine") as d:
        (d / "model.xml").write_text("<net/>")
    assert mode(tmp_path / "a.json") == 0o644
    assert mode(tmp_path / "b.bin") == 0o644
    assert mode(tmp_path / "engine") == 0o755
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_real_export_is_readable_by_others(small_run):
    expected = 0o666 & ~current_umask()
    onnx_file = small_run.file("onnx/model.fp32.onnx")
    assert mode(onnx_file) == expected
    assert mode(small_run.path / "manifest.json") == expected


def test_the_umask_is_read_as_set(umask_022):
    assert current_umask() == 0o022
    os.umask(0o027)
    assert current_umask() == 0o027
