"""sidecar.json: written atomically, read strictly, engine files verified by hash."""
from __future__ import annotations

import json

import pytest

from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file
from rexport.pipeline.backends.sidecar import (REQUIRED_KEYS, SIDECAR_NAME, SIDECAR_SCHEMA, load_engine, make_sidecar,
                                               read_sidecar, refuse_incompatible, verify_engine_files, version_tuple,
                                               write_sidecar)


@pytest.fixture()
def engine(tmp_path):
    """An engine folder with two small files, a source ONNX file and its sidecar."""
    d = tmp_path / "engines" / "openvino-fp32"
    d.mkdir(parents=True)
    (d / "model.xml").write_bytes(b"<net/>")
    (d / "model.bin").write_bytes(bytes(range(256)) * 4)
    src = tmp_path / "model.fp32.onnx"
    src.write_bytes(b"onnx bytes")
    sc = make_sidecar(backend="openvino", precision="fp32", engine_dir=d, engine_files=["model.xml", "model.bin"],
                      source_onnx=src, source_variant="fp32", runtime={"openvino": "2026.4.1"},
                      device={"kind": "cpu", "isa": ["avx2"]},
                      io={"inputs": [{"name": "input", "shape": [-1, 3, 8, 8], "dtype": "float32"}],
                          "outputs": [{"name": "logits", "shape": [-1, 10], "dtype": "float32"}]},
                      profile=None, build_settings={"threads": None}, load_settings={"INFERENCE_PRECISION_HINT": "f32"},
                      build_seconds=1.23456, preprocess={"input_size": 8})
    write_sidecar(d, sc)
    return d, src, sc


def test_sidecar_records_what_was_built_from_what(engine):
    d, src, sc = engine
    assert set(sc) == set(REQUIRED_KEYS)
    assert sc["schema_version"] == SIDECAR_SCHEMA
    assert sc["engine_files"] == {"model.xml": sha256_file(d / "model.xml"), "model.bin": sha256_file(d / "model.bin")}
    assert sc["source_onnx"] == {"file": "model.fp32.onnx", "sha256": sha256_file(src), "variant": "fp32"}
    assert sc["build_seconds"] == 1.235
    assert read_sidecar(d) == json.loads(json.dumps(sc))


def test_write_is_atomic_and_leaves_no_temp_files(engine):
    d, _, sc = engine
    write_sidecar(d, {**sc, "precision": "fp32"})
    assert sorted(p.name for p in d.iterdir()) == sorted(["model.xml", "model.bin", SIDECAR_NAME])


def test_make_sidecar_refuses_an_engine_file_that_was_not_written(engine, tmp_path):
    d, src, sc = engine
    with pytest.raises(InputError, match="model.plan was not written"):
        make_sidecar(**{**{k: sc[k] for k in ("backend", "precision", "runtime", "device", "io", "profile",
                                               "build_settings", "load_settings", "build_seconds", "preprocess")},
                        "engine_dir": d, "engine_files": ["model.plan"], "source_onnx": src, "source_variant": "fp32"})


def test_read_refuses_missing_folder_and_missing_sidecar(tmp_path):
    with pytest.raises(InputError, match="no engine folder"):
        read_sidecar(tmp_path / "nope")
    with pytest.raises(InputError, match="sidecar.json not found"):
        read_sidecar(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda text, sc: "{not json", "corrupt"),
    (lambda text, sc: "[1, 2]", "not a JSON object"),
    (lambda text, sc: json.dumps({**sc, "schema_version": 99}), "schema 99"),
    (lambda text, sc: json.dumps({k: v for k, v in sc.items() if k not in ("load_settings", "io")}),
     "missing io, load_settings"),
    (lambda text, sc: json.dumps({**sc, "engine_files": {}}), "lists no engine files"),
])
def test_read_refuses_corrupt_or_foreign_sidecars(engine, mutate, message):
    d, _, sc = engine
    p = d / SIDECAR_NAME
    p.write_text(mutate(p.read_text(), sc))
    with pytest.raises(InputError, match=message) as e:
        read_sidecar(d)
    assert "rexport build" in str(e.value)


def test_verify_detects_a_modified_and_a_missing_engine_file(engine):
    d, _, sc = engine
    verify_engine_files(d, sc)  # untouched: passes
    data = bytearray((d / "model.bin").read_bytes())
    data[100] ^= 0xFF
    (d / "model.bin").write_bytes(bytes(data))
    with pytest.raises(InputError) as e:
        verify_engine_files(d, sc)
    assert str(e.value) == ("engine file model.bin was modified after build (sha256 mismatch); "
                            "rebuild with 'rexport build --backend openvino --precision fp32'")
    (d / "model.xml").unlink()
    with pytest.raises(InputError, match="model.xml is missing"):
        verify_engine_files(d, sc)


def test_load_engine_verifies_before_dispatching(engine):
    d, _, _ = engine
    (d / "model.xml").write_bytes(b"<net></net>")
    with pytest.raises(InputError, match="model.xml was modified after build"):
        load_engine(d)


def test_load_engine_refuses_an_unknown_backend(engine):
    d, _, sc = engine
    write_sidecar(d, {**sc, "backend": "nosuch"})
    with pytest.raises(InputError, match="unknown backend 'nosuch'"):
        load_engine(d)
    write_sidecar(d, {**sc, "backend": "auto"})
    with pytest.raises(InputError, match="names no backend"):
        load_engine(d)


def test_refuse_incompatible_lists_every_problem(engine):
    d, _, sc = engine
    refuse_incompatible(d, sc, [])
    with pytest.raises(InputError, match="first; second; rebuild with 'rexport build --backend openvino"):
        refuse_incompatible(d, sc, ["first", "second"])


def test_version_tuple():
    assert version_tuple("2026.4.1-22982-e213a147257-releases/2026/4") == (2026, 4, 1)
    assert version_tuple("10.3.0.post1") == (10, 3, 0)
    assert version_tuple("8.6") < version_tuple("10.0")
    assert version_tuple(None) == () and version_tuple("dev") == ()
