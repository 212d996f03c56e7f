"""torchvision's ResNet-18/50 for ImageNet-sized inputs (randomly initialised; no weights are downloaded).

torchvision is imported inside the factories: importing it costs about a second, which every ``certkit``
command would otherwise pay for models it never builds.
"""

from __future__ import annotations

from torch import nn

from certkit.models.registry import register_model


@register_model("resnet18", "torchvision ResNet-18 (ImageNet)", family="imagenet")
def resnet18(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    from torchvision.models import resnet18 as build

    return build(weights=None, num_classes=num_classes)


@register_model("resnet50", "torchvision ResNet-50 (ImageNet)", family="imagenet")
def resnet50(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    from torchvision.models import resnet50 as build

    return build(weights=None, num_classes=num_classes)
