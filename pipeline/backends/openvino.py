"""OpenVINO CPU engines: an IR (model.xml + model.bin) plus the load-time settings that fix its precision.

An IR is not a compiled blob: the precision is decided when it is compiled, and two defaults
change it silently. ``ov.save_model`` compresses weights to FP16 unless told not to, and on a
CPU with BF16 the default inference precision is bf16. So an engine is saved uncompressed and
its sidecar carries INFERENCE_PRECISION_HINT, which every load (here and in the deployment
bundle) passes on unchanged. ``openvino`` is imported only inside the functions that need it.
"""
from __future__ import annotations

import importlib.util
import time
import warnings
from pathlib import Path

import numpy as np

from rexport.core.env import cpu_info, package_version
from rexport.core.errors import InputError, MissingDependency, first_line
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.backends import Backend, BuildSettings, register
from rexport.pipeline.backends.sidecar import (make_sidecar, read_sidecar, refuse_incompatible, verify_engine_files,
                                               version_tuple)
from rexport.pipeline.runners import Runner

DEVICE = "CPU"
ENGINE_FILES = ("model.xml", "model.bin")
BF16_ISA = ("avx512_bf16", "amx_bf16")
#: x86 int8 dot products that accumulate u8 x s8 straight into int32; without them oneDNN uses
#: vpmaddubsw, which sums each pair of u8 x s8 products into int16 with saturation (2*255*127 > 32767)
VNNI_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")
OVERFLOW_FIX_REASON = "no VNNI: int16 saturation of u8 x s8 pairs (vpmaddubsw)"
#: What the CPU plugin computes for each engine precision. int8 keeps f32 for whatever the Q/DQ
#: model left unquantized (on a BF16 CPU the default would quietly run that part in bf16).
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
#: One stream using every core: our runners drive one synchronous request at a time, which a
#: THROUGHPUT hint would confine to a fraction of the cores.
PERFORMANCE_HINT = "LATENCY"


def _build_hint(precision: str | None = None) -> str:
    return "rebuild with 'rexport build --backend openvino" + (f" --precision {precision}'" if precision else "'")


def machine_facts() -> dict:
    """What the compatibility check needs to know about this machine (no openvino import)."""
    cpu = cpu_info()
    return {"openvino": package_version("openvino"), "isa": list(cpu["isa"]), "arch": cpu["arch"],
            "model": cpu["model"]}


def has_bf16(isa: list[str] | tuple[str, ...]) -> bool:
    return any(flag in isa for flag in BF16_ISA)


def has_vnni(isa: list[str] | tuple[str, ...]) -> bool:
    return any(flag in isa for flag in VNNI_ISA)


def compatibility_problems(sidecar: dict, facts: dict) -> list[str]:
    """What keeps an engine (its sidecar) from loading on a machine (``machine_facts()``); empty when nothing."""
    problems = []
    if sidecar.get("backend") != "openvino":
        problems.append(f"engine is for backend {sidecar.get('backend')!r}, not openvino")
        return problems
    precision = sidecar.get("precision")
    if precision not in OpenVINOBackend.precisions:
        problems.append(f"unknown OpenVINO engine precision {precision!r}")
    built = (sidecar.get("runtime") or {}).get("openvino")
    here = facts.get("openvino")
    if not here:
        problems.append("OpenVINO is not installed on this machine")
    elif not built:
        problems.append("the sidecar does not record the OpenVINO version the engine was built with")
    elif version_tuple(built) > version_tuple(here):
        problems.append(f"engine built with OpenVINO {built}, this machine has {here}")
    if precision == "bf16" and not has_bf16(facts.get("isa", [])):
        problems.append(f"a bf16 engine needs a CPU with native BF16 ({' or '.join(BF16_ISA)}); "
                        f"this CPU ({facts.get('model', 'unknown')}) has none")
    hint = (sidecar.get("load_settings") or {}).get("INFERENCE_PRECISION_HINT")
    if precision in INFERENCE_PRECISION and hint != INFERENCE_PRECISION[precision]:
        problems.append(f"a {precision} engine must load with INFERENCE_PRECISION_HINT "
                        f"{INFERENCE_PRECISION[precision]}, the sidecar says {hint!r}")
    return problems


def _ov_type_name(value) -> str:
    """'f32' for an ov.Type, the plain string otherwise."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _port_info(port) -> dict:
    try:
        name = port.get_any_name()
    except RuntimeError:  # a port without a tensor name
        name = ""
    shape = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
    return {"name": name, "shape": shape, "dtype": str(np.dtype(port.get_element_type().to_dtype()))}


class OpenVINOBackend(Backend):
    name = "openvino"
    precisions = ("fp32", "bf16", "int8")
    #: why a precision is not offered, for the error message of a build that asks for it
    precision_notes = {"fp16": "OpenVINO on x86 computes an fp16 model in f32 or bf16"}
    install_hint = "pip install openvino"

    def unavailable_reason(self) -> str | None:
        if not hasattr(self, "_unavailable"):  # asking OpenVINO for its devices costs a Core: once per process
            self._unavailable = self._probe()
        return self._unavailable

    @staticmethod
    def _probe() -> str | None:
        if importlib.util.find_spec("openvino") is None:
            return "openvino not installed (pip install openvino)"
        try:
            import openvino as ov

            devices = ov.Core().available_devices
        except Exception as e:  # a broken install raises anything from ImportError to RuntimeError
            return f"openvino cannot start: {first_line(e, 160)}"
        if DEVICE not in devices:
            return f"OpenVINO has no {DEVICE} device here (devices: {', '.join(devices) or 'none'})"
        return None

    def precision_unavailable_reason(self, precision: str) -> str | None:
        """None when this machine can build ``precision``, else why not."""
        if precision == "bf16" and not has_bf16(cpu_info()["isa"]):
            return (f"bf16 needs a CPU with native BF16 ({' or '.join(BF16_ISA)}); "
                    f"this CPU ({cpu_info()['model']}) would emulate it")
        return None

    def source_variant(self, precision: str, settings: BuildSettings | None = None) -> str:
        # the INT8 engine compiles the OpenVINO (NNCF-parity) form of the INT8 file
        return {"fp32": "fp32", "bf16": "fp32", "int8": "int8-openvino"}[precision]

    def load_settings(self, precision: str, threads: int | None = None) -> dict:
        settings = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision], "PERFORMANCE_HINT": PERFORMANCE_HINT}
        if threads:
            settings["INFERENCE_NUM_THREADS"] = int(threads)
        return settings

    def build(self, onnx_path: Path, dest: Path, precision: str, settings: BuildSettings, *,
              calibration_cache: Path | None = None, progress: bool = True) -> dict:
        if precision not in self.precisions:
            raise InputError(f"openvino does not build {precision!r} engines", f"use {', '.join(self.precisions)}")
        reason = self.precision_unavailable_reason(precision)
        if reason:
            raise MissingDependency(reason, "build fp32 or int8, or build bf16 on a CPU with AVX512_BF16/AMX")
        import openvino as ov

        onnx_path, dest = Path(onnx_path), Path(dest)
        t0 = time.perf_counter()
        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as e:  # the ONNX frontend raises OpConversionFailure, GeneralFailure, ...
            first = first_line(e, 200)
            raise InputError(f"OpenVINO cannot convert {onnx_path}: {first}",
                             "re-run 'rexport export' (or 'rexport quantize') to rewrite it") from None
        batch_mode = self._keep_batch_dynamic(model)
        int8_settings = prepare_int8(model, cpu_info()["isa"]) if precision == "int8" else {}
        if int8_settings.get("weights_7bit_overflow_fix"):
            warnings.warn(f"this CPU has no VNNI: {int8_settings['weights_7bit_overflow_fix']} layer(s) fed by "
                          "signed INT8 activations get 7-bit weights (overflow fix, as NNCF does)")
        # compress_to_fp16 defaults to True: without this an "fp32" IR would hold fp16 weights
        ov.save_model(model, str(dest / "model.xml"), compress_to_fp16=False)
        load_settings = self.load_settings(precision, settings.threads)
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(dest / "model.xml")), DEVICE, load_settings)
        io = {"inputs": [_port_info(p) for p in compiled.inputs], "outputs": [_port_info(p) for p in compiled.outputs]}
        got = _ov_type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
        if got != load_settings["INFERENCE_PRECISION_HINT"]:
            raise MissingDependency(f"OpenVINO compiled the {precision} engine with inference precision {got}, "
                                    f"not {load_settings['INFERENCE_PRECISION_HINT']}",
                                    "this CPU or OpenVINO version cannot run that precision")
        del compiled
        build_seconds = time.perf_counter() - t0
        return make_sidecar(
            backend=self.name, precision=precision, engine_dir=dest, engine_files=list(ENGINE_FILES),
            source_onnx=onnx_path, source_variant=self.source_variant(precision),
            runtime={"openvino": package_version("openvino") or ov.__version__, "openvino_build": ov.get_version()},
            device={"kind": "cpu", **cpu_info()}, io=io, profile=None,
            build_settings={"compress_to_fp16": False, "threads": settings.threads, "device": DEVICE,
                            "unsigned_post_relu_quantizers": 0, **int8_settings, "batch": batch_mode},
            load_settings=load_settings, build_seconds=build_seconds,
            preprocess=PreprocessSpec.from_onnx(onnx_path).to_dict())

    @staticmethod
    def _keep_batch_dynamic(model) -> str:
        """An exported model with a fixed batch is opened up to any batch, like the ONNX export's 'batch' axis.

        Returns what the engine's batch is; a graph that cannot be reshaped keeps its fixed batch, said
        in a warning and recorded in the sidecar (never silently)."""
        import openvino as ov

        shapes = {}
        for port in model.inputs:
            ps = port.get_partial_shape()
            if ps.rank.is_static and len(ps) >= 1 and ps[0].is_static:
                shapes[port] = ov.PartialShape([ov.Dimension(-1)] + [ps[i] for i in range(1, len(ps))])
        if not shapes:
            return "dynamic"
        try:
            model.reshape(shapes)
        except Exception as e:  # a graph with batch-dependent constants: keep its fixed batch, and say so
            first = first_line(e, 160)
            warnings.warn(f"OpenVINO cannot make the batch dimension dynamic ({first}); "
                          "the engine keeps the file's fixed batch")
            return f"fixed (reshape to a dynamic batch failed: {first})"
        return "dynamic (opened from a fixed batch)"

    def load(self, engine_dir: Path, *, threads: int | None = None) -> "OpenVINORunner":
        engine_dir = Path(engine_dir)
        sidecar = read_sidecar(engine_dir)
        if sidecar.get("backend") != self.name:
            raise InputError(f"{engine_dir} holds a {sidecar.get('backend')} engine, not an openvino one",
                             "load it with its own backend (rexport reads the backend from sidecar.json)")
        reason = self.unavailable_reason()
        if reason:
            raise MissingDependency(f"cannot load {engine_dir}: {reason}", "install openvino (pip install openvino)")
        refuse_incompatible(engine_dir, sidecar, compatibility_problems(sidecar, machine_facts()))
        verify_engine_files(engine_dir, sidecar)
        return OpenVINORunner(engine_dir, sidecar, threads=threads)


class OpenVINORunner(Runner):
    """An OpenVINO engine compiled with exactly the load settings its sidecar records."""

    def __init__(self, engine_dir: Path, sidecar: dict, *, threads: int | None = None, name: str | None = None) -> None:
        super().__init__()
        self.engine_dir = Path(engine_dir)
        self.sidecar = sidecar
        self.name = name or f"openvino-{sidecar['precision']}"
        self.config = dict(sidecar["load_settings"])
        # raw uint8 NHWC pixels for a folded-preprocessing engine, else float32 NCHW
        self.feed = PreprocessSpec.from_dict(sidecar.get("preprocess") or {}).model_input
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = None
        self.request = None

    def _activate(self) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.engine_dir / "model.xml"), str(self.engine_dir / "model.bin"))
        self.compiled = core.compile_model(model, DEVICE, self.config)
        self.request = self.compiled.create_infer_request()
        prop = self.compiled.get_property
        self.settings = {
            "runtime": f"openvino {package_version('openvino') or ov.__version__}",
            "device": DEVICE,
            "inference_precision": _ov_type_name(prop("INFERENCE_PRECISION_HINT")),
            "performance_hint": str(prop("PERFORMANCE_HINT")),
            "streams": int(prop("NUM_STREAMS")),
            "threads": int(prop("INFERENCE_NUM_THREADS")),
            "load_settings": dict(self.config),
        }

    def _deactivate(self) -> None:
        self.request = None
        self.compiled = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.request is None:
            raise RuntimeError(f"{self.name} is not active: use it as a context manager")
        self.request.infer({0: self.feed(x)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)


register(OpenVINOBackend())


_SIGN_PRESERVING = {"MaxPool", "ReduceMean", "AvgPool", "Reshape", "Squeeze", "Unsqueeze", "Convert", "FakeQuantize"}


def prepare_int8(model, isa: list[str] | tuple[str, ...]) -> dict:
    """Rewrite an imported Q/DQ model (in place) for the CPU plugin's INT8 kernels; returns what was done,
    for the sidecar's build_settings. On a CPU without VNNI the layers still fed by signed activations
    (oneDNN shifts them to u8 0..255, so pairs of products reach 2*255*127 and saturate int16) get
    7-bit weights, NNCF's overflow fix; a VNNI CPU keeps every weight as the file has it."""
    done = {"unsigned_post_relu_quantizers": unsigned_after_relu(model)}
    if not has_vnni(isa):
        done["weights_7bit_overflow_fix"] = weights_7bit_after_signed(model)
        done["overflow_fix_reason"] = OVERFLOW_FIX_REASON
    return done


def weights_7bit_after_signed(model) -> int:
    """Halve the int8 weights (-64..63, scale doubled: the same float range) of each Convolution/MatMul
    whose activation quantizer is signed; returns how many weights were rewritten (in place)."""
    import numpy as np
    import openvino.opset13 as ops

    rewritten = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "MatMul") or not _signed_quantized(op.input_value(0).get_node()):
            continue
        mul = op.input_value(1).get_node()
        if mul.get_type_name() != "Multiply" or mul.input_value(0).get_node().get_type_name() != "Convert":
            continue  # only the symmetric form the ONNX frontend makes: int8 Constant -> Convert -> Multiply scale
        convert, scale = mul.input_value(0).get_node(), mul.input_value(1).get_node()
        weights = convert.input_value(0).get_node()
        if weights.get_type_name() != "Constant" or weights.get_output_element_type(0).get_type_name() != "i8" \
                or scale.get_type_name() != "Constant":
            continue
        w7 = np.clip(np.round(weights.get_data().astype(np.float32) / 2), -64, 63).astype(np.int8)
        new = ops.multiply(ops.convert(ops.constant(w7), convert.get_output_element_type(0)),
                           ops.constant(scale.get_data() * 2))
        new.set_friendly_name(mul.get_friendly_name())
        mul.output(0).replace(new.output(0))
        rewritten += 1
    return rewritten


def _signed_quantized(node, depth: int = 0) -> bool:
    """Whether a node is (seen through sign-preserving ops) an 8-bit FakeQuantize with a negative range."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        lo = node.input_value(1).get_node()
        return lo.get_type_name() == "Constant" and float(lo.get_data().min()) < 0
    if kind in _SIGN_PRESERVING and depth < 12:
        return _signed_quantized(node.input_value(0).get_node(), depth + 1)
    return False


def unsigned_after_relu(model) -> int:
    """Re-express each 8-bit FakeQuantize whose input is >= 0 by construction (a ReLU output, also
    through pools, reshapes and Q/DQ) as unsigned [0, 255*step] instead of signed [-128, 127]*step.

    Why: TensorRT takes only signed INT8 with zero point 0, so our Q/DQ file imports into OpenVINO as
    signed activations, and x86 VNNI multiplies unsigned activations by signed weights; a signed one
    costs oneDNN a shift-and-compensate pass (measured: 6-11% slower than NNCF's INT8, parity with
    this pass; benchmarks/results/int8_placement.json). The step is unchanged, so every value up to
    the calibrated amax lands on the same grid point; values above amax are kept up to 255*step
    instead of being clamped at 127*step. Returns how many quantizers were rewritten (in place).
    """
    import numpy as np
    import openvino.opset13 as ops

    rewritten = 0
    for fq in model.get_ordered_ops():
        if fq.get_type_name() != "FakeQuantize" or fq.get_levels() != 256:
            continue
        if not _nonnegative(fq.input_value(0).get_node()):
            continue
        lo, hi, out_lo, out_hi = (fq.input_value(i).get_node() for i in range(1, 5))
        if any(n.get_type_name() != "Constant" for n in (lo, hi, out_lo, out_hi)):
            continue
        lo, hi, out_lo, out_hi = (n.get_data() for n in (lo, hi, out_lo, out_hi))
        if lo.size != 1 or not (lo.item() < 0 < hi.item()):
            continue
        step, out_step = (hi.item() - lo.item()) / 255, (out_hi.item() - out_lo.item()) / 255
        new = ops.fake_quantize(fq.input_value(0), np.float32(0), np.float32(255 * step), np.float32(0),
                                np.float32(255 * out_step), 256)
        new.set_friendly_name(fq.get_friendly_name())
        fq.output(0).replace(new.output(0))
        rewritten += 1
    return rewritten


def _nonnegative(node, depth: int = 0) -> bool:
    """Whether a node's output is >= 0 by construction: a ReLU, seen through ops that keep the sign
    (pools, reshapes, an INT8 Q/DQ with zero point 0: FakeQuantize, Convert, Subtract 0, Multiply scale>0)."""
    import numpy as np

    kind = node.get_type_name()
    if kind == "Relu":
        return True
    if depth > 12:
        return False
    if kind in ("Multiply", "Subtract"):
        const = node.input_value(1).get_node()
        while const.get_type_name() == "Convert":
            const = const.input_value(0).get_node()
        if const.get_type_name() != "Constant":
            return False
        c = const.get_data()
        if (kind == "Multiply" and not np.all(c > 0)) or (kind == "Subtract" and not np.all(c == 0)):
            return False
        return _nonnegative(node.input_value(0).get_node(), depth + 1)
    if kind in _SIGN_PRESERVING:
        return _nonnegative(node.input_value(0).get_node(), depth + 1)
    return False
