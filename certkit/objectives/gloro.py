"""GloRo training (Leino, Wang & Fredrikson, "Globally-Robust Neural Networks", ICML 2021).

Threat model: L2 perturbations of radius ε in [0, 1] pixel space. The model is a
:class:`~certkit.gloro.model.GloroNet`: logits ``y = W h(x) + b`` plus the ⊥ logit
``y_⊥ = max_{i≠j}(y_i + ε·K_sub·‖w_j − w_i‖)``, ``j`` the predicted class. Losses (on the *training* ε):

* **GloRo-CE** (``lbd = 0``): softmax cross-entropy over the C+1 logits ``[y, y_⊥]``, label padded with 0
  for ⊥: it pushes the true class above every other class *and* above ⊥;
* **GloRo-TRADES** (``lbd > 0``): ``CE(y, label) + λ·KL([softmax(y), 0] ‖ softmax([y, y_⊥]))``; with
  temperature 1 the KL term is exactly ``softplus(y_⊥ − logsumexp(y))``.

``K_sub`` in training is the differentiable power-iteration estimate of the model (persistent, detached,
warm-started iterates, ``power_iterations`` steps per optimizer step). Per-epoch evaluation uses the
model's *frozen guaranteed* bound and the evaluation ε: clean accuracy, VRA (correct and certified) and
the rejection rate.

ε schedule: training runs above the evaluation ε (the paper's overcompensation, 1.5× for MNIST 0.3) and
ramps up to it like the library's ``[0.01]-log-[50%:f]`` string: the multiplier of ε grows concavely,
``v = log(e^0.01 + (e^f − e^0.01)·t)``, over the first ``eps_ramp`` fraction of the epochs, then stays at
``f = train_eps_factor``. Unlike the library (per batch) the value is updated per epoch and is the one
reached at the *end* of the epoch, so a one-epoch run trains at ``f·ε``.

Sigma plays no part: the trainer passes one because smoothing methods need it, and it is ignored
(``model.json`` records ``sigma: null``).

Example::

    obj = Gloro.from_config(1.0, "mnist", {"epsilon": 0.5})
    net = obj.prepare_model(create_model("gloro-2c2f", 10, (1, 28, 28)), dataset_info("fashion-mnist"))
    loss, parts = obj(net, images, labels)   # images (B,1,28,28) in [0,1]
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.gloro.model import GloroNet
from certkit.objectives import register_objective
from certkit.objectives.base import Hyper, Objective, unwrap

#: the ε multiplier the log ramp starts from (the library's ``[0.01]``)
RAMP_START = 0.01

#: published settings per dataset family (gloro.md §5–§7; README and ICML code of klasleino/gloro)
_DEFAULTS: dict[str, dict[str, Any]] = {
    # MNIST ε=0.3 with 2C2F; trained at 0.45 (1.5×), 10 power iterations per step
    "mnist": dict(epsilon=0.3, train_eps_factor=1.5, eps_ramp=0.5, lbd=0.0, power_iterations=10),
    # CIFAR-10 ε=36/255 with 6C2F: 1.1× with a log ramp over the first half, 5 power iterations
    "cifar10": dict(epsilon=36 / 255, train_eps_factor=1.1, eps_ramp=0.5, lbd=0.0, power_iterations=5),
    "imagenet": dict(epsilon=36 / 255, train_eps_factor=1.1, eps_ramp=0.5, lbd=0.0, power_iterations=5),
}


@register_objective("gloro")
class Gloro(Objective):
    """GloRo-CE / GloRo-TRADES on a :class:`GloroNet`; every hyperparameter below has a published default.

    Args (hyperparameters):
        epsilon: evaluation radius ε, L2 in [0, 1] pixel units (MNIST-like 0.3, CIFAR-10/ImageNet 36/255).
        train_eps_factor: training ε = this × ε once ramped up (MNIST 1.5, CIFAR-10 1.1).
        eps_ramp: fraction of the epochs over which the training ε ramps up (0: constant from the start).
        lbd: TRADES weight λ (0: the plain GloRo cross-entropy over C+1 logits).
        power_iterations: power-iteration steps per optimizer step (MNIST 10, CIFAR-10 5).
    """

    HYPERS: ClassVar[dict[str, Hyper]] = {
        "epsilon": Hyper(float, "GloRo: evaluation radius epsilon, L2 in [0,1] pixel units (SmoothAdv: attack radius)"),
        "train_eps_factor": Hyper(float, "GloRo: training epsilon = this x epsilon after the ramp (overcompensation)"),
        "eps_ramp": Hyper(float, "GloRo: fraction of the epochs over which the training epsilon ramps up (log-concave)"),
        "lbd": Hyper(float, "lambda: weight of the robustness/consistency/stability regulariser (GloRo: TRADES, 0 = CE)"),
        "power_iterations": Hyper(int, "GloRo: power-iteration steps per optimizer step (warm-started iterates)"),
    }
    #: the optimisation recipe of the GloRo library's training scripts (gloro.md §7): Adam 1e-3 decayed
    #: exponentially to 1e-6 over the run, batch 256 and 500 epochs as the ICML MNIST-0.3 run, no weight decay
    RECIPE: ClassVar[dict[str, Any]] = dict(
        optimizer="adam", lr=1e-3, schedule="exp", lr_final=1e-6, weight_decay=0.0, batch_size=256, epochs=500
    )

    def __init__(self, sigma: float | None = None, **hparams: Any) -> None:
        # the base class insists on a positive sigma for the smoothing methods; GloRo has none
        super().__init__(1.0, **hparams)
        self.sigma = None  # type: ignore[assignment]
        if "epsilon" not in self.hparams:
            raise CertkitError("method 'gloro' needs epsilon (the evaluation radius)")
        for key, value in _DEFAULTS["mnist"].items():
            self.hparams.setdefault(key, value)
        h = self.hparams
        h["epsilon"], h["train_eps_factor"], h["eps_ramp"], h["lbd"] = (
            float(h["epsilon"]), float(h["train_eps_factor"]), float(h["eps_ramp"]), float(h["lbd"])
        )
        h["power_iterations"] = int(h["power_iterations"])
        if not h["epsilon"] >= 0:
            raise CertkitError(f"--epsilon must be >= 0 (got {h['epsilon']})")
        if not h["train_eps_factor"] > 0:
            raise CertkitError(f"--train-eps-factor must be > 0 (got {h['train_eps_factor']})")
        if not 0 <= h["eps_ramp"] <= 1:
            raise CertkitError(f"--eps-ramp must be in [0, 1] (got {h['eps_ramp']})")
        if not h["lbd"] >= 0:
            raise CertkitError(f"--lbd must be >= 0 (got {h['lbd']})")
        if h["power_iterations"] < 1:
            raise CertkitError(f"--power-iterations must be >= 1 (got {h['power_iterations']})")
        self.net: GloroNet | None = None

    @classmethod
    def defaults(cls, family: str, sigma: float) -> dict[str, Any]:
        return dict(_DEFAULTS.get(family, _DEFAULTS["cifar10"]))

    # --- the model ----------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, info: Any) -> GloroNet:
        """Wrap a registry model (``Sequential(Normalize, body)``) as the GloroNet this objective trains."""
        if not isinstance(model, GloroNet):
            model = GloroNet(model, info.in_shape, self.hparams["epsilon"], self.hparams["power_iterations"])
        return self.bind(model)

    def bind(self, model: nn.Module) -> GloroNet:
        """The GloroNet inside ``model`` (DDP unwrapped), its evaluation ε set to this run's."""
        net = unwrap(model)
        if not isinstance(net, GloroNet):
            raise CertkitError(
                f"method 'gloro' trains a GloroNet (one of the gloro-* architectures), not a {type(net).__name__}; "
                "use certkit.train.train(..., method='gloro') or GloroNet(model, in_shape, epsilon)"
            )
        if net.eval_epsilon != self.hparams["epsilon"]:
            net.epsilon.fill_(self.hparams["epsilon"])
        self.net = net
        return net

    # --- schedule -----------------------------------------------------------------------------------
    def train_epsilon(self) -> float:
        """The training ε of the current epoch (see the module docstring for the ramp)."""
        eps, top, ramp = self.hparams["epsilon"], self.hparams["train_eps_factor"], self.hparams["eps_ramp"]
        progress = (self.epoch + 1) / max(self.num_epochs, 1)
        if ramp <= 0 or progress >= ramp:
            return eps * top
        t = progress / ramp
        return eps * math.log(math.exp(RAMP_START) + (math.exp(top) - math.exp(RAMP_START)) * t)

    # --- the loss -----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        net = self.bind(model)
        logits = model(x)
        k_sub = net.lipschitz_constant(self.hparams["power_iterations"])
        eps = self.train_epsilon()
        bottom = net.bottom_logit(logits, eps, k_sub)
        full = torch.cat([logits, bottom[:, None]], 1)
        lbd = self.hparams["lbd"]
        parts: dict[str, Tensor] = {}
        if lbd > 0:
            ce = F.cross_entropy(logits, y)
            robust = F.softplus(bottom - torch.logsumexp(logits, 1)).mean()
            loss = ce + lbd * robust
            parts["robust"] = robust.detach()
        else:
            loss = ce = F.cross_entropy(full, y)
        parts.update(
            ce=ce.detach(),
            acc=(logits.argmax(1) == y).float().mean(),
            vra=(full.argmax(1) == y).float().mean().detach(),
            lipschitz=torch.as_tensor(k_sub).detach().float(),
            train_eps=torch.tensor(eps),
        )
        return loss, parts

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Sums over the batch: clean accuracy, VRA at the evaluation ε, rejection rate (frozen bound)."""
        net = self.bind(model)
        logits = net(x)
        pred, _, certified = net.certify_logits(logits, net.eval_epsilon, net.certification_constant())
        correct = pred == y
        return {
            "clean_acc": correct.float().sum(),
            "vra": (correct & certified).float().sum(),
            "rejection": (~certified).float().sum(),
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        """``model.json`` gets the frozen bound and ε under ``gloro`` (what :func:`certkit.checkpoint.load` needs)."""
        return {"gloro": self.net.checkpoint_meta()} if self.net is not None else {}
