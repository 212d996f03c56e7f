"""SmoothAdv: adversarial training of the smoothed classifier (Salman et al., NeurIPS 2019).

Gaussian augmentation trains the base classifier to be right *on average* under noise; SmoothAdv trains
it on the points where the *smoothed* classifier is weakest. It attacks the soft smoothed prediction p̄
(a differentiable stand-in for the hard vote) with L2 PGD and trains on the noisy copies of the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from certkit.objectives._smoothing import (
    check_finite,
    draw_noises,
    input_gradient,
    l2_norms,
    mean_noisy_ce,
    noisy_accuracy,
    noisy_logits,
    project_l2,
    smoothed_nll,
    smoothed_nll_from_logits,
    unit_l2,
    warmup_factor,
)
from certkit.objectives.base import Hypers, Objective, eval_mode, hyper

_E1 = 255 / 256  # the reference CLI's "255" (1/256 units), i.e. ≈ 1.0 in pixel units

#: Salman et al.'s published PGD configurations (MNIST-like rows: the SmoothMix re-implementation's LeNet runs)
_DEFAULTS: dict[str, dict[float, dict[str, Any]]] = {
    "mnist": {s: {"epsilon": _E1, "num_steps": 10, "num_noise_vec": 4, "warmup": 10} for s in (0.25, 0.5, 1.0)},
    "cifar10": {
        0.25: {"epsilon": 1.0, "num_steps": 10, "num_noise_vec": 4, "warmup": 10},
        0.5: {"epsilon": 1.0, "num_steps": 10, "num_noise_vec": 8, "warmup": 10},
        1.0: {"epsilon": 2.0, "num_steps": 10, "num_noise_vec": 2, "warmup": 10},
    },
}


@dataclass
class SmoothAdvHypers(Hypers):
    """SmoothAdv's hyperparameters (see :class:`SmoothAdv`)."""

    TABLE = _DEFAULTS

    epsilon: float = hyper(
        float, "L2 attack radius in [0,1] pixel units (255/256 ≈ 1.0; the reference CLI takes 1/256 units)", minimum=0.0
    )
    num_steps: int = hyper(int, "T: PGD steps", minimum=1)
    num_noise_vec: int = hyper(
        int, "m: noise draws per image, also chunks per batch (one optimizer step each)", minimum=1
    )
    warmup: int = hyper(int, "epochs over which the attack radius ramps up linearly", minimum=1)
    attack: str = hyper(
        str,
        "pgd (every published run) or ddn (the reference script's default attack: Rony et al.'s decoupled "
        "direction and norm, Salman et al. 2019)",
        default="pgd",
        choices=("pgd", "ddn"),
    )
    ddn_gamma: float = hyper(
        float,
        "DDN: factor by which the attack norm shrinks or grows per step (Salman et al.'s 0.05)",
        default=0.05,
        minimum=0.0,
        maximum=1.0,
    )


#: DDN rounds x + δ to this many grey levels, as the reference attack does by default
DDN_LEVELS = 256


def quantize(t: Tensor) -> Tensor:
    """Round to the ``DDN_LEVELS`` grey levels of an 8-bit image."""
    return (t * (DDN_LEVELS - 1)).round() / (DDN_LEVELS - 1)


class SmoothAdv(Objective):
    """SmoothAdv with the multi-noise PGD attack — Salman et al., "Provably Robust Deep Learning via
    Adversarially Trained Smoothed Classifiers", NeurIPS 2019.

    Per chunk of images ``x`` with labels ``y``:

    1. draw ``m`` noise vectors per image, used by both the attack and the update (the same draws);
    2. L2 PGD on ``ℓ(x + δ) = −log max(p̄(x + δ)_y, 1e-20)``, ``p̄ = (1/m) Σ_j softmax(f(x + δ + n_j))``:
       ``δ₀ = 0`` (no random start, as in every published run), then ``T`` times: per-example unit-norm
       gradient (a random unit direction where it is exactly 0), ``δ += 2ε/T · g``, clip ``x + δ`` into
       [0, 1], rescale to ``‖δ‖₂ ≤ ε``. One δ per image is shared by its ``m`` noisy copies. The attack runs
       in eval mode with parameter gradients off;
    3. loss = mean cross-entropy over all ``m`` copies ``f(x + δ + n_j)`` (the multi-noise option used in
       every published configuration).

    The radius warms up: ``ε_e = min(ε, (e + 1)·ε / warmup)`` for 0-based epoch ``e``, and the step ``2ε_e/T``
    follows it. Like the reference, each loader batch is split into ``m`` chunks with one optimizer step
    per chunk (``num_chunks = m``), so every forward pass still sees ``B`` noisy samples.

    A non-finite loss raises :class:`~certkit.objectives._smoothing.DivergenceError` (a ``CertkitError``)
    before the optimizer sees it: large ε is known to diverge (Salman et al.'s CIFAR-10 runs at σ = 1.0,
    ε ≈ 1, m = 4 and at σ = 0.5, ε = 2, m = 8 fell to chance).

    Cost per training image: ``m(T + 1)`` forward and ``m(T + 1)`` backward passes of noisy samples, ``m·T``
    of the backward passes for input gradients only.

    Arguments (left out: the published value of ``family``, default MNIST-like, at the nearest σ):
        sigma (float): noise level of training and certification, pixel units.
        epsilon (float): L2 attack radius in [0, 1] pixel units (MNIST-like: 255/256; CIFAR-10: 1.0, 1.0,
            2.0 at σ = 0.25, 0.5, 1.0). The reference CLI takes it in 1/256 units; divide by 256.
        num_steps (int): T, PGD steps (10).
        num_noise_vec (int): m, noise draws per image and chunks per batch (MNIST-like: 4; CIFAR-10: 4, 8, 2).
        warmup (int): epochs of the linear ε ramp (10).

    Shapes: ``x`` (B, C, H, W) in [0, 1]; ``y`` (B,) int64; the model returns (N, K) logits.

    Example::

        obj = SmoothAdv.from_config(sigma=0.25, family="mnist")   # ε = 255/256, T = 10, m = 4
        loss, parts = obj(model, images, labels)                  # parts: ce, acc, epsilon
    """

    name = "smoothadv"
    graph_unsafe_because = "decides on the host where an attack gradient is zero (a random direction replaces it)"
    Params = SmoothAdvHypers
    hp: SmoothAdvHypers
    sigma: float

    @property
    def num_chunks(self) -> int:  # type: ignore[override]
        return self.hp.num_noise_vec

    def current_epsilon(self) -> float:
        """The warmed-up radius ``ε_e`` of the current epoch."""
        return self.hp.epsilon * warmup_factor(self.epoch, self.hp.warmup)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, noises: Tensor, epsilon: float) -> Tensor:
        """The PGD perturbation ``δ`` (B, C, H, W) against the soft smoothed classifier at ``x`` with ``noises``.

        ``‖δ_i‖₂ ≤ epsilon`` and ``x + δ ∈ [0, 1]``. Runs in eval mode with parameter gradients off and
        restores the model afterwards.
        """
        delta = torch.zeros_like(x)
        if epsilon <= 0:
            return delta
        step = 2.0 * epsilon / self.hp.num_steps
        x = x.detach()
        with eval_mode(model) as net:
            for _ in range(self.hp.num_steps):
                grad = input_gradient(lambda d: smoothed_nll(net, x + d, noises, y), delta)
                delta = delta + step * unit_l2(grad, random_if_zero=True)
                delta = (x + delta).clamp(0.0, 1.0) - x
                delta = project_l2(delta, epsilon)
        return delta.detach()

    def perturb_ddn(self, model: nn.Module, x: Tensor, y: Tensor, noises: Tensor, epsilon: float) -> Tensor:
        """The DDN perturbation of the reference's multi-noise attack: the smallest-norm δ found that flips the
        majority vote of the ``m`` noisy copies, capped at ``epsilon`` and rounded to 8-bit levels (0 when none).

        Each step moves δ by ``lr_i·∇/‖∇‖`` of the smoothed NLL (``lr_i`` cosine from 1 to 0.01 over the T
        steps), then rescales it to a norm that shrinks by ``1 − γ`` while the vote is flipped and grows by
        ``1 + γ`` otherwise, starting at ``epsilon`` (the reference sets its initial norm to the warmed-up
        radius every epoch). Eval mode with parameter gradients off, restored afterwards.
        """
        b, steps, gamma = x.shape[0], self.hp.num_steps, self.hp.ddn_gamma
        x = x.detach()
        delta = torch.zeros_like(x)
        best = torch.zeros_like(x)
        if epsilon <= 0:
            return best
        norm = torch.full((b,), float(epsilon), device=x.device, dtype=x.dtype)
        worst = l2_norms(torch.maximum(x, 1 - x)).flatten()
        best_l2 = worst.clone()
        with eval_mode(model) as net:
            for i in range(steps):
                lr = 0.01 + 0.99 * (1 + math.cos(math.pi * (i + 1) / steps)) / 2
                l2 = l2_norms(delta).flatten()
                d = delta.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits = noisy_logits(net, x + d, noises)
                    nll = smoothed_nll_from_logits(logits, y).mean()
                    (grad,) = torch.autograd.grad(nll, [d])
                vote = logits.detach().argmax(-1).mode(0).values
                flipped = vote != y
                better = flipped & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), delta, best)
                delta = delta + lr * unit_l2(grad, random_if_zero=True)
                norm = torch.minimum(norm * (1 - (2 * flipped.to(x.dtype) - 1) * gamma), worst)
                delta = delta * (norm / l2_norms(delta).flatten()).view(-1, *[1] * (x.dim() - 1))
                delta = quantize(x + delta).clamp(0.0, 1.0) - x
        return quantize(project_l2(best, epsilon)).detach()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        noises = draw_noises(x, self.hp.num_noise_vec, self.sigma)
        epsilon = self.current_epsilon()
        attack = self.perturb_ddn if self.hp.attack == "ddn" else self.perturb
        x_adv = x + attack(model, x, y, noises, epsilon)
        logits = noisy_logits(model, x_adv, noises)
        loss = mean_noisy_ce(logits, y)
        check_finite(
            loss,
            "smoothadv",
            self.epoch,
            f"lower --epsilon (now {self.hp.epsilon:g}) or the learning rate, or lengthen --warmup",
        )
        parts = {
            "ce": loss.detach(),
            "acc": noisy_accuracy(logits, y),
            "epsilon": torch.full((), epsilon, device=x.device),
        }
        return loss, parts
