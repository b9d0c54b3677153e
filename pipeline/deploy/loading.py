"""Open one model of a bundle folder the way its layout's server would (``rexport infer BUNDLE_DIR``)."""
from __future__ import annotations

import json
from pathlib import Path

from rexport.core.errors import InputError
from rexport.core.preprocess import PreprocessSpec
from rexport.pipeline.deploy import get_format, writer
from rexport.pipeline.deploy.serving import Served, ServedTensor


def open_bundle_model(root: Path, model: str | None) -> tuple[Served, tuple[str, ...] | None, str, Path | None]:
    """(served model, the bundle's class names, the model's name in the layout, the file it runs)."""
    manifest = json.loads((root / "bundle.json").read_text(encoding="utf-8"))
    spec = PreprocessSpec.from_dict(manifest.get("preprocess") or {})
    fmt = get_format(str(manifest.get("format") or "folder"))
    if fmt.module is None:
        names = list(manifest.get("variants") or {})
    else:
        names = writer(fmt).served_models(root)
    if not names:
        raise InputError(f"{root} holds no model", "bundle again")
    name = model or names[0]
    if name not in names:
        raise InputError(f"no model {name!r} in {root} ({fmt.name} layout)", f"choose from: {', '.join(names)}")
    if fmt.module is None:
        from rexport.pipeline.infer import open_artifact

        path = root / manifest["variants"][name]["path"]
        runner, own = open_artifact(path)
        served = Served(runner, ServedTensor("", (-1, *own.input_shape), "float32"), own.load_image,
                        own.labels or (), f"run_engine.py layout: {path.relative_to(root)}", path)
    else:
        served = writer(fmt).open_served(root, name, spec, bool(manifest.get("folded_preprocessing")))
    return served, spec.labels, name, served.path
