"""WideResNet (Zagoruyko & Komodakis 2016), pre-activation, for CIFAR-sized inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certkit.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False) if stride != 1 or inplanes != planes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout:
            o = F.dropout(o, self.dropout, self.training)
        return self.conv2(o) + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n+4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        inplanes = widths[0]
        for stage, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(inplanes, stage, stride if i == 0 else 1, dropout))
                inplanes = stage
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(inplanes)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("wrn16_4", "WideResNet-16-4", family="cifar")
def wrn16_4(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return WideResNet(16, 4, num_classes, in_shape[0])


@register_model("wrn28_10", "WideResNet-28-10", family="cifar")
def wrn28_10(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return WideResNet(28, 10, num_classes, in_shape[0])
