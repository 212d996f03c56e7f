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

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.objectives.base import Hyper

#: floor inside ``log p̄`` of the attack objective and the entropy, as in the reference code bases
LOG_FLOOR = 1e-20


class DivergenceError(CertkitError):
    """Training produced a non-finite loss; continuing would write NaNs into every weight."""


# --------------------------------------------------------------------------------------------------
# hyperparameters: one spec per name, so a CLI flag shared by several methods means one thing
# --------------------------------------------------------------------------------------------------
def _int_or_none(text: str) -> Any:
    return None if text.lower() == "none" else int(text)


def _float_or_none(text: str) -> Any:
    return None if text.lower() == "none" else float(text)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false (got {text!r})")


_bool.__name__ = "bool"  # argparse names the type in its error message

HYPER_SPECS: dict[str, Hyper] = {
    "num_noise_vec": Hyper(int, "m: Gaussian noise draws per image; chunked methods also split each batch into m chunks"),
    "gauss_num": Hyper(int, "k: Gaussian noise copies per image (MACER)"),
    "epsilon": Hyper(float, "L2 attack radius in [0,1] pixel units (255/256 ≈ 1.0; the reference CLI takes 1/256 units)"),
    "num_steps": Hyper(int, "T: attack steps"),
    "warmup": Hyper(int, "epochs over which the attack radius / regulariser weight ramps up linearly"),
    "lbd": Hyper(float, "lambda: weight of the robustness/consistency/stability regulariser"),
    "eta": Hyper(float, "eta: weight of the second regulariser (Consistency: entropy of p̄; SmoothMix: mix loss)"),
    "gamma": Hyper(float, "MACER hinge: margins xi = Φ⁻¹(p1) − Φ⁻¹(p2) above gamma are not pushed further"),
    "beta": Hyper(float, "MACER inverse temperature of the soft votes softmax(beta·z)"),
    "deferred_epochs": Hyper(int, "MACER: lambda is 0 for the first this-many epochs (0 = no deferral)"),
    "step_size": Hyper(float, "L2 length of one SmoothMix attack step, pixel units (SmoothMix's --alpha)"),
    "mix_step": Hyper(int, "SmoothMix: attack step whose point is the clean side of the mixup (0 = the clean image)"),
    "maxnorm": Hyper(_float_or_none, "SmoothMix: L2 cap on the adversarial perturbation (none = unbounded)"),
    "maxnorm_s": Hyper(_float_or_none, "SmoothMix: L2 cap on the clean-side perturbation (none = step_size·mix_step)"),
    "detach_target": Hyper(_bool, "Stability: true = softmax(f(x)) is a fixed label; false = also train through it, as the reference code does"),
}


def pick_hypers(*names: str) -> dict[str, Hyper]:
    """The shared specs of ``names``, in order: the ``HYPERS`` of one method."""
    return {n: HYPER_SPECS[n] for n in names}


# --------------------------------------------------------------------------------------------------
# published defaults
# --------------------------------------------------------------------------------------------------
_FAMILY_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "mnist",
    "fashion_mnist": "mnist",
    "fmnist": "mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    # No method below publishes ImageNet training recipes for these losses at every sigma; the CIFAR-10
    # (ResNet-110) values are the ones the re-implementations carry over.
    "imagenet": "cifar10",
}


def table_defaults(
    method: str, table: Mapping[str, Mapping[float, Mapping[str, Any]]], family: str, sigma: float
) -> dict[str, Any]:
    """Look up ``table[family][sigma]``.

    ``family`` is ``mnist`` (MNIST-like: MNIST, Fashion-MNIST), ``cifar10`` or ``imagenet`` (CIFAR-10
    values). A sigma outside the tabulated ones takes the nearest tabulated sigma on a log scale (noise
    levels are compared by ratio: 0.12 → 0.25, 0.75 → 1.0, 2.0 → 1.0); an exact tie takes the smaller.
    """
    key = _FAMILY_ALIASES.get(str(family).lower())
    if key is None:
        raise CertkitError(
            f"no published {method} defaults for dataset family {family!r}; use one of mnist, fashion-mnist, cifar10, imagenet"
        )
    if not sigma > 0:
        raise CertkitError(f"sigma must be > 0 (got {sigma})")
    rows = table[key]
    nearest = min(sorted(rows), key=lambda s: abs(math.log(s / sigma)))
    return dict(rows[nearest])


def resolve_hparams(
    method: str, table: Mapping[str, Mapping[float, Mapping[str, Any]]], sigma: float, given: dict[str, Any]
) -> dict[str, Any]:
    """Fill arguments left as ``None`` with the CIFAR-10 default at the nearest sigma.

    Only used when an objective is built directly (``SmoothAdv(sigma=0.5)``); the CLI and
    :meth:`Objective.from_config` always pass the defaults of the chosen dataset family.
    """
    base = table_defaults(method, table, "cifar10", sigma)
    return {k: (base.get(k) if v is None else v) for k, v in given.items()}


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def require(condition: bool, message: str) -> None:
    """Raise a one-line :class:`CertkitError` unless ``condition`` holds."""
    if not condition:
        raise CertkitError(message)


def check_int(method: str, name: str, value: Any, minimum: int) -> int:
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{method}: {name} must be an integer >= {minimum} (got {value!r})",
    )
    return int(value)


def check_float(method: str, name: str, value: Any, minimum: float = 0.0) -> float:
    require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= minimum,
        f"{method}: {name} must be a finite number >= {minimum} (got {value!r})",
    )
    return float(value)


def check_finite(loss: Tensor, method: str, epoch: int, hint: str) -> None:
    """Stop before a non-finite loss reaches the optimizer (one host sync per step).

    Large attack radii are known to make SmoothAdv diverge (two of Salman et al.'s published CIFAR-10 runs);
    a NaN step would silently destroy the weights and every later checkpoint, so failing loudly is cheaper
    than the sync.
    """
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
    """Logits of every noisy copy ``x + n_j`` in one forward pass of ``m·B`` samples: ``(m, B, K)``.

    The noisy points are not clipped to [0, 1], as in every reference implementation and in certification.
    """
    m, b = noises.shape[0], x.shape[0]
    out = model((x.unsqueeze(0) + noises).flatten(0, 1))
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
    p_bar = smoothed_probs(noisy_logits(model, x, noises))
    return -torch.log(p_bar.gather(1, y.view(-1, 1)).squeeze(1).clamp_min(LOG_FLOOR))


# --------------------------------------------------------------------------------------------------
# L2 geometry, per example
# --------------------------------------------------------------------------------------------------
def l2_norms(t: Tensor) -> Tensor:
    """Per-example L2 norm of ``(B, ...)`` as ``(B, 1, ..., 1)``, ready to broadcast."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def unit_l2(g: Tensor, eps: float = 0.0, random_if_zero: bool = False) -> Tensor:
    """Per-example normalisation ``g / (‖g‖ + eps)``.

    ``random_if_zero`` replaces a zero gradient by a uniformly random unit direction (SmoothAdv: a flat
    region must not stop the attack, and ``0/0`` must not produce NaN); otherwise ``eps`` guards the
    division (SmoothMix uses ``1e-8`` and lets a zero gradient stay zero).
    """
    norms = l2_norms(g)
    if random_if_zero:
        zero = norms.flatten() == 0
        if bool(zero.any()):
            g = g.clone()
            r = torch.randn_like(g[zero])
            g[zero] = r / l2_norms(r)
            norms = l2_norms(g)
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
