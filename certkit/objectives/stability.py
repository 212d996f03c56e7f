"""Stability training (Zheng et al., CVPR 2016), the noise-stability baseline of the smoothing tables.

Instead of only classifying noisy inputs correctly (Gaussian augmentation), the model is asked to give a
noisy input the *same distribution* as its clean version, which also makes the clean prediction a soft
target for the noisy one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.objectives import register_objective
from certkit.objectives._smoothing import check_float, pick_hypers, resolve_hparams, table_defaults
from certkit.objectives.base import Objective

_DEFAULTS: dict[str, dict[float, dict[str, Any]]] = {
    "mnist": {0.25: {"lbd": 2.0}, 0.5: {"lbd": 2.0}, 1.0: {"lbd": 2.0}},
    "cifar10": {0.25: {"lbd": 2.0}, 0.5: {"lbd": 2.0}, 1.0: {"lbd": 1.0}},
}


@register_objective("stability")
class Stability(Objective):
    """Stability training — Zheng et al., "Improving the Robustness of Deep Neural Networks via Stability
    Training", CVPR 2016 (as the baseline of Li et al. 2019 and the smoothing re-implementations).

    ``L = CE(f(x), y) + λ·CE_soft(target = softmax(f(x)), prediction = f(x + η))`` with one noise draw
    ``η ~ N(0, σ²I)`` per image. The soft target is detached, i.e. used as a label: its gradient then equals
    that of ``KL(p(x) ‖ p(x + η))`` for the noisy side, whereas a trained target would also minimise the
    clean prediction's entropy (the extra ``H(p(x))`` in a cross-entropy) and, at λ = 2, collapses a small
    model onto one class. The clean and the noisy batch go through the model in two separate passes so
    BatchNorm statistics are not mixed.

    Cost per training image: 2 forward and 2 backward passes.

    Arguments (``None`` takes the CIFAR-10 default at the nearest σ):
        sigma (float): noise level, pixel units.
        lbd (float): λ, weight of the stability term (2.0; CIFAR-10 at σ = 1.0: 1.0).

    Shapes: ``x`` (B, C, H, W) in [0, 1]; ``y`` (B,) int64; the model returns (N, K) logits.

    Example::

        obj = Stability.from_config(sigma=0.5, family="mnist")   # λ = 2
        loss, parts = obj(model, images, labels)                 # parts: ce, stab, acc
    """

    HYPERS = pick_hypers("lbd")

    def __init__(self, sigma: float, lbd: float | None = None, **unknown: Any) -> None:
        super().__init__(sigma, **resolve_hparams("stability", _DEFAULTS, sigma, {"lbd": lbd}), **unknown)
        self.lbd = check_float(self.name, "lbd", self.hparams["lbd"])

    @classmethod
    def defaults(cls, family: str, sigma: float) -> dict[str, Any]:
        return table_defaults("stability", _DEFAULTS, family, sigma)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # one training forward of 2B samples (DistributedDataParallel-safe); the reference makes two calls
        logits_clean, logits_noisy = model(torch.cat([x, x + self.noise(x)])).chunk(2)
        ce = F.cross_entropy(logits_clean, y)
        target = F.softmax(logits_clean.detach(), dim=1)
        stab = -(target * F.log_softmax(logits_noisy, dim=1)).sum(1).mean()
        loss = ce + self.lbd * stab
        acc = (logits_noisy.detach().argmax(1) == y).float().mean()
        return loss, {"ce": ce.detach(), "stab": stab.detach(), "acc": acc}
