"""Layers shared by the zoo."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer.

    Keeping normalization inside the model means noise is added in [0, 1] pixel space and radii are in pixel
    units; mean and std are buffers, so they travel with the checkpoint and cannot be forgotten at load time
    (the cause of the ~30%-accuracy reports on released checkpoints of public code bases).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have one value per channel")
        if any(s <= 0 for s in std):
            raise ValueError("std must be positive")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
