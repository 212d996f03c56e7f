"""Consistency regularization (Jeong & Shin, NeurIPS 2020).

A smoothed classifier is robust when the base classifier says the *same thing* under every noise draw, not
merely the right thing on average. Consistency adds to Gaussian augmentation a KL term pulling each noisy
prediction towards their mean p̄, and an entropy term keeping p̄ confident so the KL term cannot be
satisfied by a flat prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.objectives._smoothing import (
    LOG_FLOOR,
    draw_noises,
    input_gradient,
    mean_noisy_ce,
    noisy_accuracy,
    noisy_logits,
    project_l2,
    smoothed_nll,
    unit_l2,
    warmup_factor,
)
from certkit.objectives.base import Hypers, Objective, eval_mode, hyper

_E1 = 255 / 256  # the reference CLI's "255" (1/256 units)


def _row(lbd: float, epsilon: float) -> dict[str, Any]:
    return {"num_noise_vec": 2, "lbd": lbd, "eta": 0.5, "epsilon": epsilon}


# epsilon is the published SmoothAdv + Consistency radius (used only with --adv-training); the m and lambda
# of those runs differ from the plain ones: the consistency-adv-* recipes set them together
_DEFAULTS: dict[str, dict[float, dict[str, Any]]] = {
    "mnist": {0.25: _row(10.0, _E1), 0.5: _row(5.0, _E1), 1.0: _row(5.0, _E1)},
    "cifar10": {0.25: _row(20.0, _E1), 0.5: _row(10.0, 2.0), 1.0: _row(10.0, 2.0)},
}


@dataclass
class ConsistencyHypers(Hypers):
    """Consistency's hyperparameters (see :class:`Consistency`)."""

    TABLE = _DEFAULTS

    num_noise_vec: int = hyper(
        int,
        "m: noise draws per image, also chunks per batch (one optimizer step each)",
        minimum=2,
        why="with one draw the KL term is identically 0",
    )
    lbd: float = hyper(float, "lambda: weight of the KL term pulling each noisy prediction to their mean", minimum=0.0)
    eta: float = hyper(float, "eta: weight of the entropy of the mean prediction", minimum=0.0)
    adv_training: bool = hyper(
        bool,
        "train on SmoothAdv's L2 attack of each chunk with the same m draws (Jeong & Shin 2020's "
        "--adv-training; recipes consistency-adv-* set the published m, lambda, epsilon)",
        default=False,
    )
    epsilon: float = hyper(float, "adv-training: L2 attack radius in [0,1] pixel units", minimum=0.0)
    num_steps: int = hyper(int, "adv-training: T, attack steps (the published runs' 10)", default=10, minimum=1)
    warmup: int = hyper(
        int, "adv-training: epochs over which the attack radius ramps up linearly", default=10, minimum=1
    )


def consistency_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-input ``(1/m) Σ_j KL(p̄ ‖ p_j)`` and ``H(p̄)`` from ``(m, B, K)`` logits: two ``(B,)`` tensors.

    ``p̄`` is *not* detached, so the KL pulls the mean towards each draw as well as each draw towards the
    mean, as in the reference.
    """
    log_p = F.log_softmax(logits, dim=-1)
    p_bar = log_p.exp().mean(0)
    log_p_bar = torch.log(p_bar.clamp_min(LOG_FLOOR))
    kl = (p_bar.unsqueeze(0) * (log_p_bar.unsqueeze(0) - log_p)).sum(-1).mean(0)
    entropy = -(p_bar * log_p_bar).sum(-1)
    return kl, entropy


class Consistency(Objective):
    """Consistency regularization — Jeong & Shin, "Consistency Regularization for Certified Robustness of
    Smoothed Classifiers", NeurIPS 2020.

    For a chunk of images with ``m ≥ 2`` noise draws, ``p_j = softmax(f(x + n_j))`` and ``p̄ = (1/m) Σ_j p_j``::

        L = mean CE over all m·B noisy copies
            + mean over images of [ λ·(1/m) Σ_j KL(p̄ ‖ p_j) + η·H(p̄) ]

    with ``H(p̄) = −Σ_c p̄_c log max(p̄_c, 1e-20)``; ``p̄`` is not detached. Like the reference, each loader
    batch is split into ``m`` chunks with one optimizer step per chunk (``num_chunks = m``). With
    ``adv_training`` the chunk is first replaced by the reference's SmoothAdv attack on it, with the same
    ``m`` draws (:meth:`perturb`), as the paper's SmoothAdv + Consistency rows.

    Cost per training image: ``m`` forward and ``m`` backward passes.

    Arguments (left out: the published value of ``family``, default MNIST-like, at the nearest σ):
        sigma (float): noise level, pixel units.
        num_noise_vec (int): m ≥ 2, noise draws per image and chunks per batch (2). With m = 1 (the
            reference script's default) the KL term is identically 0, so it is rejected.
        lbd (float): λ, weight of the KL term (MNIST-like: 10, 5, 5 at σ = 0.25, 0.5, 1.0; CIFAR-10: 20, 10, 10).
        eta (float): η, weight of the entropy term (0.5).
        adv_training (bool): attack each chunk first (False); ``epsilon`` (MNIST-like 255/256; CIFAR-10
            255/256 at σ = 0.25, else 2.0), ``num_steps`` (10) and ``warmup`` (10) configure the attack.

    Shapes: ``x`` (B, C, H, W) in [0, 1]; ``y`` (B,) int64; the model returns (N, K) logits.

    Example::

        obj = Consistency.from_config(sigma=0.25, family="mnist")   # m = 2, λ = 10, η = 0.5
        loss, parts = obj(model, images, labels)                    # parts: ce, kl, entropy, acc
    """

    name = "consistency"
    graph_safe = True
    Params = ConsistencyHypers
    hp: ConsistencyHypers
    sigma: float

    @property
    def num_chunks(self) -> int:  # type: ignore[override]
        return self.hp.num_noise_vec

    def step_constants(self) -> tuple[object, ...]:
        return (warmup_factor(self.epoch, self.hp.warmup),)  # the attack's epsilon ramp

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, noises: Tensor) -> Tensor:
        """``x_adv`` of the consistency code's SmoothAdv attack: T steps of ``2ε_e/T`` along the per-example
        unit gradient (``‖∇‖ + 1e-8``) of the smoothed NLL over ``noises``, projected to ``‖δ‖ ≤ ε_e``, then
        clipped to [0, 1] (projection before clipping, unlike SmoothAdv's own attack); ``ε_e`` warms up as
        SmoothAdv's. Eval mode with parameter gradients off, restored afterwards."""
        epsilon = self.hp.epsilon * warmup_factor(self.epoch, self.hp.warmup)
        x = x.detach()
        if epsilon <= 0:
            return x
        step = 2.0 * epsilon / self.hp.num_steps
        adv = x
        with eval_mode(model) as net:
            for _ in range(self.hp.num_steps):
                grad = input_gradient(lambda a: smoothed_nll(net, a, noises, y), adv)
                adv = (x + project_l2(adv + step * unit_l2(grad, eps=1e-8) - x, epsilon)).clamp(0.0, 1.0)
        return adv.detach()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        noises = draw_noises(x, self.hp.num_noise_vec, self.sigma)
        if self.hp.adv_training:
            x = self.perturb(model, x, y, noises)
        logits = noisy_logits(model, x, noises)
        ce = mean_noisy_ce(logits, y)
        kl, entropy = consistency_terms(logits)
        loss = ce + (self.hp.lbd * kl + self.hp.eta * entropy).mean()
        parts = {
            "ce": ce.detach(),
            "kl": kl.detach().mean(),
            "entropy": entropy.detach().mean(),
            "acc": noisy_accuracy(logits, y),
        }
        return loss, parts
