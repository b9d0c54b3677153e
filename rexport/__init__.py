"""rexport: ResNet classifiers from PyTorch to validated, measured inference engines."""

__version__ = "0.1.0"
