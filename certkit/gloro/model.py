"""GloRo nets (Leino, Wang & Fredrikson, ICML 2021): a classifier that certifies itself in one forward pass.

The network is ``y = W h(x) + b`` with a Lipschitz bound ``K_sub`` on ``h``. The margin ``y_j − y_i`` is then
``K_ji = K_sub·‖w_j − w_i‖``-Lipschitz (the bias cancels), so for the predicted class ``j``:

* the **⊥ logit** is ``y_⊥ = max_{i≠j} (y_i + ε·K_ji)``; the point is certified at ε iff ``y_j > y_⊥``;
* the **certified radius** is ``min_{i≠j} (y_j − y_i)/K_ji``.

Soundness rules this module keeps (``shared/reference/gloro.md`` §4, §10):

* ``j`` is *one* index (torch's argmax: the first maximum), and only index ``j`` is masked when taking the
  max over ``i ≠ j``. Masking every entry equal to the max lets tied logits certify with an infinite radius
  (``klasleino/gloro`` issue #9); here a tie gives radius 0 and ⊥.
* Certificates come from logits evaluated in float64 (:meth:`GloroNet.exact_forward`). The safety factor
  on the constant is *relative*, but float32 logit error is *absolute* (about 1e-7 of the activations'
  size, whatever the margin): at margins near 1e-5 a float32 certificate was wrong on about half the
  points. Re-evaluating in float64 was chosen over an a priori float32 error bound from layer norms and
  the input's size because it costs one extra forward pass at certification only, where such a bound
  would be loose by the product of the layers' norms. What remains is float64 rounding, about 1e-16 of
  the *hidden activations'* size, which the logits need not show: a hidden offset of 1e12 that the head's
  bias cancels leaves logits near 1e-4 with rounding errors near 1e-4. So the rounding is bounded from
  the activations themselves: every layer bounds its own rounding by ``gain·‖input‖ + offset``
  (:meth:`~certkit.gloro.lipschitz.LayerBound.rounding`, from the textbook ``γ_n`` bound of a dot product
  in any summation order, which is why the float64 pass runs without cuDNN's FFT and Winograd
  convolutions), the norms are recorded during the float64 pass, and each layer's error is
  carried to the logits through the guaranteed bounds of the layers after it
  (:meth:`~certkit.gloro.lipschitz.LipschitzBound.drift`). The bound also covers every point of the
  ball, where nothing is evaluated: activations there are at most the guaranteed bound of the layers
  before them times the distance larger, which adds a term per unit of radius to each margin's constant
  (:class:`LogitError`). For trained nets all this is about 1e-12 of the activations, far below the
  floor that every margin is lowered by anyway, :data:`FLOAT64_ALLOWANCE` (1 + max|y|), which covers the
  certificate's own arithmetic (the margins' subtraction, the radius's division). The certified
  classifier is therefore the net evaluated in float64, as :meth:`GloroNet.certify` and
  :meth:`GloroNet.predict_with_bottom` do; a float32 ``forward`` agrees with it except within about 1e-6
  of a tie.
* The constant holds for the layers and the input shape it was computed for: inputs of another shape are
  refused (convolution and pooling bounds depend on it), and so are layers replaced, hooked, given another
  class or changed settings (a kernel size, a slope) since, and subclasses of known layers
  (:mod:`certkit.gloro.lipschitz`). Hooks on the GloroNet itself (a trainer's
  pass counter) are allowed: certification evaluates its layers as a plain Sequential, without them.
* The frozen constant is tied to the weights it was computed from: when a parameter or buffer changed
  since (its version counter or storage, checked on every call), it is verified again against the
  guaranteed bound of the current weights and refused if below.
* In training mode ``K_sub`` is the differentiable power-iteration estimate, which only the loss helpers
  use (:meth:`GloroNet.bottom_logit`, :meth:`GloroNet.forward_with_bottom`). Certificates take
  :meth:`GloroNet.certification_constant` in either mode: :meth:`GloroNet.freeze` computes the product of
  *guaranteed* per-layer upper bounds (in float64), times a small safety factor for floating-point error,
  rounded up to a float32 value so any later dtype cast is exact, and stores it in the
  ``lipschitz_frozen`` buffer (saved with the state dict). Switching to training mode discards it, because
  the weights are about to change.

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
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.gloro.lipschitz import (
    Analysis,
    LipschitzBound,
    build_bound,
    leaf_rule,
    recorded_norms,
    rounding_coefficient,
)

#: multiplies the guaranteed bound before it is frozen; covers float rounding of the bound and the logits
SAFETY_FACTOR = 1.0 + 1e-4
#: floor of the allowance on every float64 margin, per unit of (1 + the largest |logit|): covers the certificate's
#: own arithmetic (~1e-16 relative); the rounding of the forward pass itself is bounded by :class:`LogitError`
FLOAT64_ALLOWANCE = 1e-9
#: what :meth:`GloroNet.predict_with_bottom` returns for a rejected (⊥) input
BOTTOM = -1


def _round_up_to_float32(value: float) -> float:
    """The smallest float32 ≥ ``value``, so that casting the stored constant to float32 never lowers it."""
    f = np.float32(value)
    if float(f) < value:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def check_epsilon(value: float, name: str = "epsilon") -> float:
    """``value`` as a float, refused unless finite and >= 0: with ε < 0 the margin test passes on tied logits."""
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise CertkitError(f"{name} must be a finite number >= 0 (got {value})")
    return value


class LogitError(NamedTuple):
    """How far float64 logits may be from exact ones, at an input ``x`` and anywhere near it
    (:meth:`GloroNet.exact_forward`).

    For every ``x'`` within ``r`` of ``x``, ``|ŷ_k(x) − y_k(x)| + |ŷ_k(x') − y_k(x')| ≤ both[b, k] + growth[k]·r``
    (``ŷ`` computed, ``y`` exact). A margin ``y_j − y_i`` is therefore lowered by ``both_j + both_i`` and its
    constant ``K_ji`` raised by ``growth_j + growth_i``; both are about 1e-12 of the activations for trained nets.
    """

    both: Tensor  # (B, C)
    growth: Tensor  # (C,)


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


def margin_upper_bounds(weight: Tensor, lipschitz: float) -> Tensor:
    """Float64 ``(C, C)`` upper bounds on ``K_ji = lipschitz·‖w_j − w_i‖``, for certificates.

    :func:`pairwise_distances` in the head's own float32 rounds each distance to nearest, possibly *down*
    (4.5e-8 relative per rounding), and no margin allowance covers that: with a safety factor of 1 a point
    whose class flips inside its ball certified. So the distances of a certificate are computed in float64
    from the weights, and raised by their rounding (``u`` = 2^-53, ``d`` weights per row). The computed sum
    of squares is at least the exact one times ``(1 − u)^(d+2)``: the rounded difference enters squared (two
    factors), the square rounds once, and a sum of ``d`` non-negative terms rounds each at most ``d − 1`` times
    in any order. Subnormal squares (float64 weights only) add at most ``2^-1075`` each, which the clamp to
    the smallest normal number keeps within ``(1 − u)^-d`` more of the sum. The square root halves those
    exponents and rounds once, the products with ``lipschitz`` and with the factor below once each: the
    result times ``(1 − u)^-(d+4)`` is an upper bound, and ``1 + rounding_coefficient(d + 4)``, i.e.
    ``1 + 2(d+4)u`` (exact in float64), exceeds that factor.
    """
    d = weight.shape[1]
    distances = pairwise_distances(weight.detach().to(torch.float64))
    return (lipschitz * distances) * (1.0 + rounding_coefficient(d + 4))


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
        self._analysis: Analysis | None = None  # per-layer bounds and rounding of the weights of _frozen_key
        epsilon = check_epsilon(epsilon)
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
        name = ".".join(path)
        leaf_rule(name, m)  # refuses a subclass of Linear, which may compute another function
        return name

    @property
    def head(self) -> nn.Linear:
        return self.get_submodule(self.head_name)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def eval_epsilon(self) -> float:
        """ε from the buffer, which a loaded state dict sets: refused when negative or not finite."""
        return check_epsilon(float(self.epsilon))

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
            self._analysis = None
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
        analysis = self.bound.analyse()
        per_layer = analysis.bounds
        raw = self.bound.guaranteed(per_layer)
        if not math.isfinite(raw) or raw < 0:
            raise CertkitError(f"the Lipschitz bound is not finite ({raw}); the weights are corrupt")
        if estimate > raw * (1 + 1e-6):
            raise RuntimeError(
                f"internal error: power-iteration estimate {estimate} exceeds the guaranteed bound {raw}"
            )
        frozen = _round_up_to_float32(raw * safety)
        self.lipschitz_frozen.fill_(frozen)
        self._frozen_key, self._analysis = self._weights_key(), analysis
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
        weights whenever they changed since it was computed or last verified, and refused when the layers
        were replaced, hooked, given another class or changed settings since the bound was built."""
        if self.lipschitz_frozen.dtype not in (torch.float32, torch.float64):
            raise CertkitError("lipschitz_frozen was cast to a low-precision dtype; reload the model in float32/64")
        self.bound.check_layers(self)
        if not self.is_frozen:
            self.freeze()
        elif self._frozen_key != self._weights_key():
            self.verify_frozen()
        return float(self.lipschitz_frozen)

    @torch.no_grad()
    def verify_frozen(self) -> float:
        """The guaranteed bound of the current weights; raises if the frozen constant is below it (weights
        changed after :meth:`freeze`, or a state dict whose constant does not belong to its weights)."""
        analysis = self.bound.analyse()
        frozen, raw = float(self.lipschitz_frozen), self.bound.guaranteed(analysis.bounds)
        if not frozen >= raw:
            raise CertkitError(
                f"the frozen Lipschitz bound {frozen} is below the guaranteed bound {raw} of the current weights "
                "(changed after freeze()?); refusing to certify with it: call freeze() again"
            )
        self._frozen_key, self._analysis = self._weights_key(), analysis
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
        left as it is): what certificates are computed from.

        The layers run as a plain Sequential, so hooks on the GloroNet itself are not part of it, and without
        cuDNN; inputs of another shape than ``in_shape`` are refused, since the bound's convolution and pooling
        constants hold for that shape only.
        """
        if tuple(x.shape[1:]) != self.in_shape:
            raise CertkitError(
                f"this GloRo net's Lipschitz bound holds for inputs of shape {self.in_shape}; got {tuple(x.shape[1:])}"
            )
        layers = nn.Sequential(OrderedDict(self._modules))
        tensors = itertools.chain(layers.named_parameters(), layers.named_buffers())
        double = {name: t.double() if t.is_floating_point() else t for name, t in tensors}
        # The rounding bounds (LayerBound.rounding) hold for sums computed by additions in any order, as torch's
        # own CUDA convolutions (im2col + GEMM, or direct) and its CPU ones compute them; cuDNN may choose an FFT
        # or Winograd algorithm instead, whose error is not bounded by the magnitudes of the summed terms.
        with torch.backends.cudnn.flags(enabled=False):
            return torch.func.functional_call(layers, double, (x.double(),))

    @torch.no_grad()
    def exact_forward(self, x: Tensor) -> tuple[Tensor, LogitError]:
        """The float64 logits of ``x`` and how far they may be from exact ones (:class:`LogitError`).

        The norms of the layers' inputs are recorded during the pass and carried to the logits by
        :meth:`~certkit.gloro.lipschitz.LipschitzBound.drift`; the head adds its own rounding, at most
        ``γ_{n+1}(‖w_k‖·‖ĥ‖ + |b_k|)`` on logit ``k``. The constant is verified first, since the rounding
        coefficients are read off the same weights.
        """
        self.certification_constant()
        facts = self._analysis
        assert facts is not None  # set with the frozen constant's key
        head = self.head
        with recorded_norms({**self.bound.watched(), self.head_name: (head, False)}) as norms:
            logits = self.exact_logits(x)
        drift = self.bound.drift(logits.new_zeros(len(logits)), norms, facts)
        rows = torch.linalg.vector_norm(head.weight.detach().double(), dim=1)
        bias = torch.zeros_like(rows) if head.bias is None else head.bias.detach().double().abs()
        c = rounding_coefficient(head.in_features + 1)
        both = rows * drift.both[:, None] + c * (rows * (2 * norms[self.head_name] + drift.both)[:, None] + 2 * bias)
        growth = rows * drift.growth + c * rows * (drift.lipschitz + drift.growth)
        return logits, LogitError(both, growth)

    # --- ⊥ logit and certificates --------------------------------------------------------------------------
    def margin_constants(self, lipschitz: Tensor | float | None = None) -> Tensor:
        """``(C, C)`` matrix ``K[j, i] = K_sub·‖w_j − w_i‖``, the Lipschitz constant of ``y_j − y_i``.

        ``lipschitz`` None takes :meth:`lipschitz_constant`: in training mode the power-iteration estimate,
        which is for the loss helpers only (it approaches the true constant from below). It is computed in
        the head's dtype and rounded to nearest, which suits a loss; certificates take
        :func:`margin_upper_bounds` instead.
        """
        k = self.lipschitz_constant() if lipschitz is None else lipschitz
        w = self.head.weight
        if isinstance(k, Tensor):
            k = k.to(w.dtype)
        return k * pairwise_distances(w)

    def bottom_logit(
        self, logits: Tensor, epsilon: float | Tensor | None = None, lipschitz: Tensor | float | None = None
    ) -> Tensor:
        """``y_⊥ = max_{i≠j}(y_i + ε·K_ji)`` with ``j`` the (first) argmax; shape ``(B,)``.

        A training-loss helper: without ``lipschitz`` it uses :meth:`lipschitz_constant` (the estimate in
        training mode) and allows for no rounding; certificates come from :meth:`certify_logits`.
        """
        eps = self.eval_epsilon if epsilon is None else epsilon
        kj = self.margin_constants(lipschitz)[logits.argmax(1)]  # (B, C): row j of K
        j = logits.argmax(1, keepdim=True)
        shifted = (logits + eps * kj).scatter(1, j, float("-inf"))  # mask index j only, never ties
        return shifted.max(1).values

    def forward_with_bottom(self, x: Tensor, epsilon: float | None = None) -> Tensor:
        """``(B, C+1)``: the logits with ``y_⊥`` appended (what the GloRo losses act on; see :meth:`bottom_logit`)."""
        logits = self(x)
        return torch.cat([logits, self.bottom_logit(logits, epsilon)[:, None]], 1)

    def certify_logits(
        self, logits: Tensor, error: LogitError, epsilon: float | None = None, lipschitz: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(predicted class ``j``, certified radius, certified-at-ε mask) from a batch of logits and the bound
        ``error`` on their rounding (:meth:`exact_forward`).

        Every margin ``d_i = y_j − y_i`` is first lowered by ``A_i = both_j + both_i`` plus the floor
        ``FLOAT64_ALLOWANCE·(1 + max|y|)``, and its constant is ``K'_ji = K_ji + growth_j + growth_i``. Radius
        ``min_{i≠j}(d_i − A_i)/K'_ji``: 0 when any ``d_i ≤ A_i`` (ties included). Certified requires *both*
        every ``d_i − A_i > ε·K'_ji`` and radius > ε, so the two formulas cannot disagree by a rounding error in
        the lenient direction; non-finite logits never certify. ``lipschitz`` None takes the guaranteed
        :meth:`certification_constant`, never the training estimate, whatever the mode.
        """
        eps = check_epsilon(self.eval_epsilon if epsilon is None else epsilon)
        k = self.certification_constant() if lipschitz is None else lipschitz
        kmat = margin_upper_bounds(self.head.weight, float(k)).to(logits.dtype)
        j = logits.argmax(1, keepdim=True)
        growth = error.growth.to(logits.dtype)
        kj = kmat[j[:, 0]] + growth[j] + growth
        floor = FLOAT64_ALLOWANCE * (1.0 + logits.abs().amax(1, keepdim=True))
        d = logits.gather(1, j) - logits - (error.both.gather(1, j) + error.both + floor)
        ratio = torch.where(d > 0, d / kj, torch.zeros_like(d)).scatter(1, j, float("inf"))
        radius = ratio.min(1).values
        slack = (d - eps * kj).scatter(1, j, float("inf")).min(1).values
        certified = (slack > 0) & (radius > eps) & torch.isfinite(logits).all(1)
        return j[:, 0], radius, certified

    @torch.no_grad()
    def certify(self, x: Tensor, epsilon: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(prediction with ⊥ = -1, certified radius, clean prediction) from the float64 logits, the bound on
        their rounding and the frozen constant (verified against the current weights)."""
        logits, error = self.exact_forward(x)  # verifies the frozen constant, which needs no second check here
        j, radius, ok = self.certify_logits(logits, error, epsilon, float(self.lipschitz_frozen))
        return torch.where(ok, j, torch.full_like(j, BOTTOM)), radius, j

    def predict_with_bottom(self, x: Tensor, epsilon: float | None = None) -> Tensor:
        """The GloRo prediction: the class, or -1 (⊥) where the point is not certified at ε."""
        return self.certify(x, epsilon)[0]

    def certified_radius(self, x: Tensor) -> Tensor:
        """The deterministic L2 certified radius of each input (0 on ties), with the frozen constant."""
        return self.certify(x)[1]
