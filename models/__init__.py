"""Our ResNet family (torchvision state-dict compatible) and checkpoint loading."""
from rexport.models.resnet import MODELS, BasicBlock, Bottleneck, ResNet

__all__ = ["MODELS", "BasicBlock", "Bottleneck", "ResNet"]
