"""The deployment bundle: the models a device needs, their preprocessing and a standalone runner.

A bundle is a folder (or a .tar.gz of it) that runs without rexport or torch::

    bundle/
      bundle.json            what is inside: variants, sources, sha256 of every file
      README.txt             how to run it
      run_engine.py          standalone runner (numpy + pillow + the model's runtime)
      trt_engine/            the TensorRT package rexport itself uses (build, runner, version rules)
      preprocess.json        the PreprocessSpec the model was exported with
      labels.txt             class names, when the run has them
      models/model.<v>.onnx  ONNX variants (ONNX Runtime anywhere; TensorRT/OpenVINO can rebuild from them)
      engines/<backend>-<precision>/   engines with their sidecar.json
      build_engine.py, calibration/*.tensorrt.cache    with build_on_device (TensorRT on the device)

Default variants: every engine in the run, plus ``fp32`` (the reference that runs anywhere) and
``int8`` (the one calibrated file both TensorRT and OpenVINO compile) when quantized. With
``build_on_device`` every ONNX variant meant for TensorRT is included (not ``int8-openvino``),
since which one TensorRT compiles depends on the TensorRT version found on the device.

``format`` other than ``folder`` writes a server's own layout instead (Triton model repository,
DeepStream nvinfer configs, OpenVINO Model Server): see ``rexport.pipeline.deploy``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rexport import __version__
from rexport.core.errors import InputError
from rexport.core.fsio import atomic_dir, atomic_path, sha256_file
from rexport.core.preprocess import PreprocessSpec
from rexport.core.settings import setting
from rexport.pipeline.backends.sidecar import SIDECAR_NAME, read_sidecar, verify_engine_files
from rexport.pipeline.deploy import FORMATS, check_variants, get_format, refusal, tensorrt_compiles, writer
from rexport.pipeline.manifest import VARIANT_FILES, RunDir
from rexport.pipeline.summaries import QuantizeSummary
from rexport.pipeline.variants import engine_dirs

BUNDLE_SCHEMA = 1
TEMPLATES = Path(__file__).resolve().parent / "templates"
TRT_ENGINE = Path(__file__).resolve().parent / "backends" / "trt_engine"   # package shipped verbatim: the scripts import it
DEFAULT_ONNX = ("fp32", "int8")


@dataclass(frozen=True)
class BundleSettings:
    """The deployment layout and its server-side knobs (the variants and destination are the command's)."""

    format: str = setting("folder", choices=tuple(FORMATS),
                          help="Layout: folder (our runner), triton, deepstream or ovms (see README).")
    queue_delay_us: int = setting(100, help="Triton dynamic_batching max_queue_delay_microseconds.")
    check_images: str | None = setting(None, help="Images to measure DeepStream's single-scale preprocessing on "
                                                  "(default: the run's calibration/eval images, else generated photos).")

    def __post_init__(self) -> None:
        get_format(self.format)
        if self.queue_delay_us < 0:
            raise InputError(f"bad --queue-delay-us {self.queue_delay_us}", "pass 0 or more microseconds")


def available_variants(run: RunDir) -> list[str]:
    """ONNX variants and engines present in the run, in pipeline order."""
    return run.variants() + [n for n in engine_dirs(run) if not n.startswith(".")]


def default_variants(run: RunDir, *, build_on_device: bool = False) -> list[str]:
    onnx = run.variants() if build_on_device else [v for v in run.variants() if v in DEFAULT_ONNX]
    return onnx + [n for n in engine_dirs(run) if not n.startswith(".")]


def _tensorrt_cache(run: RunDir) -> Path | None:
    """The calibration cache written with the current int8 model (quantize:int8), else the only one there is."""
    q = QuantizeSummary.of(run)
    rel = q.tensorrt_cache if q else None
    if rel and run.file(rel).is_file():
        return run.file(rel)
    found = sorted((run.path / "calibration").glob("*.tensorrt.cache"))
    return found[0] if len(found) == 1 else None


def make_bundle(run: RunDir, *, variants: Sequence[str] | None = None, dest: Path | None = None,
                archive: bool = False, build_on_device: bool = False, format: str = "folder",
                queue_delay_us: int = 100, check_images: str | None = None) -> Path:
    """Write the bundle folder (or ``.tar.gz`` with ``archive``) atomically and return its path.

    ``dest`` defaults to ``<run>/bundle`` (``<run>/bundle.tar.gz``). An unknown variant, a missing
    export, a variant the ``format`` cannot hold or an engine whose files do not match its sidecar
    is an InputError, and nothing is written.
    """
    fp32 = run.require(VARIANT_FILES["fp32"], "rexport export")
    fmt = get_format(format)
    if fmt.module and build_on_device:
        raise InputError(f"--build-on-device writes the folder layout, not --format {fmt.name}",
                         "drop one of --build-on-device and --format")
    available = available_variants(run)
    engines = engine_dirs(run)
    kinds = {v: "onnx" if v in VARIANT_FILES else str(read_sidecar(engines[v]).get("backend")) for v in available}
    chosen = list(dict.fromkeys(variants)) if variants else [
        v for v in default_variants(run, build_on_device=build_on_device) if not refusal(fmt, v, kinds[v])]
    unknown = [v for v in chosen if v not in available]
    if unknown:
        raise InputError(f"no variant {', '.join(map(repr, unknown))} in {run.path}",
                         f"available: {', '.join(available) or 'none'}")
    if not chosen:
        raise InputError(f"nothing to bundle in {run.path}", "run 'rexport export' first")
    check_variants(fmt, chosen, kinds)
    sidecars = {}
    for v in chosen:
        if v in engines:
            sidecars[v] = read_sidecar(engines[v])
            verify_engine_files(engines[v], sidecars[v])
    onnx = [v for v in chosen if v in VARIANT_FILES]
    cache = None
    if build_on_device:
        onnx = list(dict.fromkeys(onnx + [v for v in run.variants() if tensorrt_compiles(v)]))
        if "int8" in onnx:
            cache = _tensorrt_cache(run)

    spec = PreprocessSpec.from_onnx(fp32)
    dest = Path(dest) if dest is not None else run.path / ("bundle.tar.gz" if archive else "bundle")

    def write(root: Path) -> None:
        if fmt.module:
            _write_layout(root, run, fmt, chosen, sidecars, engines, spec, queue_delay_us, check_images)
        else:
            _write_bundle(root, run, onnx, sidecars, engines, spec, cache, build_on_device)

    if archive:
        with atomic_path(dest, suffix=".tar.gz") as tmp_archive:
            staging = tmp_archive.with_name(tmp_archive.name + ".d")
            try:
                write(staging)
                name = dest.name[: -len(".tar.gz")] if dest.name.endswith(".tar.gz") else dest.stem
                # Weights barely compress: level 1 is several times faster than the default 9 for ~the same size.
                with tarfile.open(tmp_archive, "w:gz", compresslevel=1) as tar:
                    tar.add(staging, arcname=name or "bundle")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    else:
        with atomic_dir(dest) as tmp:
            write(tmp)
    run.log(f"bundle: wrote {dest} ({', '.join(onnx + list(sidecars))}"
            + (", build on device" if build_on_device else "") + (f", {fmt.name} layout" if fmt.module else "") + ")")
    return dest


def _write_bundle(root: Path, run: RunDir, onnx: list[str], sidecars: dict, engines: dict,
                  spec: PreprocessSpec, cache: Path | None, build_on_device: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    contents: dict[str, dict] = {}
    for v in onnx:
        rel = f"models/model.{v}.onnx"
        _copy(run.file(VARIANT_FILES[v]), root / rel)
        contents[v] = {"kind": "onnx", "path": rel, "runtime": "onnxruntime"}
    for v, sc in sidecars.items():
        rel = f"engines/{v}"
        (root / rel).mkdir(parents=True)
        for f in [*sc["engine_files"], SIDECAR_NAME]:
            _copy(engines[v] / f, root / rel / f)
        contents[v] = {"kind": "engine", "path": rel, "runtime": sc["backend"], "precision": sc["precision"],
                       "device": sc.get("device"), "source_variant": (sc.get("source_onnx") or {}).get("variant")}
    (root / "preprocess.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    if spec.labels:
        (root / "labels.txt").write_text("".join(f"{label}\n" for label in spec.labels), encoding="utf-8")
    _copy(TEMPLATES / "run_engine.py", root / "run_engine.py")
    shutil.copytree(TRT_ENGINE, root / "trt_engine", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cache_rel = None
    if build_on_device:
        _copy(TEMPLATES / "build_engine.py", root / "build_engine.py")
        if cache is not None:
            cache_rel = f"calibration/{cache.name}"
            _copy(cache, root / cache_rel)
            intent = cache.with_name(cache.name + ".layers.json")     # the INT8 file's per-layer precisions
            if intent.is_file():
                _copy(intent, root / f"{cache_rel}.layers.json")
    (root / "README.txt").write_text(_readme(contents, spec, build_on_device, cache_rel), encoding="utf-8")
    _write_manifest(root, run, contents, spec, {"build_on_device": build_on_device, "calibration_cache": cache_rel})


def _write_manifest(root: Path, run: RunDir, contents: dict, spec: PreprocessSpec, extra: dict) -> None:
    """bundle.json: what is inside and the sha256 of every other file."""
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = {
        "schema_version": BUNDLE_SCHEMA, "rexport": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run.path.resolve()), "variants": contents, **extra,
        "preprocess": spec.to_dict(), "files": files,
    }
    (root / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _write_layout(root: Path, run: RunDir, fmt, variants: list[str], sidecars: dict, engines: dict,
                  spec: PreprocessSpec, queue_delay_us: int, check_images: str | None) -> None:
    """A server's own layout (rexport.pipeline.deploy.<format>), with preprocess.json, README and bundle.json."""
    import warnings

    from rexport.pipeline.deploy.common import LayoutContext, collect_models, labels_for, server_name

    root.mkdir(parents=True, exist_ok=True)
    models = collect_models(run, variants, engines, sidecars)
    export = run.require_export().get("settings") or {}
    ctx = LayoutContext(run=run, name=server_name(str(export.get("model") or "model")), spec=spec,
                        labels=labels_for(spec, models[0].outputs),
                        folded=bool(getattr(spec, "raw_pixels", False) or export.get("fold_preprocessing")),
                        queue_delay_us=int(queue_delay_us), check_images=_check_images(run, check_images))
    extra = {}
    if fmt.name == "deepstream":
        cache = _tensorrt_cache(run)
        extra = {"calibration_cache": cache, "fp32_onnx": run.file(VARIANT_FILES["fp32"])}
    layout = writer(fmt).write(root, models, ctx, **extra)
    (root / "preprocess.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    readme = [f"rexport deployment bundle: {fmt.server} layout", "", *layout.readme, "",
              "Smoke test on this machine (loads each model from the files its config names): "
              "rexport infer BUNDLE_DIR IMAGE [--model NAME]",
              "bundle.json lists every file with its sha256 (check: sha256sum)."]
    (root / "README.txt").write_text("\n".join(readme) + "\n", encoding="utf-8")
    for w in layout.warnings:
        warnings.warn(w, stacklevel=2)
    _write_manifest(root, run, layout.contents, spec, {"format": fmt.name, "server": fmt.server,
                                                      "folded_preprocessing": ctx.folded,
                                                      "warnings": layout.warnings})


def _check_images(run: RunDir, given: str | None) -> tuple[Path, ...]:
    """Real images to measure a layout's preprocessing on: the given folder, else the run's calibration
    or evaluation image folder; empty when there is none (the writer then generates photo-like images)."""
    from rexport.core.preprocess import list_images

    if given:
        found = list_images(given) if Path(given).is_dir() else []
        if not found:
            raise InputError(f"no images in {given}", "pass a folder of .jpg/.png images to --check-images")
    else:
        found = []
        records = [(r, "calib_data") for r in run.stages("quantize:int8").values()] + \
            [(r, "val_data") for r in run.stages("evaluate:").values()]
        for rec, key in records:
            folder = (rec.get("settings") or {}).get(key)
            if folder and Path(folder).is_dir():
                found = list_images(folder)
                if found:
                    break
    step = max(1, len(found) // 32)
    return tuple(found[::step][:32])


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    os.chmod(dst, 0o644 if dst.suffix != ".py" else 0o755)


def _readme(contents: dict, spec: PreprocessSpec, build_on_device: bool, cache_rel: str | None) -> str:
    lines = [
        "rexport deployment bundle",
        "=========================",
        "",
        "Classify images (prints the top-k classes with probabilities; --json for machine-readable output):",
        "",
    ]
    for v, c in contents.items():
        lines.append(f"  python3 run_engine.py {c['path']} IMAGE... [--topk 5] [--json]    # {v}: {c['runtime']}")
    lines += [
        "",
        "Requirements: numpy, pillow and the runtime of the model you run:",
        "  ONNX (models/*.onnx)          pip install onnxruntime",
        "  engines/openvino-*            pip install openvino (an engine loads with the OpenVINO version that built it or newer)",
        "  engines/tensorrt-*            TensorRT with the exact version and GPU recorded in its sidecar.json",
        "                                (JetPack: apt install python3-libnvinfer) and pip install polygraphy (its CUDA wrapper)",
        "",
        f"Preprocessing (preprocess.json): resize shorter side to {spec.resize} ({spec.interpolation}), centre crop "
        f"{spec.input_size}, scale to [0, 1], normalise mean {list(spec.mean)} std {list(spec.std)}, "
        f"{spec.channel_order}, NCHW float32.",
        "bundle.json lists every file with its sha256 (check: sha256sum).",
    ]
    if build_on_device:
        lines += [
            "",
            "Build a TensorRT engine on this device (needs TensorRT's Python bindings, numpy and polygraphy):",
            "",
            "  python3 build_engine.py --precision int8     # or fp16 / fp32; --help for batch profile, DLA, workspace",
            "  python3 run_engine.py engines/tensorrt-int8 IMAGE...",
            "",
            "TensorRT 10 and 11 build strongly typed from models/model.<precision>.onnx. TensorRT 8.5/8.6",
            "(JetPack 5.1/6.0) build models/model.fp32.onnx with builder flags"
            + (f" and the INT8 ranges in {cache_rel}." if cache_rel else "; INT8 there needs a calibration cache, "
               "which this bundle lacks (run 'rexport quantize --precision int8' and bundle again)."),
            "That cache holds only the tensors the INT8 file quantizes; the layers the file keeps in float are",
            "pinned to its float precision (--int8-float fp16|fp32), so 8.x builds what 10/11 build.",
        ]
    return "\n".join(lines) + "\n"
