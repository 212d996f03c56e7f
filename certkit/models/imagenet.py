"""torchvision's ResNet-18/50 for ImageNet-sized inputs (randomly initialised; no weights are downloaded)."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from certkit.models import register_model


@register_model("resnet18", "torchvision ResNet-18 (ImageNet)", family="imagenet")
def resnet18(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return tvm.resnet18(weights=None, num_classes=num_classes)


@register_model("resnet50", "torchvision ResNet-50 (ImageNet)", family="imagenet")
def resnet50(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return tvm.resnet50(weights=None, num_classes=num_classes)
