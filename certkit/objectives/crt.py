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

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit import reference
from certkit.errors import CertkitError
from certkit.objectives.base import DEFAULT_FAMILY, Hypers, Objective, hyper


@dataclass
class CRTHypers(Hypers):
    """CRT's hyperparameters (see :class:`CRT`); the official configurations use the defaults."""

    alpha: float = hyper(
        float,
        "weight of the teacher-matching term; 1-alpha weighs cross-entropy",
        default=1.0,
        minimum=0.0,
        maximum=1.0,
    )
    match: str = hyper(
        str, "compare 'logits' (official code) or 'softmax' outputs", default="logits", choices=("logits", "softmax")
    )


#: why CRT takes no GloRo teacher (the refusal's words, here and in certkit.methods)
GLORO_TEACHER = (
    "a GloRo net, certified by its Lipschitz bound and never trained under noise; CRT transfers a smoothed "
    "classifier's robustness: give a teacher trained with randomized smoothing"
)


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


class CRT(Objective):
    """Train a student to match a frozen teacher on shared Gaussian-noisy inputs.

    The objective owns its teacher: it loads it (from a certkit run directory, a reference ``.pth.tar`` or a
    module), checks its class count, freezes it, and records its lineage and training cost once, for
    ``model.json`` and the cost ledger.

    Arguments:
        sigma: noise level in [0, 1] pixel units (must equal the teacher's; a mismatch is warned about).
        teacher: the teacher, any architecture with the student's classes: a module, a certkit run
            directory, or a reference ``.pth``/``.pth.tar`` checkpoint (then ``dataset`` names its data).
            A module is frozen in place (eval mode, no gradients), as the teacher loaded from a file is.
        teacher_meta: the ``model.json`` of a teacher given as a module (its sigma, lineage and cost), if any.
        teacher_model: for a teacher run of your own module, an untrained instance of it to load into.
        num_classes: the dataset's class count, checked against the teacher's when known.
        dataset: dataset name, for a reference checkpoint's normalization.
        teacher_arch, teacher_normalization: how to read a reference teacher file that does not say it all
            (CRT's and MACER's own files record no architecture; a SmoothAdv CIFAR-10 net centres its input):
            as ``certkit certify``'s ``--arch`` and ``--normalization`` for a reference checkpoint.
        alpha: weight of the transfer term; 1 − alpha weighs cross-entropy. Default 1.0 (official configs).
        match: 'logits' (official code, default) or 'softmax' (the paper's wording).

    Example::

        obj = CRT(sigma=0.25, teacher="runs/teacher")
        loss, parts = obj(student, images, labels)   # images (B,C,H,W) in [0,1]
    """

    name = "crt"
    graph_safe = True

    def step_constants(self) -> tuple[object, ...]:
        return ()  # no schedule

    Params = CRTHypers
    hp: CRTHypers

    def __init__(
        self,
        sigma: float | None = None,
        teacher: nn.Module | str | os.PathLike | None = None,
        *,
        teacher_meta: dict[str, Any] | None = None,
        teacher_model: nn.Module | None = None,
        teacher_arch: str | None = None,
        teacher_normalization: str | None = None,
        num_classes: int | None = None,
        dataset: str | None = None,
        family: str = DEFAULT_FAMILY,
        **hparams: Any,
    ) -> None:
        super().__init__(sigma, family=family, **hparams)
        if teacher is None:
            raise CertkitError("--method crt needs --teacher RUN_DIR (a certkit run) or a reference .pth.tar")
        if isinstance(teacher, nn.Module):
            if any(v is not None for v in (teacher_model, teacher_arch, teacher_normalization)):
                raise CertkitError(
                    "teacher_model, teacher_arch and teacher_normalization say how to read a teacher file; "
                    "this teacher is already a module"
                )
            info = dict(teacher_meta or {})
        else:
            path = str(teacher)
            teacher, info = reference.load_any(
                path,
                dataset=dataset,
                model=teacher_model,
                arch=teacher_arch,
                normalization=teacher_normalization,
                flags=("--teacher-arch", "--teacher-normalization"),
            )
            info["path"] = path
        if info.get("method") == "gloro":  # a GloroNet module itself is refused above this, in certkit.methods
            raise CertkitError(f"{info.get('path', 'the teacher')}: {GLORO_TEACHER}")
        self.teacher = self._freeze(teacher)
        self.teacher_info = info
        if num_classes is not None and info.get("num_classes") is not None and int(info["num_classes"]) != num_classes:
            raise CertkitError(
                f"{info.get('path')}: teacher has {info['num_classes']} classes, the dataset has {num_classes}"
            )
        t_sigma = info.get("sigma")
        if t_sigma is not None and abs(float(t_sigma) - float(self.sigma or 0)) > 1e-12:
            warnings.warn(
                f"teacher was trained at sigma={t_sigma}, student uses sigma={self.sigma}; CRT assumes equal sigma",
                stacklevel=2,
            )
        self.record = {k: info.get(k) for k in ("path", "arch", "method", "sigma")}
        self.record["sha256"] = info.get("weights", {}).get("sha256")
        self.lineage = [*info.get("lineage", []), self.record]
        self.ancestors = list(info.get("cost", {}).get("ancestors", []))
        if "cost" in info:
            total = info["cost"].get("total", {})
            self.ancestors.append(
                {
                    "path": self.record["path"],
                    "method": info.get("method"),
                    "arch": info.get("arch"),
                    "seconds": total.get("seconds", 0.0),
                    "total": total,
                }
            )

    @staticmethod
    def _freeze(teacher: nn.Module) -> nn.Module:
        """Eval mode (a teacher in train mode would use batch statistics and update them), no gradients."""
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def counted_modules(self) -> dict[str, nn.Module]:
        """The teacher's forward passes go into the cost ledger as ``teacher_forward``."""
        return {"teacher": self.teacher}

    def cost_ancestors(self) -> list[dict[str, Any]]:
        """The teacher's own training cost, after its ancestors' (oldest first)."""
        return list(self.ancestors)

    def checkpoint_meta(self) -> dict[str, Any]:
        """``teacher`` (path, arch, method, sigma, hash) and the whole ancestor ``lineage``, oldest first."""
        return {"teacher": dict(self.record), "lineage": list(self.lineage)}

    def outputs(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(student logits, teacher logits, noisy input) for one shared noise draw; the logits in fp32 whatever
        precision the networks ran in (the loss's convention, :mod:`certkit.objectives.base`)."""
        noisy = x + self.noise(x)
        with torch.no_grad():
            self.teacher.eval()  # in case someone switched it back: train mode would update batch statistics
            t = self.teacher(noisy).float()
        return model(noisy).float(), t, noisy

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        s, t, _ = self.outputs(model, x)
        if s.shape != t.shape:
            raise CertkitError(f"teacher outputs {t.shape[1]} classes but the student {s.shape[1]}")
        if self.hp.match == "softmax":
            s_cmp, t_cmp = F.softmax(s, dim=1), F.softmax(t, dim=1)
        else:
            s_cmp, t_cmp = s, t
        transfer = transfer_distance(s_cmp, t_cmp).mean()
        ce = F.cross_entropy(s, y)
        if self.hp.alpha == 1.0:
            loss = transfer
        elif self.hp.alpha == 0.0:
            loss = ce  # exactly Gaussian-augmentation training (same noise stream as `gaussian`)
        else:
            loss = self.hp.alpha * transfer + (1.0 - self.hp.alpha) * ce
        agree = (s.argmax(1) == t.argmax(1)).float().mean()
        acc = (s.argmax(1) == y).float().mean()
        return loss, {"transfer": transfer.detach(), "ce": ce.detach(), "agree": agree, "acc": acc}
