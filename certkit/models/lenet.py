"""LeNet of the randomized-smoothing literature and a smaller CNN for cheap teachers."""

from __future__ import annotations

import torch
from torch import nn

from certkit.models.registry import register_model


def _flat_size(features: nn.Module, in_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *in_shape)).numel())


class LeNet(nn.Module):
    """conv 20@5x5 → ReLU → maxpool 2 → conv 50@5x5 → ReLU → maxpool 2 → fc 500 → ReLU → fc.

    The MNIST/Fashion-MNIST network of Cohen et al.'s successors (SmoothAdv, MACER, Consistency, SmoothMix,
    CAT-RS); on 28×28 inputs the first fully-connected layer is 800 → 500 as in those code bases.
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(_flat_size(self.features, in_shape), 500), nn.ReLU(), nn.Linear(500, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """conv 16@3x3 → pool → conv 32@3x3 → pool → fc 128 → fc: ~4× cheaper than LeNet on 28×28.

    Used as the *cheap teacher* of the CRT demo: the expensive method is paid on a small network once and
    transferred to a larger student.
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_shape[0], 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(_flat_size(self.features, in_shape), 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet", "LeNet (conv20-conv50-fc500), the MNIST/Fashion-MNIST net of the RS literature")
def lenet(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return LeNet(num_classes, in_shape)


@register_model("smallcnn", "small fast CNN (conv16-conv32-fc128) for cheap teachers")
def smallcnn(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return SmallCNN(num_classes, in_shape)
