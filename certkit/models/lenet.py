"""LeNet of the randomized-smoothing literature and a smaller CNN for cheap teachers."""

from __future__ import annotations

import torch
from torch import nn

from certkit.models.layers import FirstConv, Pool2x2, WideLinear
from certkit.models.registry import register_model


def _flat_size(features: nn.Module, in_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *in_shape)).numel())


def _conv_pool_relu(in_channels: int, out_channels: int, kernel: int, padding: int = 0) -> list[nn.Module]:
    """conv → 2×2 max-pool → ReLU: the same function and gradients as the papers' conv → ReLU → max-pool.

    ReLU is monotone, so it commutes with max exactly (in floating point too), and the gradient reaches the
    same element either way (a window with no positive value passes none in both orders). Pooling first
    runs the ReLU and its backward on a quarter of the elements, which on a CPU is a sizeable share of a
    small network's step. The parameter names (``features.0``, ``features.3``) are those of either order.
    A first convolution on one-channel images is a :class:`~certkit.models.layers.FirstConv`; the pool is a
    :class:`~certkit.models.layers.Pool2x2` (no argmax indices where no gradient is taken).
    """
    conv = FirstConv if in_channels == 1 else nn.Conv2d  # a faster input gradient for attacks on CPU
    return [conv(in_channels, out_channels, kernel, padding=padding), Pool2x2(), nn.ReLU()]


class LeNet(nn.Module):
    """conv 20@5x5 → ReLU → maxpool 2 → conv 50@5x5 → ReLU → maxpool 2 → fc 500 → ReLU → fc.

    The MNIST/Fashion-MNIST network of Cohen et al.'s successors (SmoothAdv, MACER, Consistency, SmoothMix,
    CAT-RS); on 28×28 inputs the first fully-connected layer is 800 → 500 as in those code bases. Each ReLU
    runs after its max-pool (:func:`_conv_pool_relu`: the same function, cheaper).
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(*_conv_pool_relu(in_shape[0], 20, 5), *_conv_pool_relu(20, 50, 5))
        self.classifier = nn.Sequential(
            nn.Flatten(), WideLinear(_flat_size(self.features, in_shape), 500), nn.ReLU(), nn.Linear(500, num_classes)
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
            *_conv_pool_relu(in_shape[0], 16, 3, padding=1), *_conv_pool_relu(16, 32, 3, padding=1)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), WideLinear(_flat_size(self.features, in_shape), 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet", "LeNet (conv20-conv50-fc500), the MNIST/Fashion-MNIST net of the RS literature")
def lenet(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return LeNet(num_classes, in_shape)


@register_model("smallcnn", "small fast CNN (conv16-conv32-fc128) for cheap teachers")
def smallcnn(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
    return SmallCNN(num_classes, in_shape)
