"""Stability training (Zheng et al., CVPR 2016), the noise-stability baseline of the smoothing tables.

Instead of only classifying noisy inputs correctly (Gaussian augmentation), the model is asked to give a
noisy input the *same distribution* as its clean version, which also makes the clean prediction a soft
target for the noisy one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.objectives.base import Hypers, Objective, hyper


def _row(lbd: float) -> dict[str, Any]:
    return {"lbd": lbd, "detach_target": True}


_DEFAULTS: dict[str, dict[float, dict[str, Any]]] = {
    "mnist": {0.25: _row(2.0), 0.5: _row(2.0), 1.0: _row(2.0)},
    "cifar10": {0.25: _row(2.0), 0.5: _row(2.0), 1.0: _row(1.0)},
}


@dataclass
class StabilityHypers(Hypers):
    """Stability training's hyperparameters (see :class:`Stability`)."""

    TABLE = _DEFAULTS

    lbd: float = hyper(float, "lambda: weight of the stability term", minimum=0.0)
    detach_target: bool = hyper(
        bool, "true = softmax(f(x)) is a fixed label; false = also train through it, as the reference code does"
    )


class Stability(Objective):
    """Stability training — Zheng et al., "Improving the Robustness of Deep Neural Networks via Stability
    Training", CVPR 2016 (as the baseline of Li et al. 2019 and the smoothing re-implementations).

    ``L = CE(f(x), y) + λ·CE_soft(target = softmax(f(x)), prediction = f(x + η))`` with one noise draw
    ``η ~ N(0, σ²I)`` per image.

    By default the soft target is detached, i.e. used as a label: its gradient then equals that of
    ``KL(p(x) ‖ p(x + η))`` for the noisy side. The reference code (``train_stab.py`` of the Consistency and
    SmoothMix code bases) also trains through the target, which adds ``λ·H(p(x))`` to what is minimised (a
    cross-entropy is ``KL + H(target)``): at λ = 2 that entropy term can drive a freshly initialised model
    to one confident class. On Fashion-MNIST it did so for 1 of 2 seeds with SGD (lr 0.05, batch 32) and
    1 of 4 with Adam (lr 1e-3), while the detached form learned in every run. ``detach_target=False``
    gives the reference's gradient exactly (it trains with the published SGD recipe, lr 0.01).

    The clean and the noisy batch share one training forward pass of ``2B`` samples (the reference makes
    two calls), so the step is DistributedDataParallel-safe; BatchNorm, if any, normalises over both.

    Cost per training image: 2 forward and 2 backward passes.

    Arguments (left out: the published value of ``family``, default MNIST-like, at the nearest σ):
        sigma (float): noise level, pixel units.
        lbd (float): λ, weight of the stability term (2.0; CIFAR-10 at σ = 1.0: 1.0).
        detach_target (bool): stop the gradient through ``softmax(f(x))`` in the soft term (True;
            False = the reference code's gradient).

    Shapes: ``x`` (B, C, H, W) in [0, 1]; ``y`` (B,) int64; the model returns (N, K) logits.

    Example::

        obj = Stability.from_config(sigma=0.5, family="mnist")   # λ = 2
        loss, parts = obj(model, images, labels)                 # parts: ce, stab, acc
    """

    name = "stability"
    graph_safe = True

    def step_constants(self) -> tuple[object, ...]:
        return ()  # no schedule

    Params = StabilityHypers
    hp: StabilityHypers

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # one training forward of 2B samples (DistributedDataParallel-safe); the reference makes two calls
        logits_clean, logits_noisy = model(torch.cat([x, x + self.noise(x)])).chunk(2)
        ce = F.cross_entropy(logits_clean, y)
        target = F.softmax(logits_clean.detach() if self.hp.detach_target else logits_clean, dim=1)
        stab = -(target * F.log_softmax(logits_noisy, dim=1)).sum(1).mean()
        loss = ce + self.hp.lbd * stab
        acc = (logits_noisy.detach().argmax(1) == y).float().mean()
        return loss, {"ce": ce.detach(), "stab": stab.detach(), "acc": acc}
