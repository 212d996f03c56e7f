"""GloRo nets (Leino, Wang & Fredrikson, ICML 2021): a classifier that certifies itself in one forward pass.

The network is ``y = W h(x) + b`` with a Lipschitz bound ``K_sub`` on ``h``. The margin ``y_j − y_i`` is then
``K_ji = K_sub·‖w_j − w_i‖``-Lipschitz (the bias cancels), so for the predicted class ``j``:

* the **⊥ logit** is ``y_⊥ = max_{i≠j} (y_i + ε·K_ji)``; the point is certified at ε iff ``y_j > y_⊥``;
* the **certified radius** is ``min_{i≠j} (y_j − y_i)/K_ji``.

Soundness rules this module keeps (``shared/reference/gloro.md`` §4, §10):

* ``j`` is *one* index (torch's argmax: the first maximum), and only index ``j`` is masked when taking the
  max over ``i ≠ j``. Masking every entry equal to the max lets tied logits certify with an infinite radius
  (``klasleino/gloro`` issue #9); here a tie gives radius 0 and ⊥.
* Certificates come from logits evaluated in float64 (:meth:`GloroNet.exact_logits`). The safety factor
  on the constant is *relative*, but float32 logit error is *absolute* (about 1e-7 of the activations'
  size, whatever the margin): at margins near 1e-5 a float32 certificate was wrong on about half the
  points. Re-evaluating in float64 was chosen over an a priori float32 error bound from layer norms and
  the input's size because it needs nothing per layer type (residual blocks, pools and MinMax included)
  and costs one extra forward pass at certification only, where such a bound would be loose by the
  product of the layers' norms. What remains is float64 rounding, about 1e-16 of the same size; every
  margin is lowered by :data:`FLOAT64_ALLOWANCE` (1 + max|y|), millions of times that, which covers its
  rounding at the point and anywhere in the ball. The certified classifier is therefore the net evaluated
  in float64, as :meth:`GloroNet.certify` and :meth:`GloroNet.predict_with_bottom` do; a float32
  ``forward`` agrees with it except within about 1e-6 of a tie.
* The frozen constant is tied to the weights it was computed from: when a parameter or buffer changed
  since (its version counter or storage, checked on every call), it is verified again against the
  guaranteed bound of the current weights and refused if below.
* In training mode ``K_sub`` is the differentiable power-iteration estimate. For evaluation
  :meth:`GloroNet.freeze` replaces it by the product of *guaranteed* per-layer upper bounds (computed in
  float64), times a small safety factor for floating-point error, rounded up to a float32 value so any
  later dtype cast is exact, and stores it in the ``lipschitz_frozen`` buffer (saved with the state dict).
  Switching back to training mode discards it, because the weights are about to change.

:class:`GloroNet` *is* the registry model (``Sequential(Normalize, body)``) with three kinds of buffers
added — the frozen constant, the evaluation ε and the power-iteration iterates — so its weights keep the
registry's parameter names and ``forward`` still returns the plain C logits; the ⊥ logit is an extra
method, not an extra output, so accuracy code and attacks work unchanged.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.gloro.lipschitz import LipschitzBound, build_bound

#: multiplies the guaranteed bound before it is frozen; covers float rounding of the bound and the logits
SAFETY_FACTOR = 1.0 + 1e-4
#: allowance on every float64 margin, per unit of (1 + the largest |logit|): float64 rounding is ~1e-16
FLOAT64_ALLOWANCE = 1e-9
#: what :meth:`GloroNet.predict_with_bottom` returns for a rejected (⊥) input
BOTTOM = -1


def _round_up_to_float32(value: float) -> float:
    """The smallest float32 ≥ ``value``, so that casting the stored constant to float32 never lowers it."""
    f = np.float32(value)
    if float(f) < value:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def pairwise_distances(weight: Tensor, max_entries: int = 1 << 24) -> Tensor:
    """``D[i, j] = ‖w_i − w_j‖₂`` for the rows of ``weight``, by explicit differences (never Gram tricks).

    The ``‖a‖² + ‖b‖² − 2a·b`` form (``torch.cdist`` on large inputs) cancels catastrophically and can
    underestimate small distances — fatal for a certificate. The squared distance is clamped from below by
    the tiniest normal number before the square root, which only ever *raises* it and keeps the gradient
    finite on the diagonal.
    """
    c, d = weight.shape
    rows = max(1, max_entries // max(1, c * d))
    chunks = [((weight[i : i + rows, None, :] - weight[None, :, :]) ** 2).sum(-1) for i in range(0, c, rows)]
    sq = torch.cat(chunks, 0)
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


class GloroNet(nn.Sequential):
    """A Sequential classifier whose last module (possibly nested) is a ``Linear`` head, made self-certifying.

    Args:
        model: the classifier, typically ``create_model("gloro-4c3f", ...)`` = ``Sequential(Normalize, body)``.
            Every layer before the head must have a known Lipschitz bound (see :mod:`certkit.gloro.lipschitz`).
        in_shape: input shape ``(C, H, W)``; convolution bounds depend on the real spatial size.
        epsilon: the evaluation radius ε (L2, pixel units), kept as a buffer so a checkpoint knows it.
        power_iterations: power-iteration steps per :meth:`lipschitz_constant` call in training mode.

    Example::

        net = GloroNet(create_model("gloro-2c2f", 10, (1, 28, 28)), (1, 28, 28), epsilon=0.3)
        ...train with the "gloro" objective...
        net.eval(); meta = net.freeze()
        pred = net.predict_with_bottom(images)   # (B,), -1 where rejected
    """

    lipschitz_frozen: Tensor  # buffers, registered in __init__
    epsilon: Tensor

    def __init__(
        self, model: nn.Sequential, in_shape: Sequence[int], epsilon: float, power_iterations: int = 5
    ) -> None:
        if not isinstance(model, nn.Sequential):
            raise CertkitError("GloroNet needs an nn.Sequential model (the registry's Sequential(Normalize, body))")
        super().__init__(OrderedDict(model._modules.items()))
        self._frozen_key: Hashable = None  # the weights' state when lipschitz_frozen was computed or verified
        if not epsilon >= 0:
            raise CertkitError(f"epsilon must be >= 0 (got {epsilon})")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.power_iterations = int(power_iterations)
        self.head_name = self._find_head()
        head = self.head
        if head.out_features < 2:
            raise CertkitError("a GloRo head needs at least 2 classes")
        self.bound: LipschitzBound = build_bound(self, self.in_shape, exclude=[head])
        ref = head.weight
        self.register_buffer("lipschitz_frozen", torch.zeros((), dtype=torch.float64, device=ref.device))
        self.register_buffer("epsilon", torch.tensor(float(epsilon), dtype=torch.float64, device=ref.device))
        self._freeze_report: dict[str, Any] | None = None
        self._iterate_keys: dict[str, str] = {}
        for name, tensor in self.bound.init_iterates(dtype=ref.dtype).items():
            key = "lip_iterate_" + name.replace(".", "_")
            self._iterate_keys[name] = key
            self.register_buffer(key, tensor.to(ref.device))

    @classmethod
    def from_arch(
        cls,
        arch: str,
        num_classes: int,
        in_shape: Sequence[int],
        epsilon: float,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        power_iterations: int = 5,
    ) -> GloroNet:
        """``GloroNet(create_model(arch, ...))``: what ``certkit train --method gloro`` builds."""
        from certkit.models.registry import create_model

        return cls(create_model(arch, num_classes, in_shape, mean, std), in_shape, epsilon, power_iterations)

    # --- structure -----------------------------------------------------------------------------------------
    def _find_head(self) -> str:
        path: list[str] = []
        m: nn.Module = self
        while isinstance(m, nn.Sequential):
            if len(m) == 0:
                raise CertkitError(
                    "GloroNet: the model ends with an empty Sequential; its last layer must be nn.Linear"
                )
            name = list(m._modules)[-1]
            path.append(name)
            m = m._modules[name]
        if not isinstance(m, nn.Linear):
            raise CertkitError(f"GloroNet: the last layer must be nn.Linear (the head), found {type(m).__name__}")
        return ".".join(path)

    @property
    def head(self) -> nn.Linear:
        return self.get_submodule(self.head_name)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def eval_epsilon(self) -> float:
        return float(self.epsilon)

    @property
    def is_frozen(self) -> bool:
        return bool(self.lipschitz_frozen > 0)

    def _iterates(self) -> dict[str, Tensor]:
        return {name: getattr(self, key) for name, key in self._iterate_keys.items()}

    def train(self, mode: bool = True) -> GloroNet:
        """As ``nn.Module.train``; entering training mode discards the frozen constant (weights will change)."""
        if mode and "lipschitz_frozen" in self._buffers:  # absent while __init__ records layer shapes
            self.lipschitz_frozen.zero_()
            self._freeze_report = None
            self._frozen_key = None
        return super().train(mode)

    # --- the Lipschitz constant --------------------------------------------------------------------------
    def lipschitz_constant(self, iterations: int | None = None) -> Tensor:
        """``K_sub``: the power-iteration estimate in training mode, the frozen guaranteed bound in eval mode.

        In training mode each call advances the warm-started iterates by ``iterations`` steps (default
        ``power_iterations``) and returns a value differentiable in the weights. In eval mode the model is
        frozen first if it is not yet (deterministic: it depends on the weights only).
        """
        if self.training:
            n = self.power_iterations if iterations is None else int(iterations)
            return self.bound.estimate(self._iterates(), n)
        self.certification_constant()
        return self.lipschitz_frozen

    @torch.no_grad()
    def freeze(self, safety: float = SAFETY_FACTOR) -> dict[str, Any]:
        """Compute, store and return the certification constant; call it in eval mode before saving.

        Steps: converge copies of the power iterates in float64 (a *lower* bound, kept as a tightness
        diagnostic; the training iterates are left alone, so evaluating or saving never changes how
        training continues); compute each layer's guaranteed float64 bound; multiply their product by
        ``safety``; round up to float32; store in ``lipschitz_frozen``. Returns JSON-ready metadata for
        ``model.json``.
        """
        if not safety >= 1.0:
            raise CertkitError(f"the safety factor must be >= 1 (got {safety})")
        estimate = self.bound.converge({k: v.clone() for k, v in self._iterates().items()})
        per_layer = self.bound.guaranteed_layers()
        raw = self.bound.guaranteed(per_layer)
        if not math.isfinite(raw) or raw < 0:
            raise CertkitError(f"the Lipschitz bound is not finite ({raw}); the weights are corrupt")
        if estimate > raw * (1 + 1e-6):
            raise RuntimeError(
                f"internal error: power-iteration estimate {estimate} exceeds the guaranteed bound {raw}"
            )
        frozen = _round_up_to_float32(raw * safety)
        self.lipschitz_frozen.fill_(frozen)
        self._frozen_key = self._weights_key()
        self._freeze_report = {
            "lipschitz_bound": frozen,
            "lipschitz_guaranteed": raw,
            "lipschitz_estimate": estimate,
            "safety_factor": safety,
            "epsilon": self.eval_epsilon,
            "layers": self.bound.report(per_layer),
        }
        return dict(self._freeze_report)

    def checkpoint_meta(self) -> dict[str, Any]:
        """The ``gloro`` entry of ``model.json``: ε, power iterations and the frozen bound with its report.

        Freezes first if needed, so the saved ``lipschitz_frozen`` buffer and the metadata agree. The
        buffer is what certification uses; the metadata documents it (and lets :meth:`from_meta` rebuild).
        """
        if not self.is_frozen or self._freeze_report is None:
            self.freeze()
        assert self._freeze_report is not None
        return dict(self._freeze_report, epsilon=self.eval_epsilon, power_iterations=self.power_iterations)

    @classmethod
    def from_meta(cls, model: nn.Sequential, meta: dict[str, Any]) -> GloroNet:
        """Wrap a freshly built registry model as described by a checkpoint's ``model.json``.

        Only the structure is rebuilt here; the weights, the frozen constant, ε and the iterates come from
        the state dict that :func:`certkit.checkpoint.load` loads next.
        """
        info = meta.get("gloro")
        if not isinstance(info, dict) or "epsilon" not in info:
            raise CertkitError("a GloRo checkpoint needs a 'gloro' entry with its epsilon in model.json")
        return cls(model, meta["in_shape"], float(info["epsilon"]), int(info.get("power_iterations", 5)))

    def certification_constant(self) -> float:
        """The frozen ``K_sub`` (freezing now if needed) as a Python float, verified again against the
        weights whenever they changed since it was computed or last verified."""
        if self.lipschitz_frozen.dtype not in (torch.float32, torch.float64):
            raise CertkitError("lipschitz_frozen was cast to a low-precision dtype; reload the model in float32/64")
        if not self.is_frozen:
            self.freeze()
        elif self._frozen_key != self._weights_key():
            self.verify_frozen()
        return float(self.lipschitz_frozen)

    @torch.no_grad()
    def verify_frozen(self) -> float:
        """The guaranteed bound of the current weights; raises if the frozen constant is below it (weights
        changed after :meth:`freeze`, or a state dict whose constant does not belong to its weights)."""
        frozen, raw = float(self.lipschitz_frozen), self.bound.guaranteed()
        if not frozen >= raw:
            raise CertkitError(
                f"the frozen Lipschitz bound {frozen} is below the guaranteed bound {raw} of the current weights "
                "(changed after freeze()?); refusing to certify with it: call freeze() again"
            )
        self._frozen_key = self._weights_key()
        return raw

    def _weights_key(self) -> Hashable:
        """Cheap identity of the weights: every parameter's and buffer's storage and in-place version counter
        (bumped by optimizers, ``load_state_dict`` and in-place edits under ``no_grad``; edits through
        ``.data`` bypass it). The constant's own buffers and ε are left out."""
        own = {"lipschitz_frozen", "epsilon", *self._iterate_keys.values()}
        tensors = itertools.chain(self.named_parameters(), self.named_buffers())
        return tuple((name, t.data_ptr(), t._version) for name, t in tensors if name not in own)

    @torch.no_grad()
    def exact_logits(self, x: Tensor) -> Tensor:
        """The logits of ``x`` evaluated in float64 (weights, buffers and input cast up; the module itself is
        left as it is): what certificates are computed from."""
        tensors = itertools.chain(self.named_parameters(), self.named_buffers())
        double = {name: t.double() if t.is_floating_point() else t for name, t in tensors}
        return torch.func.functional_call(self, double, (x.double(),))

    # --- ⊥ logit and certificates --------------------------------------------------------------------------
    def margin_constants(self, lipschitz: Tensor | float | None = None) -> Tensor:
        """``(C, C)`` matrix ``K[j, i] = K_sub·‖w_j − w_i‖``, the Lipschitz constant of ``y_j − y_i``."""
        k = self.lipschitz_constant() if lipschitz is None else lipschitz
        w = self.head.weight
        if isinstance(k, Tensor):
            k = k.to(w.dtype)
        return k * pairwise_distances(w)

    def bottom_logit(
        self, logits: Tensor, epsilon: float | Tensor | None = None, lipschitz: Tensor | float | None = None
    ) -> Tensor:
        """``y_⊥ = max_{i≠j}(y_i + ε·K_ji)`` with ``j`` the (first) argmax; shape ``(B,)``."""
        eps = self.eval_epsilon if epsilon is None else epsilon
        kj = self.margin_constants(lipschitz)[logits.argmax(1)]  # (B, C): row j of K
        j = logits.argmax(1, keepdim=True)
        shifted = (logits + eps * kj).scatter(1, j, float("-inf"))  # mask index j only, never ties
        return shifted.max(1).values

    def forward_with_bottom(self, x: Tensor, epsilon: float | None = None) -> Tensor:
        """``(B, C+1)``: the logits with ``y_⊥`` appended (what the GloRo losses act on)."""
        logits = self(x)
        return torch.cat([logits, self.bottom_logit(logits, epsilon)[:, None]], 1)

    def certify_logits(
        self, logits: Tensor, epsilon: float | None = None, lipschitz: Tensor | float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(predicted class ``j``, certified radius, certified-at-ε mask) from a batch of logits.

        Every margin ``d_i = y_j − y_i`` is first lowered by the absolute allowance
        ``A = FLOAT64_ALLOWANCE·(1 + max|y|)`` for rounding of the logits (meant for
        :meth:`exact_logits`; float32 logits would need far more). Radius ``min_{i≠j}(d_i − A)/K_ji``: 0 when
        any ``d_i ≤ A`` (ties included), +inf for a margin whose constant is 0 (identical head rows: the
        margin is constant). Certified requires *both* ``y_j − A > y_⊥`` and radius > ε, so the two
        formulas cannot disagree by a rounding error in the lenient direction; non-finite logits never certify.
        """
        eps = self.eval_epsilon if epsilon is None else float(epsilon)
        kmat = self.margin_constants(lipschitz).to(logits.dtype)
        j = logits.argmax(1, keepdim=True)
        kj = kmat[j[:, 0]]
        allowance = FLOAT64_ALLOWANCE * (1.0 + logits.abs().amax(1, keepdim=True))
        d = logits.gather(1, j) - logits - allowance
        ratio = torch.where(d > 0, d / kj, torch.zeros_like(d)).scatter(1, j, float("inf"))
        radius = ratio.min(1).values
        bottom = (logits + eps * kj).scatter(1, j, float("-inf")).max(1).values
        certified = (
            (logits.gather(1, j)[:, 0] - allowance[:, 0] > bottom) & (radius > eps) & torch.isfinite(logits).all(1)
        )
        return j[:, 0], radius, certified

    @torch.no_grad()
    def certify(self, x: Tensor, epsilon: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(prediction with ⊥ = -1, certified radius, clean prediction) from the float64 logits and the
        frozen constant (verified against the current weights)."""
        k = self.certification_constant()
        j, radius, ok = self.certify_logits(self.exact_logits(x), epsilon, k)
        return torch.where(ok, j, torch.full_like(j, BOTTOM)), radius, j

    def predict_with_bottom(self, x: Tensor, epsilon: float | None = None) -> Tensor:
        """The GloRo prediction: the class, or -1 (⊥) where the point is not certified at ε."""
        return self.certify(x, epsilon)[0]

    def certified_radius(self, x: Tensor) -> Tensor:
        """The deterministic L2 certified radius of each input (0 on ties), with the frozen constant."""
        return self.certify(x)[1]
