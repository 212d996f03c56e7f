"""Pieces shared by the noise-based training objectives (SmoothAdv, MACER, SmoothMix, Consistency, Stability).

Every one of those methods looks at an image through ``m`` Gaussian noise draws and works with the *soft
smoothed prediction* ``p̄(x) = (1/m) Σ_j softmax(f(x + n_j))``; the attack-based ones also take per-example
L2-normalised input gradients and project perturbations onto an L2 ball. Those pieces live here once, so
each method's module reads like its paper and a fix lands in every method at the same time. The registry
skips this module (its name starts with ``_``).

Layout convention: ``m`` noise draws of a batch ``(B, C, H, W)`` are a tensor ``(m, B, C, H, W)``; logits
of the noisy copies are ``(m, B, K)``. Draw ``j`` of every image sits in row ``j``, which is the layout of
the reference code bases (their ``torch.cat`` over draws) and keeps the same draws reusable across the
attack and the update step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError

#: floor inside ``log p̄`` of the attack objective and the entropy, as in the reference code bases
LOG_FLOOR = 1e-20


class DivergenceError(CertkitError):
    """Training produced a non-finite loss; continuing would write NaNs into every weight."""


# --------------------------------------------------------------------------------------------------
# divergence
# --------------------------------------------------------------------------------------------------
def check_finite(loss: Tensor, method: str, epoch: int, hint: str) -> None:
    """Stop before a non-finite loss reaches the optimizer (one host sync per step).

    Large attack radii are known to make SmoothAdv diverge (two of Salman et al.'s published CIFAR-10 runs);
    a NaN step would silently destroy the weights and every later checkpoint, so failing loudly is cheaper
    than the sync.
    """
    if loss.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # a captured step cannot stop halfway; the trainer checks the epoch's summed loss instead
    if not bool(torch.isfinite(loss.detach())):
        raise DivergenceError(f"{method} loss became non-finite in epoch {epoch}: training diverged; {hint}")


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------
def warmup_factor(epoch: int, warmup: int) -> float:
    """``min(1, (e + 1) / warmup)`` for 0-based epoch ``e`` (SmoothAdv's ε ramp, SmoothMix's η·w_e)."""
    return min(1.0, (epoch + 1) / max(1, warmup))


# --------------------------------------------------------------------------------------------------
# noise and the soft smoothed prediction
# --------------------------------------------------------------------------------------------------
def draw_noises(x: Tensor, m: int, sigma: float) -> Tensor:
    """``m`` draws of N(0, σ²I) per image from the global RNG: ``(m, B, C, H, W)``."""
    return torch.randn_like(x.unsqueeze(0).expand(m, *x.shape)) * sigma


def noisy_logits(model: nn.Module, x: Tensor, noises: Tensor) -> Tensor:
    """Logits of every noisy copy ``x + n_j`` in one forward pass of ``m·B`` samples: ``(m, B, K)``, in fp32
    whatever precision the network ran in (the losses' convention, :mod:`certkit.objectives.base`).

    The noisy points are not clipped to [0, 1], as in every reference implementation and in certification.
    """
    m, b = noises.shape[0], x.shape[0]
    out = model((x.unsqueeze(0) + noises).flatten(0, 1)).float()
    return out.view(m, b, -1)


def smoothed_probs(logits: Tensor, beta: float = 1.0) -> Tensor:
    """Soft smoothed prediction ``(1/m) Σ_j softmax(β·z_j)`` from ``(m, B, K)`` logits: ``(B, K)``."""
    return F.softmax(logits * beta if beta != 1.0 else logits, dim=-1).mean(0)


def repeat_labels(y: Tensor, m: int) -> Tensor:
    """Labels matching ``noisy_logits(...).flatten(0, 1)``: ``(m·B,)``."""
    return y.repeat(m)


def mean_noisy_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over all ``m·B`` noisy copies, each with its image's label."""
    return F.cross_entropy(logits.flatten(0, 1), repeat_labels(y, logits.shape[0]))


def noisy_accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of noisy copies classified correctly (a detached 0-d tensor, for logging)."""
    return (logits.detach().argmax(-1) == y.unsqueeze(0)).float().mean()


def smoothed_nll(model: nn.Module, x: Tensor, noises: Tensor, y: Tensor) -> Tensor:
    """Attack objective ``−log max(p̄(x)_y, 1e-20)`` per image: ``(B,)``.

    The floor keeps the objective finite once the attack has driven the true class's soft vote to zero.
    """
    return smoothed_nll_from_logits(noisy_logits(model, x, noises), y)


def smoothed_nll_from_logits(logits: Tensor, y: Tensor) -> Tensor:
    """:func:`smoothed_nll` from the ``(m, B, K)`` logits already computed (DDN also reads their votes)."""
    p_bar = smoothed_probs(logits)
    return -torch.log(p_bar.gather(1, y.view(-1, 1)).squeeze(1).clamp_min(LOG_FLOOR))


# --------------------------------------------------------------------------------------------------
# L2 geometry, per example
# --------------------------------------------------------------------------------------------------
def l2_norms(t: Tensor) -> Tensor:
    """Per-example L2 norm of ``(B, ...)`` as ``(B, 1, ..., 1)``, ready to broadcast."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def unit_l2(g: Tensor, eps: float = 0.0, random_if_zero: bool = False) -> Tensor:
    """Per-example normalisation ``g / (‖g‖ + eps)``.

    ``random_if_zero`` replaces a zero gradient by a standard normal draw, left unnormalised as in the
    reference SmoothAdv attacks (a flat region must not stop the attack, and ``0/0`` must not produce NaN;
    the draw's norm, about √d, carries the step as far as the projection then allows); otherwise ``eps``
    guards the division (SmoothMix uses ``1e-8`` and lets a zero gradient stay zero).
    """
    norms = l2_norms(g)
    if random_if_zero:
        zero = norms.flatten() == 0
        if bool(zero.any()):
            unit = g / torch.where(norms == 0, torch.ones_like(norms), norms)
            unit[zero] = torch.randn_like(g[zero])
            return unit
    return g / (norms + eps)


def project_l2(delta: Tensor, maxnorm: float) -> Tensor:
    """Scale each example's perturbation down to ``‖δ‖₂ ≤ maxnorm`` (unchanged if already inside)."""
    if maxnorm <= 0:
        return torch.zeros_like(delta)
    norms = l2_norms(delta)
    return delta * torch.clamp(maxnorm / norms.clamp_min(1e-12), max=1.0)


def input_gradient(loss_fn: Any, x: Tensor) -> Tensor:
    """``∇_x loss_fn(x).sum()`` for a detached copy of ``x``; parameters' ``requires_grad`` is left alone."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(x).sum(), [x])
    return grad
