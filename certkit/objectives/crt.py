"""Certified Robustness Transfer (Vaishnavi, Eykholt & Rahmati, NeurIPS 2022).

A robust *teacher* (trained once with an expensive method) transfers its certified robustness to a
*student* of any architecture: on every step both see the **same** Gaussian-noisy batch x̃ = x + η, and the
student is trained to reproduce the teacher's outputs there,

    L = α · (1/B) Σ_i ‖s(x̃_i) − t(x̃_i)‖₂ + (1 − α) · CE(s(x̃), y),

with the per-sample L2 norm of the difference *not squared* (as the official code), the teacher in eval mode
and without gradients, and α = 1 (pure transfer) by default. Why it works (a sketch, not the paper's
theorem): by Jensen, ‖G_s(x) − G_t(x)‖ ≤ E_η‖F_s(x+η) − F_t(x+η)‖, so the student's smoothed class
probabilities — and hence its Cohen radius — approach the teacher's as the loss goes to 0.

Cost per training image: 1 student forward + 1 backward, plus 1 teacher forward (no backward), against
m(T+2) passes for SmoothMix — the speedup comes from never running the attack.

``match='softmax'`` compares probabilities instead of logits (the paper's wording); α = 0 is exactly
Gaussian training. Differences from the official code, on purpose: it crashes as released
(``_train_epoch_logit``), enables autograd anomaly detection globally (invalid timings) and needs CUDA;
certkit does none of that.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.objectives import register_objective
from certkit.objectives.base import Hyper, Objective


def _match_choice(value: str) -> str:
    if value not in ("logits", "softmax"):
        raise CertkitError(f"--match must be 'logits' or 'softmax' (got {value!r})")
    return value


def transfer_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-sample ‖s − t‖₂ with a zero (not NaN) gradient where s = t exactly.

    ``torch.linalg.norm`` has an undefined gradient at 0 (NaN through the square root); a student initialised
    from its teacher would then poison the first step. Rows with a zero difference are routed through a
    constant so their gradient is exactly 0.
    """
    diff = student - teacher
    sq = diff.pow(2).sum(dim=1)
    zero = sq == 0
    return torch.where(zero, torch.zeros_like(sq), torch.sqrt(torch.where(zero, torch.ones_like(sq), sq)))


@register_objective("crt")
class CRT(Objective):
    """Train a student to match a frozen teacher on shared Gaussian-noisy inputs.

    Arguments:
        sigma: noise level in [0, 1] pixel units (must equal the teacher's; a mismatch is warned about).
        teacher: the teacher model (any architecture, same number of classes), put in eval mode and frozen.
        alpha: weight of the transfer term; 1 − alpha weighs cross-entropy. Default 1.0 (official configs).
        match: 'logits' (official code, default) or 'softmax' (the paper's wording).

    Example::

        obj = CRT(sigma=0.25, teacher=certkit.load("runs/teacher"))
        loss, parts = obj(student, images, labels)   # images (B,C,H,W) in [0,1]
    """

    HYPERS = {
        "alpha": Hyper(float, "CRT: weight of the teacher-matching term; 1-alpha weighs cross-entropy (default 1.0)"),
        "match": Hyper(_match_choice, "CRT: compare 'logits' (official code, default) or 'softmax' outputs"),
    }

    def __init__(self, sigma: float, teacher: nn.Module | None = None, alpha: float = 1.0, match: str = "logits") -> None:
        super().__init__(sigma, alpha=float(alpha), match=_match_choice(match))
        if not 0.0 <= alpha <= 1.0:
            raise CertkitError(f"--alpha must be in [0, 1] (got {alpha})")
        self.alpha = float(alpha)
        self.match = match
        self.teacher: nn.Module | None = None
        self.teacher_info: dict[str, Any] = {}
        if teacher is not None:
            self.set_teacher(teacher)

    @classmethod
    def defaults(cls, family: str, sigma: float) -> dict[str, Any]:
        return {"alpha": 1.0, "match": "logits"}

    def set_teacher(self, teacher: nn.Module, info: dict[str, Any] | None = None) -> None:
        """Freeze ``teacher`` (eval mode, no parameter gradients) and record where it came from.

        ``info`` is the teacher's checkpoint metadata; its sigma is compared with the student's and its own
        lineage is extended, so a chain of generations stays traceable.
        """
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        self.teacher_info = dict(info or {})
        t_sigma = self.teacher_info.get("sigma")
        if t_sigma is not None and abs(float(t_sigma) - self.sigma) > 1e-12:
            warnings.warn(
                f"teacher was trained at sigma={t_sigma}, student uses sigma={self.sigma}; CRT assumes equal sigma",
                stacklevel=2,
            )

    def counted_modules(self) -> dict[str, nn.Module]:
        """The teacher's forward passes go into the cost ledger as ``teacher_forward``."""
        return {"teacher": self.teacher} if self.teacher is not None else {}

    def outputs(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(student logits, teacher logits, noisy input) for one shared noise draw."""
        if self.teacher is None:
            raise CertkitError("CRT needs a teacher: pass --teacher RUN_DIR or a reference .pth.tar")
        noisy = x + self.noise(x)
        with torch.no_grad():
            self.teacher.eval()  # a teacher in train mode would use batch statistics and update them
            t = self.teacher(noisy)
        return model(noisy), t, noisy

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        s, t, _ = self.outputs(model, x)
        if s.shape != t.shape:
            raise CertkitError(f"teacher outputs {t.shape[1]} classes but the student {s.shape[1]}")
        if self.match == "softmax":
            s_cmp, t_cmp = F.softmax(s, dim=1), F.softmax(t, dim=1)
        else:
            s_cmp, t_cmp = s, t
        transfer = transfer_distance(s_cmp, t_cmp).mean()
        ce = F.cross_entropy(s, y)
        if self.alpha == 1.0:
            loss = transfer
        elif self.alpha == 0.0:
            loss = ce  # exactly Gaussian-augmentation training (same noise stream as `gaussian`)
        else:
            loss = self.alpha * transfer + (1.0 - self.alpha) * ce
        agree = (s.argmax(1) == t.argmax(1)).float().mean()
        acc = (s.argmax(1) == y).float().mean()
        return loss, {"transfer": transfer.detach(), "ce": ce.detach(), "agree": agree, "acc": acc}

    def checkpoint_meta(self) -> dict[str, Any]:
        """``teacher`` (path, arch, method, hash) and the whole ancestor ``lineage``, oldest first."""
        info = self.teacher_info
        teacher = {
            "path": info.get("path"),
            "arch": info.get("arch"),
            "method": info.get("method"),
            "sigma": info.get("sigma"),
            "sha256": info.get("sha256"),
        }
        lineage = list(info.get("lineage", [])) + [teacher]
        return {"teacher": teacher, "lineage": lineage}
