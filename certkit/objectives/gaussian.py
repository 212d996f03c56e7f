"""Gaussian noise augmentation (Cohen, Rosenfeld & Kolter, ICML 2019).

Loss: ``CE(f(x + eta), y)`` with ``eta ~ N(0, sigma^2 I)`` drawn fresh for every sample at every step. This
is the baseline every other method is measured against, and the cost unit of the ledger (1 forward and 1
backward pass per image).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from certkit.objectives.base import Objective


class Gaussian(Objective):
    """Cross-entropy on one Gaussian-noisy copy of each image.

    Example::

        obj = Gaussian(sigma=0.25)
        loss, parts = obj(model, images, labels)   # images (B,C,H,W) in [0,1]
    """

    name = "gaussian"
    graph_safe = True

    def step_constants(self) -> tuple[object, ...]:
        return ()  # no schedule

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(x + self.noise(x)).float()  # fp32 loss under --amp (objectives.base)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        return loss, {"ce": loss.detach(), "acc": acc}
