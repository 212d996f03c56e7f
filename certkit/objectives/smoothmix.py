"""SmoothMix: training confidence-calibrated smoothed classifiers (Jeong et al., NeurIPS 2021).

SmoothAdv trains on the worst point of an ε-ball and so trades clean accuracy for robustness at a fixed
radius. SmoothMix instead walks an (unbounded) adversarial path of the soft smoothed classifier and trains
the model, along the segment from the clean point to the adversarial one, to lose confidence *gradually*
(towards the uniform distribution), which the smoothed classifier turns into larger certified radii.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.objectives._smoothing import (
    LOG_FLOOR,
    check_finite,
    draw_noises,
    input_gradient,
    mean_noisy_ce,
    noisy_accuracy,
    noisy_logits,
    project_l2,
    smoothed_nll,
    smoothed_probs,
    unit_l2,
    warmup_factor,
)
from certkit.objectives.base import Hypers, Objective, eval_mode, hyper


def _row(m: int, step_size: float, num_steps: int, mix_step: int) -> dict[str, Any]:
    return {
        "num_noise_vec": m,
        "step_size": step_size,
        "num_steps": num_steps,
        "eta": 5.0,
        "mix_step": mix_step,
        "maxnorm": None,
        "maxnorm_s": None,
        "warmup": 10,
    }


# MNIST-like: the best-ACR configuration of the paper's grid at each σ (σ = 0.25: T = 2, η = 5, mix_step 1).
# CIFAR-10: mix_step follows CAT-RS's baseline runs.
_DEFAULTS: dict[str, dict[float, dict[str, Any]]] = {
    "mnist": {0.25: _row(4, 1.0, 2, 1), 0.5: _row(4, 1.0, 4, 0), 1.0: _row(4, 1.0, 8, 1)},
    "cifar10": {0.25: _row(2, 0.5, 4, 0), 0.5: _row(2, 1.0, 4, 1), 1.0: _row(2, 2.0, 4, 1)},
}


@dataclass
class SmoothMixHypers(Hypers):
    """SmoothMix's hyperparameters (see :class:`SmoothMix`)."""

    TABLE = _DEFAULTS

    num_noise_vec: int = hyper(
        int, "m: noise draws per image, also chunks per batch (one optimizer step each)", minimum=1
    )
    step_size: float = hyper(float, "alpha: L2 length of one attack step, pixel units", minimum=0.0, official="--alpha")
    num_steps: int = hyper(int, "T: attack steps", minimum=1)
    eta: float = hyper(float, "eta: weight of the mix loss", minimum=0.0)
    mix_step: int = hyper(
        int, "attack step whose point is the clean side of the mixup (0 = the clean image)", minimum=0
    )
    maxnorm: float | None = hyper(
        float, "L2 cap on the adversarial perturbation (none = unbounded)", minimum=0.0, optional=True
    )
    maxnorm_s: float | None = hyper(
        float, "L2 cap on the clean-side perturbation (none = step_size x mix_step)", minimum=0.0, optional=True
    )
    warmup: int = hyper(int, "epochs over which the mix-loss weight and the clean-side cap ramp up linearly", minimum=1)

    def check(self, method: str) -> None:
        super().check(method)
        if self.mix_step >= self.num_steps:
            raise CertkitError(f"{method}: --mix-step must be below --num-steps {self.num_steps} (got {self.mix_step})")

    def complete(self) -> None:
        # model.json records the value in use, not "None = α·mix_step"; rebuilding from it gives this objective
        if self.maxnorm_s is None:
            self.maxnorm_s = self.step_size * self.mix_step


@dataclass
class MixBatch:
    """Every intermediate of one SmoothMix step; :meth:`SmoothMix.loss` is built from exactly these."""

    #: (B, C, H, W) clean side: the mix_step-th attack point, projected to ‖x_c − x‖ ≤ maxnorm_s·w_e, in [0, 1]
    x_clean: Tensor
    #: (B, C, H, W) the last attack point x^T
    x_adv: Tensor
    #: (B,) mixing weights λ ~ U[0, ½]
    lam: Tensor
    #: (B, C, H, W) (1 − λ)·x_c + λ·x_adv
    x_mix: Tensor
    #: (B, K) (1 − λ)·p̄_c + λ/K — not detached
    y_mix: Tensor
    #: (B, K) soft smoothed prediction at x_c over the same m draws — not detached
    p_bar_clean: Tensor
    #: (B,) bool: argmax p̄_c = y, the inputs whose mix loss counts
    correct: Tensor
    #: (m, B, K) logits at x_c + n_j
    logits_clean: Tensor
    #: mean CE over the m·B clean noisy copies
    ce: Tensor
    #: mean over (j, i) of 1[correct_i]·KL(y_mix,i ‖ softmax(f(x_mix,i + n_j)))
    mix: Tensor


class SmoothMix(Objective):
    """SmoothMix — Jeong et al., "SmoothMix: Training Confidence-calibrated Smoothed Classifiers for Certified
    Robustness", NeurIPS 2021.

    Per chunk with ``m`` noise draws, the same draws serving the attack, the clean loss and the mix loss:

    1. attack (eval mode, parameter gradients off): ``x⁰ = x``; for ``t = 0..T−1``: if ``t = mix_step``
       keep ``x_init = xᵗ``; ``xᵗ⁺¹ = xᵗ + α·∇/(‖∇‖₂ + 1e-8)`` (per example) of
       ``Σ_i −log max(p̄(xᵗ_i)_{y_i}, 1e-20)``; project ``xᵗ⁺¹ − x`` to ``maxnorm`` if set (unbounded by
       default); clip to [0, 1]. ``x_adv = x^T``. Clean side ``x_c`` = ``x_init`` projected to
       ``‖x_c − x‖ ≤ maxnorm_s·w_e`` and clipped (``mix_step = 0`` gives ``x_c = x``);
    2. clean loss: mean CE over the ``m`` copies ``x_c + n_j``; ``p̄_c`` their soft smoothed prediction,
       *not* detached;
    3. mixup: ``λ_i ~ U[0, ½]``, ``x_mix = (1 − λ)x_c + λx_adv``, ``y_mix = (1 − λ)p̄_c + λ·(1/K)``;
    4. mix loss ``KL(y_mix ‖ softmax(f(x_mix + n_j)))``, counted only for inputs whose smoothed *clean*
       prediction is correct, averaged over all ``m·B`` copies;
    5. ``L = CE_clean + η·w_e·mix`` with ``w_e = min(1, (e + 1)/warmup)``.

    Like the reference, each loader batch is split into ``m`` chunks with one optimizer step per chunk
    (``num_chunks = m``). The clean and the mixed noisy copies go through the model in two calls, as in the
    reference (a network with BatchNorm normalises each over its own batch). A non-finite loss raises
    ``DivergenceError`` before the optimizer step.

    Cost per training image: ``m(T + 2)`` forward and ``m(T + 2)`` backward passes, ``m·T`` of the backward
    passes for input gradients only.

    Arguments (left out: the published value of ``family``, default MNIST-like, at the nearest σ):
        sigma (float): noise level, pixel units.
        num_noise_vec (int): m, noise draws per image and chunks per batch (MNIST-like 4; CIFAR-10 2).
        step_size (float): α, L2 length of an attack step in pixel units (MNIST-like 1.0; CIFAR-10 0.5,
            1.0, 2.0 at σ = 0.25, 0.5, 1.0). Not the certification α.
        num_steps (int): T, attack steps (MNIST-like 2, 4, 8; CIFAR-10 4).
        eta (float): η, weight of the mix loss (5.0).
        mix_step (int): the attack step used as the clean side, ``0 ≤ mix_step < T`` (MNIST-like 1, 0, 1;
            CIFAR-10 0, 1, 1).
        maxnorm (float | None): L2 cap on ``x_adv − x``; None (default) = unbounded.
        maxnorm_s (float | None): L2 cap on ``x_c − x`` before the warm-up scaling; None = α·mix_step, resolved
            at construction (``hparams`` and ``model.json`` record the number).
        warmup (int): epochs of the linear ramp of ``w_e`` (10).

    Shapes: ``x`` (B, C, H, W) in [0, 1]; ``y`` (B,) int64; the model returns (N, K) logits.

    Example::

        obj = SmoothMix.from_config(sigma=0.25, family="mnist")   # m = 4, α = 1, T = 2, η = 5, mix_step = 1
        loss, parts = obj(model, images, labels)                  # parts: ce, mix, correct, acc
    """

    name = "smoothmix"
    graph_safe = True
    Params = SmoothMixHypers
    hp: SmoothMixHypers
    sigma: float

    @property
    def num_chunks(self) -> int:  # type: ignore[override]
        return self.hp.num_noise_vec

    def weight(self) -> float:
        """``w_e``: the warm-up factor of the current epoch (scales η and maxnorm_s)."""
        return warmup_factor(self.epoch, self.hp.warmup)

    def step_constants(self) -> tuple[object, ...]:
        return (self.weight(),)

    def attack(self, model: nn.Module, x: Tensor, y: Tensor, noises: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_c, x_adv)`` of the SmoothMix adversary (both detached, in [0, 1]); eval mode, restored after."""
        x = x.detach()
        x_t, x_init = x, x
        with eval_mode(model) as net:
            for t in range(self.hp.num_steps):
                if t == self.hp.mix_step:
                    x_init = x_t
                grad = input_gradient(lambda z: smoothed_nll(net, z, noises, y), x_t)
                x_t = x_t + self.hp.step_size * unit_l2(grad, eps=1e-8)
                if self.hp.maxnorm is not None:
                    x_t = x + project_l2(x_t - x, self.hp.maxnorm)
                x_t = x_t.clamp(0.0, 1.0)
        cap = self.hp.maxnorm_s
        assert cap is not None  # SmoothMixHypers.complete resolves "none" to step_size * mix_step
        x_clean = (x + project_l2(x_init - x, cap * self.weight())).clamp(0.0, 1.0)
        return x_clean.detach(), x_t.detach()

    def mix_batch(self, model: nn.Module, x: Tensor, y: Tensor, noises: Tensor) -> MixBatch:
        """Run steps 1–4 on one chunk with the given ``(m, B, C, H, W)`` noises; returns every intermediate."""
        x_clean, x_adv = self.attack(model, x, y, noises)
        b = x.shape[0]
        lam = torch.rand(b, device=x.device, dtype=x.dtype) / 2
        lam_img = lam.view(-1, *([1] * (x.dim() - 1)))
        x_mix = (1 - lam_img) * x_clean + lam_img * x_adv

        # the clean and the mixed copies (the same m draws) go through the model in two calls, as in the
        # reference code: a network with BatchNorm normalises each over its own batch, and updates its running
        # statistics twice per step
        logits_clean = noisy_logits(model, x_clean, noises)
        logits_mix = noisy_logits(model, x_mix, noises)
        ce = mean_noisy_ce(logits_clean, y)
        p_bar_clean = smoothed_probs(logits_clean)
        num_classes = logits_clean.shape[-1]
        y_mix = (1 - lam.unsqueeze(1)) * p_bar_clean + lam.unsqueeze(1) / num_classes

        log_q = F.log_softmax(logits_mix, dim=-1)
        kl = (y_mix * (torch.log(y_mix.clamp_min(LOG_FLOOR)) - log_q)).sum(-1)  # (m, B)
        correct = p_bar_clean.detach().argmax(1) == y
        mix = (kl * correct.to(kl.dtype)).mean()
        return MixBatch(
            x_clean=x_clean,
            x_adv=x_adv,
            lam=lam,
            x_mix=x_mix,
            y_mix=y_mix,
            p_bar_clean=p_bar_clean,
            correct=correct,
            logits_clean=logits_clean,
            ce=ce,
            mix=mix,
        )

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        mb = self.mix_batch(model, x, y, draw_noises(x, self.hp.num_noise_vec, self.sigma))
        loss = mb.ce + self.hp.eta * self.weight() * mb.mix
        check_finite(
            loss, "smoothmix", self.epoch, "lower --step-size/--num-steps or the learning rate, or set --maxnorm"
        )
        parts = {
            "ce": mb.ce.detach(),
            "mix": mb.mix.detach(),
            "correct": mb.correct.float().mean(),
            "acc": noisy_accuracy(mb.logits_clean, y),
        }
        return loss, parts
