"""Stability training (Zheng et al., CVPR 2016), the noise-stability baseline of the smoothing tables.

Instead of only classifying noisy inputs correctly (Gaussian augmentation), the model is asked to give a
noisy input the *same distribution* as its clean version, which also makes the clean prediction a soft
target for the noisy one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from certkit.objectives.base import Hypers, Objective, hyper


def _row(lbd: float) -> dict[str, Any]:
    return {"lbd": lbd, "detach_target": False}


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

    By default the gradient is the reference code's (``train_stab.py`` of the Consistency and SmoothMix code
    bases): it also flows through the soft target, which adds ``λ·H(p(x))`` to what is minimised (a
    cross-entropy is ``KL + H(target)``). At λ = 2 that entropy term can drive a freshly initialised model to
    one confident class with rates above the published ones: on Fashion-MNIST it did so for 1 of 2 seeds with
    SGD (lr 0.05, batch 32) and 1 of 4 with Adam (lr 1e-3), while it trains with the published SGD recipe
    (lr 0.01). ``detach_target=True`` uses the target as a fixed label instead (its gradient is then that of
    ``KL(p(x) ‖ p(x + η))`` for the noisy side), which learned in every one of those runs.

    The clean and the noisy batch go through the model in two calls, as in the reference code, so that a
    network with BatchNorm normalises each over its own batch.

    Cost per training image: 2 forward and 2 backward passes.

    Arguments (left out: the published value of ``family``, default MNIST-like, at the nearest σ):
        sigma (float): noise level, pixel units.
        lbd (float): λ, weight of the stability term (2.0; CIFAR-10 at σ = 1.0: 1.0).
        detach_target (bool): stop the gradient through ``softmax(f(x))`` in the soft term (False, the
            reference code's gradient; True = a fixed label).

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
        # fp32 loss terms under --amp (objectives.base)
        logits_clean = model(x).float()
        logits_noisy = model(x + self.noise(x)).float()
        ce = F.cross_entropy(logits_clean, y)
        target = F.softmax(logits_clean.detach() if self.hp.detach_target else logits_clean, dim=1)
        stab = -(target * F.log_softmax(logits_noisy, dim=1)).sum(1).mean()
        loss = ce + self.hp.lbd * stab
        acc = (logits_noisy.detach().argmax(1) == y).float().mean()
        return loss, {"ce": ce.detach(), "stab": stab.detach(), "acc": acc}
