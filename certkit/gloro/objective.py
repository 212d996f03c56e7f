"""GloRo training (Leino, Wang & Fredrikson, "Globally-Robust Neural Networks", ICML 2021).

Threat model: L2 perturbations of radius ε in [0, 1] pixel space. The model is a
:class:`~certkit.gloro.model.GloroNet`: logits ``y = W h(x) + b`` plus the ⊥ logit
``y_⊥ = max_{i≠j}(y_i + ε·K_sub·‖w_j − w_i‖)``, ``j`` the predicted class. Losses (on the *training* ε):

* **GloRo-CE** (``lbd = 0``): softmax cross-entropy over the C+1 logits ``[y, y_⊥]``, label padded with 0
  for ⊥: it pushes the true class above every other class *and* above ⊥;
* **GloRo-TRADES** (``lbd > 0``): ``CE(y, label) + λ·KL([softmax(y), 0] ‖ softmax([y, y_⊥]))``; with
  temperature 1 the KL term is exactly ``softplus(y_⊥ − logsumexp(y))``.

``K_sub`` in training is the differentiable power-iteration estimate of the model (persistent, detached,
warm-started iterates, ``power_iterations`` steps per optimizer step). Per-epoch evaluation certifies
as ``certkit certify`` does (float64 logits, the *frozen guaranteed* bound, the evaluation ε): clean
accuracy, VRA (correct and certified) and the rejection rate.

ε schedule: training runs above the evaluation ε (the paper's overcompensation, 1.5× for MNIST 0.3) and
ramps up to it like the library's ``[0.01]-log-[50%:f]`` string: the multiplier of ε grows concavely,
``v = log(e^0.01 + (e^f − e^0.01)·t)``, over the first ``eps_ramp`` fraction of the epochs, then stays at
``f = train_eps_factor``. Unlike the library (per batch) the value is updated per epoch and is the one
reached at the *end* of the epoch, so a one-epoch run trains at ``f·ε``.

Sigma plays no part: the objective declares ``uses_sigma = False``, so its sigma is None (``model.json``
records ``sigma: null``).

Example::

    obj = Gloro(epsilon=0.5, family="mnist")
    net = obj.prepare_model(create_model("gloro-2c2f", 10, (1, 28, 28)), (1, 28, 28))
    loss, parts = obj(net, images, labels)   # images (B,1,28,28) in [0,1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.gloro.model import BOTTOM, GloroNet
from certkit.models.layers import Normalize
from certkit.objectives.base import Hypers, Objective, hyper, unwrap

#: the ε multiplier the log ramp starts from (the library's ``[0.01]``)
RAMP_START = 0.01

#: published settings per dataset family (gloro.md §5–§7; README and ICML code of klasleino/gloro)
#: (no noise, so one row per family, under sigma None)
_DEFAULTS: dict[str, dict[Any, dict[str, Any]]] = {
    # MNIST ε=0.3 with 2C2F; trained at 0.45 (1.5×), 10 power iterations per step
    "mnist": {None: dict(epsilon=0.3, train_eps_factor=1.5, eps_ramp=0.5, lbd=0.0, power_iterations=10)},
    # CIFAR-10 ε=36/255 with 6C2F: 1.1× with a log ramp over the first half, 5 power iterations
    "cifar10": {None: dict(epsilon=36 / 255, train_eps_factor=1.1, eps_ramp=0.5, lbd=0.0, power_iterations=5)},
    "imagenet": {None: dict(epsilon=36 / 255, train_eps_factor=1.1, eps_ramp=0.5, lbd=0.0, power_iterations=5)},
}


@dataclass
class GloroHypers(Hypers):
    """GloRo's hyperparameters (see :class:`Gloro`)."""

    TABLE = _DEFAULTS

    epsilon: float = hyper(float, "evaluation radius epsilon, L2 in [0,1] pixel units", minimum=0.0)
    train_eps_factor: float = hyper(
        float, "training epsilon = this x epsilon after the ramp (overcompensation)", minimum=0.0
    )
    eps_ramp: float = hyper(
        float, "fraction of the epochs over which the training epsilon ramps up (log-concave)", minimum=0.0, maximum=1.0
    )
    lbd: float = hyper(float, "TRADES weight lambda (0 = the GloRo cross-entropy over C+1 logits)", minimum=0.0)
    power_iterations: int = hyper(int, "power-iteration steps per optimizer step (warm-started iterates)", minimum=1)
    robust_loss: str = hyper(
        str,
        "TRADES robust term: kl (KL to the C+1 softmax) or trades_ce (KL plus the entropy of softmax(y): "
        "the ICML code's trades_ce, Leino et al. 2021)",
        default="kl",
        choices=("kl", "trades_ce"),
    )
    lbd_start: float = hyper(
        float,
        "TRADES lambda at the start, rising linearly to --lbd at the last epoch (the ICML schedules, "
        "e.g. MNIST 0.3: 0 -> 2); none: --lbd throughout",
        optional=True,
        minimum=0.0,
    )
    tie_mask: str = hyper(
        str,
        "training bottom logit: argmax masks the predicted index only; all masks every logit equal to the "
        "maximum, as the GloRo library does (klasleino/gloro issue #9; certification always uses argmax)",
        default="argmax",
        choices=("argmax", "all"),
    )
    normalize: bool = hyper(
        bool,
        "keep the per-channel Normalize input layer; false makes it the identity, as the ICML CIFAR nets "
        "(its 1/std multiplies the Lipschitz bound by about 5 on CIFAR-10)",
        default=True,
    )

    def check(self, method: str) -> None:
        super().check(method)
        if self.train_eps_factor <= 0:
            raise CertkitError(f"{method}: --train-eps-factor must be > 0 (got {self.train_eps_factor})")


def drop_normalization(model: nn.Sequential) -> None:
    """Make the model's leading :class:`Normalize` the identity (mean 0, std 1), in place.

    The buffers stay (set to 0 and 1), so the checkpoint keeps the registry's layout and loads back as it
    was trained; a model without a leading Normalize is a one-line error rather than a silent no-op.
    """
    first = model[0] if len(model) else None
    if not isinstance(first, Normalize):
        raise CertkitError(
            "--normalize false needs a model whose first layer is certkit's Normalize (the registry's gloro-* nets)"
        )
    first.mean.zero_()
    first.std.fill_(1.0)


def all_max_bottom(net: GloroNet, logits: Tensor, epsilon: float, lipschitz: Tensor) -> Tensor:
    """The GloRo library's training ⊥ logit: every logit equal to the maximum is masked, not only index ``j``.

    With tied top logits every tied class is masked and ⊥ can fall to −inf (issue #9): unsound for a
    certificate, which is why only training may use it; certification always masks the argmax alone.
    """
    kj = net.margin_constants(lipschitz)[logits.argmax(1)]
    top = logits == logits.max(1, keepdim=True).values
    return (logits + epsilon * kj).masked_fill(top, float("-inf")).max(1).values


def trades_ce_term(logits: Tensor, full: Tensor) -> Tensor:
    """Per-example ``−Σ_c t_c log clip(q_c, 1e-7, 1 − 1e-7)`` with ``t = [softmax(y), 0]`` and
    ``q = softmax([y, y_⊥])``: the ICML code's ``trades_ce`` robust term, i.e. KL(t ‖ q) + H(softmax(y)).

    The clip is Keras's probability clip in its categorical cross-entropy on probabilities.
    """
    target = F.softmax(logits, 1)
    q = F.softmax(full, 1)[:, :-1].clamp(1e-7, 1 - 1e-7)
    return -(target * q.log()).sum(1)


class Gloro(Objective):
    """GloRo-CE / GloRo-TRADES on a :class:`GloroNet`; every hyperparameter below has a published default.

    Args (hyperparameters):
        epsilon: evaluation radius ε, L2 in [0, 1] pixel units (MNIST-like 0.3, CIFAR-10/ImageNet 36/255).
        train_eps_factor: training ε = this × ε once ramped up (MNIST 1.5, CIFAR-10 1.1).
        eps_ramp: fraction of the epochs over which the training ε ramps up (0: constant from the start).
        lbd: TRADES weight λ (0: the plain GloRo cross-entropy over C+1 logits).
        power_iterations: power-iteration steps per optimizer step (MNIST 10, CIFAR-10 5).
        robust_loss: ``kl`` (default) or the ICML code's ``trades_ce`` (KL + entropy of softmax(y)).
        lbd_start: None (λ fixed) or λ at the first epoch, rising linearly to ``lbd`` at the last.
        tie_mask: ``argmax`` (default) or the library's ``all`` (every maximal logit masked; training only).
        normalize: False makes the leading Normalize the identity, as the ICML CIFAR nets have none.

    A fixed training ε is ``eps_ramp=0`` (with ``train_eps_factor=1``: the evaluation ε itself).
    """

    name = "gloro"
    Params = GloroHypers
    hp: GloroHypers
    uses_sigma = False
    #: the optimisation recipe of the GloRo library's training scripts (gloro.md §7): Adam 1e-3 decayed
    #: exponentially to 1e-6 over the run, batch 256 and 500 epochs as the ICML MNIST-0.3 run, no weight decay
    recipe: ClassVar[dict[str, Any]] = dict(
        optimizer="adam", lr=1e-3, schedule="exp", lr_final=1e-6, weight_decay=0.0, batch_size=256, epochs=500
    )

    def __init__(self, sigma: float | None = None, **kwargs: Any) -> None:
        super().__init__(sigma, **kwargs)
        self.net: GloroNet | None = None

    # --- the model ----------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, in_shape: tuple[int, ...]) -> GloroNet:
        """Wrap a model (a registry ``Sequential(Normalize, body)`` or any 1-Lipschitz-analysable network
        ending in ``nn.Linear``) as the GloroNet this objective trains."""
        if not isinstance(model, GloroNet):
            if not isinstance(model, nn.Sequential):
                raise CertkitError(
                    f"method 'gloro' wraps an nn.Sequential ending in nn.Linear, not a {type(model).__name__}"
                )
            if not self.hp.normalize:
                drop_normalization(model)
            model = GloroNet(model, in_shape, self.hp.epsilon, self.hp.power_iterations)
        return self.bind(model)

    def bind(self, model: nn.Module) -> GloroNet:
        """The GloroNet inside ``model`` (DDP and torch.compile's wrapper unwrapped), its evaluation ε set to
        this run's."""
        net = unwrap(model)
        net = getattr(net, "_orig_mod", net)
        if not isinstance(net, GloroNet):
            raise CertkitError(
                f"method 'gloro' trains a GloroNet (one of the gloro-* architectures), not a {type(net).__name__}; "
                "wrap it, GloroNet(model, in_shape, epsilon), or train it with certkit.train(data, model, 'gloro'), "
                "which wraps an nn.Sequential"
            )
        if net.eval_epsilon != self.hp.epsilon:
            net.epsilon.fill_(self.hp.epsilon)
        self.net = net
        return net

    # --- schedule -----------------------------------------------------------------------------------
    def schedule_reads_total_epochs(self) -> bool:
        """The ε ramp and a λ ramp end at a share of the run, so they move with ``--epochs``."""
        return self.hp.eps_ramp > 0 or self.hp.lbd_start is not None

    def trades_lambda(self) -> float:
        """λ of the current epoch: ``lbd`` fixed, or linear from ``lbd_start`` to ``lbd`` at the last epoch."""
        start = self.hp.lbd_start
        if start is None:
            return self.hp.lbd
        progress = self.epoch / max(self.num_epochs - 1, 1)
        return start + (self.hp.lbd - start) * min(progress, 1.0)

    def train_epsilon(self) -> float:
        """The training ε of the current epoch (see the module docstring for the ramp)."""
        eps, top, ramp = self.hp.epsilon, self.hp.train_eps_factor, self.hp.eps_ramp
        progress = (self.epoch + 1) / max(self.num_epochs, 1)
        if ramp <= 0 or progress >= ramp:
            return eps * top
        t = progress / ramp
        return eps * math.log(math.exp(RAMP_START) + (math.exp(top) - math.exp(RAMP_START)) * t)

    # --- the loss -----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        net = self.bind(model)
        logits = model(x).float()  # fp32 loss under --amp (objectives.base)
        k_sub = net.lipschitz_constant(self.hp.power_iterations)
        eps = self.train_epsilon()
        bottom = (
            net.bottom_logit(logits, eps, k_sub)
            if self.hp.tie_mask == "argmax"
            else all_max_bottom(net, logits, eps, k_sub)
        )
        full = torch.cat([logits, bottom[:, None]], 1)
        lbd = self.trades_lambda()
        parts: dict[str, Tensor] = {}
        if lbd > 0 or self.hp.lbd_start is not None:
            ce = F.cross_entropy(logits, y)
            robust = F.softplus(bottom - torch.logsumexp(logits, 1))
            if self.hp.robust_loss == "trades_ce":
                robust = trades_ce_term(logits, full)
            robust = robust.mean()
            loss = ce + lbd * robust
            parts["lbd"] = torch.tensor(lbd)
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
        """Sums over the batch: clean accuracy, VRA at the evaluation ε, rejection rate, all of the certified
        classifier (:meth:`GloroNet.certify`: float64 logits, frozen guaranteed bound), as ``certkit certify``
        reports them. The float64 pass costs a few float32 ones (gloro-2c2f, batch 256, one CPU thread: 18 ms
        against 4 ms), small beside the epoch's training steps."""
        net = self.bind(model)
        pred, _, clean = net.certify(x, net.eval_epsilon)
        correct, certified = clean == y, pred != BOTTOM
        return {
            "clean_acc": correct.float().sum(),
            "vra": (correct & certified).float().sum(),
            "rejection": (~certified).float().sum(),
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        """``model.json`` gets the frozen bound and ε under ``gloro`` (what :func:`certkit.checkpoint.load` needs)."""
        if self.net is None:
            return {}
        # "wrapper" tells certkit.checkpoint which registered wrapper rebuilds this model around its body
        meta: dict[str, Any] = {"gloro": self.net.checkpoint_meta(), "wrapper": "gloro"}
        if not self.hp.normalize:  # the identity input layer, not the dataset's constants
            first = self.net[0]
            assert isinstance(first, Normalize)  # prepare_model put the identity Normalize there
            meta["normalization"] = {"mean": first.mean.flatten().tolist(), "std": first.std.flatten().tolist()}
        return meta
