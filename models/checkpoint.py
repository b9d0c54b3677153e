"""Load a ResNet and its weights from a checkpoint, refusing pickles that would run code.

Every failure is an ``InputError`` with one line naming the problem, because a checkpoint is
user input: the CLI prints it with a hint and exits 2.
"""
from __future__ import annotations

import difflib
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rexport.core.errors import InputError
from rexport.core.fsio import sha256_file
from rexport.models.resnet import MODELS

# Keys under which training scripts commonly nest the weights, in order of preference.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 3
_TRUST_HINT = "pass --trust-checkpoint only if you trust the file (it is then loaded with full pickle)"
_FIT_HINT = "pick the --model the checkpoint was trained as"


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval() mode and where its weights came from (for the manifest)."""

    model: nn.Module
    name: str
    num_classes: int
    weights_path: str | None  # None => seeded random init
    weights_sha256: str | None
    random_weights: bool
    seed: int | None


def load_state_dict(path: str | os.PathLike, *, trust_checkpoint: bool = False) -> dict[str, Tensor]:
    """Read a .pth/.pt or .safetensors file and return a plain state dict (wrappers and prefixes removed)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"checkpoint {p} does not exist", "check the --weights path") from None
    if not p.is_file():
        raise InputError(f"checkpoint {p} is not a file", "pass the checkpoint file, not a directory") from None
    try:
        with open(p, "rb") as f:
            head = f.read(16)
        size = p.stat().st_size
    except OSError as e:
        raise InputError(f"cannot read checkpoint {p}: {e.strerror}", "check the file's permissions") from None
    if size == 0:
        raise InputError(f"checkpoint {p} is empty", "the download or save did not finish; fetch it again") from None

    if _looks_like_safetensors(head, size) or (p.suffix == ".safetensors" and not head.startswith(b"PK")):
        obj: Any = _read_safetensors(p)
    else:
        obj = _read_torch(p, head, trust_checkpoint)
    return _plain_state_dict(obj, p)


def load_model(name: str, weights: str | os.PathLike | None = None, *, num_classes: int | None = None,
               trust_checkpoint: bool = False, seed: int = 0) -> LoadedModel:
    """Build ``name`` (ours, ``timm:<name>`` or ``module:function``) and load ``weights`` into it,
    or seed a random init when there are none."""
    build, head_key, default_classes = _builder(name)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}",
                         "pass --num-classes N with N >= 1, or leave it out") from None

    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(num_classes=num_classes or default_classes)
        model.eval()
        return LoadedModel(model=model, name=name, num_classes=_classes(model, num_classes or default_classes),
                           weights_path=None, weights_sha256=None, random_weights=True, seed=seed)

    path = Path(weights)
    state = load_state_dict(path, trust_checkpoint=trust_checkpoint)
    own_classes = None
    if head_key is None:  # a factory: its own last Linear is the head that tells the checkpoint's classes
        from rexport.models.external import linear_head

        head_key, own_classes = linear_head(build(num_classes=None))
    head = state.get(head_key) if head_key else None
    ckpt_classes = int(head.shape[0]) if isinstance(head, Tensor) and head.dim() == 2 else None
    if num_classes is None:
        num_classes = ckpt_classes or default_classes
    elif ckpt_classes is not None and ckpt_classes != num_classes:
        raise InputError(
            f"checkpoint {path} has a {ckpt_classes}-class head ({head_key} {_shape(head)}), "
            f"but num_classes={num_classes} was asked for",
            f"leave --num-classes out to use the checkpoint's {ckpt_classes} classes") from None

    model = build(num_classes=None if num_classes == own_classes else num_classes)
    expected = model.state_dict()
    problems = _mismatches(state, expected)
    if problems:
        raise InputError(f"checkpoint {path} does not fit {name}: {problems}", _fit_hint(state, name)) from None
    # Checkpoints from before torch 0.4.1 lack the BatchNorm counters; they carry no information.
    for key, value in expected.items():
        if _is_counter(key) and key not in state:
            state[key] = torch.zeros_like(value)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:  # e.g. a tensor that cannot be copied into a parameter
        first = str(e).strip().splitlines()[-1].strip()
        raise InputError(f"checkpoint {path} does not fit {name}: {first}", _FIT_HINT) from None
    model.eval()
    return LoadedModel(model=model, name=name, num_classes=_classes(model, num_classes),
                       weights_path=os.path.abspath(path), weights_sha256=sha256_file(path), random_weights=False,
                       seed=None)


def _classes(model: nn.Module, asked: int | None) -> int:
    """The class count: as asked (ours, timm), else the factory model's own head."""
    if asked is not None:
        return asked
    from rexport.models.external import output_classes

    return output_classes(model) or 0


# --- reading files ----------------------------------------------------------------------------

def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON object."""
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def _read_safetensors(p: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except SafetensorError as e:
        raise InputError(f"checkpoint {p} is not a valid safetensors file ({e})",
                         "fetch it again, or save it again from the training run") from None


def _read_torch(p: Path, head: bytes, trust_checkpoint: bool) -> Any:
    if trust_checkpoint:
        warnings.warn(f"loading {p} with full pickle (--trust-checkpoint): the file can run arbitrary code",
                      UserWarning, stacklevel=3)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error says what matters
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found and not trust_checkpoint:
            raise InputError(f"checkpoint {p} would run code when loaded (it references {found.group(1)}); "
                             "refused", _TRUST_HINT) from None
        code = _code_references(p) if head[:1] == b"\x80" else None
        if code and not trust_checkpoint:
            raise InputError(f"checkpoint {p} would run code when loaded (it references {code}); refused",
                             _TRUST_HINT) from None
    except MemoryError:
        raise InputError(f"checkpoint {p} does not fit in memory", "use a smaller checkpoint") from None
    except Exception:  # torch raises RuntimeError, EOFError, KeyError, ... for files it cannot parse
        pass
    raise _unreadable(p, head)


_SAFE_PICKLE_MODULES = ("torch", "collections", "_codecs", "numpy", "builtins.set", "builtins.frozenset")


def _code_references(p: Path) -> str | None:
    """The first global a raw pickle would import outside torch's tensor machinery, if any."""
    import pickletools

    strings: list[str] = []
    try:
        with open(p, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    name = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                else:
                    if isinstance(arg, str):
                        strings.append(arg)
                    continue
                if not name.startswith(_SAFE_PICKLE_MODULES):
                    return name
    except Exception:  # a truncated or non-pickle file: nothing to say about code
        return None
    return None


def _unreadable(p: Path, head: bytes) -> InputError:
    """Say whether a file torch.load rejected is a damaged checkpoint or not a checkpoint at all."""
    damaged = "fetch it again, or save it again from the training run"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(p):
            return InputError(f"checkpoint {p} is damaged (a truncated or corrupt torch.save archive)", damaged)
        return InputError(f"checkpoint {p} is a damaged or unsupported torch.save archive", damaged)
    if head[:1] == b"\x80":
        return InputError(f"checkpoint {p} is a damaged or unsupported pickle (legacy torch.save format)", damaged)
    return InputError(f"checkpoint {p} is not a PyTorch checkpoint or safetensors file",
                      "pass a .pth/.pt saved by torch.save, or a .safetensors file")


# --- finding the state dict -------------------------------------------------------------------

def _plain_state_dict(obj: Any, p: Path) -> dict[str, Tensor]:
    state = _unwrap(obj)
    if state is None:
        found = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, Mapping) else type(obj).__name__
        raise InputError(f"checkpoint {p} holds no state dict (found: {found or 'an empty dict'})",
                         "save model.state_dict(), or a dict with it under 'state_dict' or 'model'") from None
    keys = list(state)
    for prefix in _WRAPPER_PREFIXES * 2:  # e.g. "module._orig_mod." needs two passes
        if keys and all(k.startswith(prefix) for k in keys):
            state = {k[len(prefix):]: v for k, v in state.items()}
            keys = list(state)
    return dict(state)


def _unwrap(obj: Any, depth: int = 0) -> dict[str, Tensor] | None:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if not isinstance(obj, Mapping) or depth > 3:
        return None
    for key in _WRAPPER_KEYS:
        if key in obj:
            found = _unwrap(obj[key], depth + 1)
            if found:
                return found
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    return tensors or None


# --- explaining a mismatch --------------------------------------------------------------------

def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _listed(items: list[str], what: str) -> list[str]:
    out = items[:_MAX_LISTED]
    if len(items) > _MAX_LISTED:
        out.append(f"{len(items) - _MAX_LISTED} more {what}")
    return out


def _mismatches(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """One line naming the first few missing, unexpected and wrongly shaped keys; '' if all fit."""
    missing = [k for k in expected if k not in state and not _is_counter(k)]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = _listed([f"{k} missing" for k in missing], "missing")
    parts += _listed([f"{k} unexpected" for k in unexpected], "unexpected")
    parts += _listed([f"{k} has shape {_shape(state[k])}, model wants {_shape(expected[k])}" for k in wrong],
                     "with wrong shapes")
    return "; ".join(parts)


def _is_counter(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def _fit_hint(state: Mapping[str, Tensor], asked: str) -> str:
    """Name the known architecture whose keys and shapes (head aside) match the checkpoint, if any."""
    def body(sd: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.") and not _is_counter(k)}

    ours = body(state)
    for name, build in MODELS.items():
        if name == asked:
            continue
        with torch.device("meta"):
            ref = build().state_dict()
        if ours == body(ref):
            return f"{_FIT_HINT} (it looks like {name})"
    return f"{_FIT_HINT} (known: {', '.join(MODELS)})"


def _builder(name: str):
    """(build(num_classes=...), the head's state-dict key, the default class count) for ``name``."""
    from rexport.models.external import is_external, resolve

    if is_external(name):
        ext = resolve(name)
        return (lambda num_classes: ext.build(num_classes)), ext.head_key, (None if ext.head_key is None else 1000)
    try:
        return MODELS[name], "fc.weight", 1000
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(MODELS), n=1)
        hint = f"did you mean {close[0]}?" if close else "pick one of the known models"
        raise InputError(f"unknown model {name!r}; known: {', '.join(MODELS)}", hint) from None
