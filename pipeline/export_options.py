"""The export stage's options as the user gives them (input size, mean/std, a labels file...):
the source of ``rexport export``'s and ``rexport run``'s export options and config keys.
``to_settings()`` makes the ExportSettings record (defaults filled in, labels read)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from rexport.core.settings import setting

MODEL_HELP = ("resnet18, resnet34, resnet50, resnet101, resnet152, wide_resnet50_2, resnext50_32x4d, "
              "timm:<name> or pkg.module:function.")


@dataclass(frozen=True)
class ExportOptions:
    model: str = setting("resnet18", help=MODEL_HELP)
    weights: str | None = setting(None, help="Checkpoint (.pth/.pt/.safetensors); none = seeded random init.")
    num_classes: int | None = setting(None, help="Head size (default: from the checkpoint, else 1000).")
    trust_checkpoint: bool = setting(False, help="Allow pickles that run code. Only for files you trust.")
    seed: int = setting(0, help="Seed of the random init.")
    opset: int | None = setting(None, help="ONNX opset (default 17: TensorRT 8.5 and later).")
    input_size: int | None = setting(None, help="Input side in pixels (default 224, or timm's pretrained config).")
    resize: int | None = setting(None, help="Shorter side before the centre crop (default input*256/224).")
    mean: tuple[float, float, float] | None = setting(None, help="Per-channel mean (default ImageNet).")
    std: tuple[float, float, float] | None = setting(None, help="Per-channel std (default ImageNet).")
    bgr: bool = setting(False, help="The model expects BGR channel order.")
    labels: str | None = setting(None, help="Text file with one class name per line.")
    batch: str = setting("dynamic", help="'dynamic' or a fixed batch size.")
    onnx: str | None = setting(None, help="Start from this ONNX classifier instead of a PyTorch model "
                                          "(what 'rexport import' does); --model and --weights are then unused.")
    fold_preprocessing: bool = setting(False, help="Every variant and engine takes raw uint8 NHWC pixels at the "
                                                   "input size: scaling, mean/std and layout inside the graph.")

    def to_settings(self):
        """ExportSettings, or ImportSettings when the run starts from an ONNX file (--onnx)."""
        from rexport.pipeline.export import export_settings_from_options

        values = asdict(self)
        if values.pop("onnx") is not None:
            from rexport.pipeline.import_onnx import import_settings_from_options

            keep = ("opset", "input_size", "resize", "mean", "std", "bgr", "labels", "batch", "fold_preprocessing")
            return import_settings_from_options(onnx=self.onnx, **{k: values[k] for k in keep})
        return export_settings_from_options(**values)
