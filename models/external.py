"""Models from outside our ResNet family: ``timm:<name>`` (timm, an optional extra) and
``pkg.module:function`` (a user's own ``nn.Module`` factory).

Both give a builder ``build(num_classes=...) -> nn.Module`` plus the state-dict key of the
classifier head, so checkpoint loading (models/checkpoint.py) applies one set of safety rules
to every model. Nothing is downloaded: timm models are always created with ``pretrained=False``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

from rexport.core.errors import InputError

TIMM_PREFIX = "timm:"
TIMM_INSTALL = "pip install 'rexport[timm]'"


@dataclass(frozen=True)
class ExternalModel:
    """How to build an outside model: ``build(num_classes)`` (None: the model's own default)."""

    name: str
    build: Callable[[int | None], nn.Module]
    head_key: str | None          # e.g. "fc.weight": the key that tells a checkpoint's class count


def is_external(name: str) -> bool:
    """``timm:<name>`` or ``module:function``; our own names have no colon."""
    return isinstance(name, str) and ":" in name


def check_name(name: str) -> None:
    """Refuse a malformed outside-model name up front, without importing anything heavy."""
    if name.startswith(TIMM_PREFIX):
        if not name[len(TIMM_PREFIX):]:
            raise InputError("--model timm: needs a model name", "e.g. --model timm:resnet50d")
        if importlib.util.find_spec("timm") is None:
            raise InputError(f"--model {name} needs timm, which is not installed", TIMM_INSTALL)
        return
    module, _, func = name.partition(":")
    if not module or not func or not all(p.isidentifier() for p in module.split(".")) or not func.isidentifier():
        raise InputError(f"bad --model {name!r}",
                         "use one of our ResNets, timm:<name>, or a factory as pkg.module:function")


def resolve(name: str) -> ExternalModel:
    """The builder for ``timm:<name>`` or ``module:function`` (imports timm / the module now)."""
    check_name(name)
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name[len(TIMM_PREFIX):])
    return _factory_model(name)


# --- timm ------------------------------------------------------------------------------------

def _import_timm():
    try:
        import timm
    except ImportError as e:  # timm itself, or one of its imports (torchvision) is missing or broken
        raise InputError(f"timm cannot be imported ({e})", TIMM_INSTALL) from None
    return timm


def _timm_model(arch: str) -> ExternalModel:
    timm = _import_timm()
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        raise InputError(f"timm has no model {arch!r}",
                         f"did you mean timm:{close[0]}?" if close else "see timm.list_models()")

    def build(num_classes: int | None) -> nn.Module:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(arch, pretrained=False, **kwargs)

    classifier = (_timm_cfg(arch).get("classifier") or "fc")
    return ExternalModel(name=TIMM_PREFIX + arch, build=build, head_key=f"{classifier}.weight")


def _timm_cfg(arch: str) -> dict:
    timm = _import_timm()
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:  # a name without a pretrained tag: the model's default config
        cfg = timm.create_model(arch, pretrained=False).pretrained_cfg
    return cfg if isinstance(cfg, dict) else cfg.to_dict()


def timm_preprocess(name: str) -> dict:
    """The preprocessing timm's pretrained config gives ``timm:<arch>``: input size, resize (from
    crop_pct), mean, std and interpolation, as PreprocessSpec fields."""
    cfg = _timm_cfg(name[len(TIMM_PREFIX):])
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop = float(cfg.get("crop_pct") or 0.875)
    interp = cfg.get("interpolation") or "bilinear"
    return {"input_size": size, "resize": max(size, int(size / crop)),
            "mean": tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
            "interpolation": interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear"}


# --- user factories ----------------------------------------------------------------------------

def _factory_model(name: str) -> ExternalModel:
    module_name, _, func_name = name.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `python -m` would: a factory in the working directory is found
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise InputError(f"cannot import {module_name} for --model {name} ({e})",
                         "run from the folder that holds it, or put it on PYTHONPATH") from None
    except Exception as e:  # the user's module failed while importing
        raise InputError(f"importing {module_name} for --model {name} failed: {type(e).__name__}: {e}",
                         "fix the module so that it imports") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InputError(f"{module_name} has no function {func_name!r}", "pass --model pkg.module:function")
    takes_classes = _accepts(func, "num_classes")

    def build(num_classes: int | None) -> nn.Module:
        if num_classes is not None and not takes_classes:
            raise InputError(f"{name} takes no num_classes argument", "leave --num-classes out")
        try:
            model = func(num_classes=num_classes) if num_classes is not None else func()
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{name}() failed: {type(e).__name__}: {e}", "fix the factory") from None
        if not isinstance(model, nn.Module):
            raise InputError(f"{name}() returned {type(model).__name__}, not a torch.nn.Module",
                             "return the model from the factory")
        return model

    return ExternalModel(name=name, build=build, head_key=None)


def _accepts(func: Callable, arg: str) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def linear_head(model: nn.Module) -> tuple[str | None, int | None]:
    """(state-dict key of the last Linear's weight, its out_features), or (None, None)."""
    found: tuple[str | None, int | None] = (None, None)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            found = (f"{name}.weight" if name else "weight", m.out_features)
    return found


def output_classes(model: nn.Module) -> int | None:
    """The class count of a model whose last layer is a Linear (or 1x1 Conv) head, if it has one."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, nn.Conv2d):
            last = m.out_channels
    return last
