"""Upper bounds on the L2 Lipschitz constant of a network, layer by layer.

A GloRo certificate is only as sound as its Lipschitz bound, so this module keeps two numbers per layer
apart (see ``shared/reference/gloro.md`` §2–§4):

* the **training estimate**: a differentiable power-iteration value ``‖A v‖/‖v‖`` at a persistent,
  warm-started, detached iterate ``v``. It approaches the operator norm *from below* and is what the loss
  sees, because its gradient ``≈ u vᵀ`` is cheap and informative;
* the **guaranteed bound** used for certification, computed in float64: the exact ``σ_max`` of a dense
  weight (SVD), and for a convolution on its *real* input size, stride and zero padding either the exact
  norm of the unrolled operator (small layers) or the top singular value of a circular convolution that
  contains it (FFT on the polyphase kernel, see :func:`conv_fft_bound`).

Every layer kind has an explicit rule (:data:`LAYER_RULES`); any other module raises :class:`CertkitError`
naming it, because a silent constant of 1 (what public code does) voids every certificate behind it.
Composition is only understood through ``nn.Sequential`` (product) and :class:`~certkit.gloro.layers.Residual`
(``1 + L(g)``, for an inner output of its input's shape): a custom module's ``forward`` could wire its children
any way, so it is refused too. For the same reason a rule applies to a module only when it computes what the
rule assumes (:func:`check_plain`): a leaf layer must be of exactly its torch class (or one of certkit's fast
paths for it, which compute the same function), since a subclass may redefine ``forward`` or a helper it calls;
a Sequential or Residual may be subclassed only without redefining how it is called; and no module may carry a
forward hook or pre-hook, nor may a global one be registered, since a hook can replace a layer's input or
output. The bound also records every module's class and every leaf's settings (kernel size, slope, ...), which
its rule read once, and refuses a model whose classes or settings changed since
(:meth:`LipschitzBound.check_layers`); parameters and buffers are read again whenever they change.

Each layer also bounds its own float64 rounding (:meth:`LayerBound.rounding`), which
:meth:`LipschitzBound.drift` carries through the network with the per-layer bounds: a certificate computed
from float64 logits needs the distance between them and the exact ones, and that distance scales with the
hidden activations, not with the logits (see :mod:`certkit.gloro.model`). These bounds assume that every
sum is computed by additions in some order (a direct, im2col or GEMM kernel), whose error is componentwise;
an FFT or Winograd convolution's is not, which is why the float64 pass runs without cuDNN.

Convolutions need the shape of their input, which the layer does not store; :func:`build_bound` records
every layer's input and output shapes with one forward pass of a dummy input of the model's ``in_shape``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.gloro.layers import MinMax, Residual
from certkit.models.layers import CALL_PATH, Normalize, call_override, torch_type

#: unrolled operators up to this many float64 entries get their exact norm (≈128 MiB)...
EXACT_MAX_ENTRIES = 1 << 24
#: ...if forming their Gram matrix costs at most this many multiply-adds (a few seconds on one CPU core)
EXACT_MAX_FLOPS = 1e10
#: basis vectors pushed through the layer at once when unrolling it (bounds the memory of the basis)
UNROLL_CHUNK = 512
#: float64's unit roundoff (round to nearest): every float64 operation is exact up to a factor 1 ± u
UNIT_ROUNDOFF = 2.0**-53

Shape = tuple[int, ...]


def rounding_coefficient(ops: int) -> float:
    """``2·ops·u``: the relative error of a result of ``ops`` chained float64 operations, such as a dot product
    of length ``ops − 1`` plus a bias, in any summation order (Higham's ``γ_ops = ops·u/(1 − ops·u)``, which it
    exceeds while ``ops·u ≤ 1/2``). The factor 2 also covers the rounding of the error bounds' own arithmetic.
    """
    return 2.0 * ops * UNIT_ROUNDOFF


def _unit(v: Tensor) -> Tensor:
    """``v/‖v‖``, dividing only when the norm is nonzero.

    An unconditional ``+eps`` in the denominator deflates the estimate of small weights (a weight of 1e-5
    reads as 9.4e-6 in ``klasleino/gloro`` issue #8); a zero iterate is left zero and replaced afterwards by
    :func:`_revive`.
    """
    n = torch.linalg.vector_norm(v)
    return v / torch.where(n > 0, n, torch.ones_like(n))


def _revive(v: Tensor) -> Tensor:
    """A zero iterate (the weight is zero or ``v`` fell in its null space) restarts from the uniform vector.

    Deterministic and free of host synchronisation, so it neither consumes the RNG nor stalls a GPU.
    """
    fallback = torch.full_like(v, 1.0 / math.sqrt(v.numel()))
    return torch.where(torch.linalg.vector_norm(v) > 0, v, fallback)


# --------------------------------------------------------------------------------------------------------
# Per-layer bounds
# --------------------------------------------------------------------------------------------------------
class LayerBound:
    """The bound of one layer: a training estimate and a guaranteed float64 upper bound.

    Constant layers (activations, pooling, normalization) return the same value for both. Layers with
    weights set ``iterate_shape`` and implement :meth:`apply`/:meth:`adjoint` of their linear part.
    """

    #: shape of the power-iteration iterate (None: the bound needs none)
    iterate_shape: Shape | None = None

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    # -- weighted layers --------------------------------------------------------------------------------
    def weight(self) -> Tensor:
        raise NotImplementedError

    def apply(self, v: Tensor, weight: Tensor) -> Tensor:
        """The layer's linear part (no bias) applied to ``v``."""
        raise NotImplementedError

    def adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        """The transpose of :meth:`apply`."""
        raise NotImplementedError

    def power_iterate(self, v: Tensor, iterations: int, weight: Tensor | None = None) -> Tensor:
        """``iterations`` steps of ``v ← AᵀA v / ‖AᵀA v‖`` without gradient."""
        w = (self.weight() if weight is None else weight).detach()
        with torch.no_grad():
            v = v.to(w.dtype)
            for _ in range(iterations):
                v = _unit(self.adjoint(self.apply(v, w), w))
            return _revive(v)

    def estimate(self, v: Tensor | None, iterations: int) -> tuple[Tensor | float, Tensor | None]:
        """(differentiable estimate, new iterate). The estimate is ``‖A v‖/‖v‖`` with ``v`` detached.

        Constant layers return a plain float, so they neither pick a device nor promote the dtype.
        """
        if self.iterate_shape is None:
            return self.constant(), None
        assert v is not None
        v = self.power_iterate(v, iterations)
        w = self.weight()
        return torch.linalg.vector_norm(self.apply(v, w)) / torch.linalg.vector_norm(v), v

    def converged_estimate(self, v: Tensor, tol: float = 1e-6, max_iterations: int = 500) -> tuple[float, Tensor]:
        """Power iteration in float64 until the estimate's relative change over 10 steps is below ``tol``.

        Still a *lower* bound on the norm: reported next to the guaranteed bound to show its tightness.
        """
        w = self.weight().detach().double()
        v = v.detach().double()
        prev = 0.0
        value = 0.0
        for _ in range(0, max_iterations, 10):
            v = self.power_iterate(v, 10, w)
            value = float(torch.linalg.vector_norm(self.apply(v, w)) / torch.linalg.vector_norm(v))
            if abs(value - prev) <= tol * max(value, 1e-300):
                break
            prev = value
        return value, v

    # -- constant layers --------------------------------------------------------------------------------
    def constant(self) -> float:
        raise NotImplementedError

    def guaranteed(self) -> float:
        """A sound upper bound on the layer's L2 Lipschitz constant, in float64."""
        return self.constant()

    def rounding(self) -> tuple[float, float]:
        """``(gain, offset)``: evaluated in float64 on a computed input ``x̂``, the layer's output is within
        ``gain·‖x̂‖ + offset`` (L2, per sample) of its exact value on ``x̂``. Read from the weights at call time."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.kind})"


class ConstantBound(LayerBound):
    """A layer whose Lipschitz constant is a fixed number (activation, reshape, non-overlapping pool).

    ``ops`` is the number of rounded float64 operations behind each output element (0: the layer only moves,
    selects or compares values, exactly). Each output is then within ``rounding_coefficient(ops)`` of a
    nonnegative combination of ``|x̂|`` of norm at most ``value·‖x̂‖`` (the window mean of ``|x̂|`` for a pool,
    ``|x̂|`` scaled for an activation), hence the gain ``rounding_coefficient(ops)·value``.
    """

    def __init__(self, name: str, module: nn.Module, value: float, why: str, ops: int = 0) -> None:
        super().__init__(name, module)
        self.value = float(value)
        self.why = why
        self.ops = ops

    def constant(self) -> float:
        return self.value

    def rounding(self) -> tuple[float, float]:
        return rounding_coefficient(self.ops) * self.value, 0.0


class NormalizeBound(LayerBound):
    """``(x − μ)/s`` per channel: ``1/min_c s_c``. Read from the buffer at call time (it is loaded later)."""

    module: Normalize

    def __init__(self, name: str, module: Normalize, in_shape: Shape) -> None:
        super().__init__(name, module)
        self.in_shape = in_shape

    def constant(self) -> float:
        std = self.module.std.detach().double()
        if not bool((std > 0).all()):
            raise CertkitError(
                f"layer {self.name!r}: Normalize has a non-positive std; its Lipschitz bound is infinite"
            )
        return float(1.0 / std.min())

    def rounding(self) -> tuple[float, float]:
        # a subtraction and a division: each output within γ_2·(|x̂| + |μ|)/s of its exact value
        c = rounding_coefficient(2)
        shift = self.module.mean.detach().double() / self.module.std.detach().double()
        return c * self.constant(), c * float(torch.linalg.vector_norm(shift.expand(1, *self.in_shape)))


class LinearBound(LayerBound):
    """Dense layer: power iteration on ``WᵀW`` for training, exact ``σ_max(W)`` in float64 to certify.

    On an input of shape ``(..., in_features)`` the layer maps every row alike: a block-diagonal operator with
    the norm of ``W``, but with the bias added once per row (``in_shape``, without the batch dimension).
    """

    module: nn.Linear

    def __init__(self, name: str, module: nn.Linear, in_shape: Shape) -> None:
        super().__init__(name, module)
        self.iterate_shape = (1, module.in_features)
        self.rows = math.prod(in_shape[:-1])

    def weight(self) -> Tensor:
        return self.module.weight

    def apply(self, v: Tensor, weight: Tensor) -> Tensor:
        return v @ weight.t()

    def adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        return u @ weight

    def guaranteed(self) -> float:
        return float(torch.linalg.matrix_norm(self.weight().detach().double(), ord=2))

    def rounding(self) -> tuple[float, float]:
        # each output within γ_{n+1}·(|W||x̂| + |b|) (n products, their sum and the bias), and ‖|W||x̂|‖ ≤ ‖|W|‖·‖x̂‖;
        # the bias enters every row, so its norm over the output is sqrt(rows)·‖b‖
        c = rounding_coefficient(self.module.in_features + 1)
        bias = self.module.bias
        offset = 0.0 if bias is None else math.sqrt(self.rows) * float(torch.linalg.vector_norm(bias.detach().double()))
        return c * _abs_norm(self.weight().detach().double()), c * offset


def _abs_norm(a: Tensor) -> float:
    """An upper bound on ``‖|A|‖₂``: ``sqrt(‖|A|‖₁·‖|A|‖_∞)`` (Hölder), the largest column sum times the largest
    row sum. Close to the norm for dense weights of similar magnitudes (about 1.1 times it for a random 512×512
    one), but up to ``(rows·columns)^¼`` times it for a skewed one (``sqrt(n)`` for an ``n × n`` arrow: one dense
    row and column). It costs two sums where an SVD would double the time :meth:`LipschitzBound.analyse` takes
    on a wide layer."""
    m = a.abs()
    return math.sqrt(float(m.sum(0).max()) * float(m.sum(1).max()))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ConvBound(LayerBound):
    """``Conv2d`` on its real input size, stride, dilation, groups and zero padding.

    The operator is written as ``conv(pad(v))`` with explicit (possibly asymmetric, for ``'same'``) padding
    and no implicit padding, so its transpose is ``crop(conv_transpose(u))`` with the ``output_padding``
    that restores the padded input size exactly — a strided conv's transpose is wrong without it.
    """

    def __init__(self, name: str, module: nn.Conv2d, in_shape: Shape) -> None:
        super().__init__(name, module)
        self.conv = module  # typed; a subclass's ``module`` may be the layer the conv stands for
        if module.padding_mode != "zeros":
            raise CertkitError(
                f"layer {name!r}: Conv2d with padding_mode={module.padding_mode!r} is not supported (only zero padding)"
            )
        if len(in_shape) != 3:
            raise CertkitError(f"layer {name!r}: Conv2d input must be (C, H, W), got {in_shape}")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.iterate_shape = (1, *self.in_shape)
        kh, kw = module.kernel_size
        dh, dw = module.dilation
        self.stride = _pair(module.stride)
        eff = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        pads: tuple[tuple[int, int], ...]
        if isinstance(module.padding, str):
            if module.padding == "valid":
                pads = ((0, 0), (0, 0))
            else:  # 'same': torch puts the odd extra pixel after (bottom/right)
                pads = tuple((t // 2, t - t // 2) for t in (eff[0] - 1, eff[1] - 1))
        else:
            ph, pw = _pair(module.padding)
            pads = ((ph, ph), (pw, pw))
        (self.top, self.bottom), (self.left, self.right) = pads
        _, h, w = self.in_shape
        self.padded = (h + self.top + self.bottom, w + self.left + self.right)
        out = [(p - e) // s + 1 for p, e, s in zip(self.padded, eff, self.stride)]
        if min(out) < 1:
            raise CertkitError(f"layer {name!r}: Conv2d kernel larger than its padded input {self.padded}")
        self.output_padding = tuple(p - ((o - 1) * s + e) for p, o, s, e in zip(self.padded, out, self.stride, eff))
        self.out_shape = (module.out_channels, out[0], out[1])

    def weight(self) -> Tensor:
        return self.conv.weight

    def apply(self, v: Tensor, weight: Tensor) -> Tensor:
        m = self.conv
        v = F.pad(v, (self.left, self.right, self.top, self.bottom))
        return F.conv2d(v, weight, None, self.stride, 0, m.dilation, m.groups)

    def adjoint(self, u: Tensor, weight: Tensor) -> Tensor:
        m = self.conv
        z = F.conv_transpose2d(u, weight, None, self.stride, 0, self.output_padding, m.groups, m.dilation)
        _, h, w = self.in_shape
        return z[..., self.top : self.top + h, self.left : self.left + w]

    def dense_kernel(self) -> Tensor:
        """The float64 kernel with groups and dilation expanded into a plain ``(C_out, C_in, kh', kw')`` one."""
        m = self.conv
        w = self.weight().detach().double()
        g = m.groups
        if g > 1:
            full = w.new_zeros(m.out_channels, m.in_channels, *w.shape[2:])
            co, ci = m.out_channels // g, m.in_channels // g
            for i in range(g):
                full[i * co : (i + 1) * co, i * ci : (i + 1) * ci] = w[i * co : (i + 1) * co]
            w = full
        dh, dw = m.dilation
        if (dh, dw) != (1, 1):
            kh, kw = w.shape[2:]
            dil = w.new_zeros(*w.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
            dil[..., ::dh, ::dw] = w
            w = dil
        return w

    def guaranteed(self) -> float:
        bound = conv_fft_bound(self.dense_kernel(), self.stride, self.padded)
        n_in = math.prod(self.in_shape)
        n_out = math.prod(self.out_shape)
        if n_in * n_out <= EXACT_MAX_ENTRIES and n_in * n_out * min(n_in, n_out) <= EXACT_MAX_FLOPS:
            bound = min(bound, self.exact_norm())
        return bound

    def exact_norm(self) -> float:
        """σ_max of the unrolled operator in float64 (eigenvalue of the smaller Gram matrix)."""
        return unrolled_norm(self, self.in_shape)

    def rounding(self) -> tuple[float, float]:
        """As a dense layer's: each output within ``γ_{n+1}·(|K| * |x̂| + |b|)``, ``n = C_in/groups·kh·kw``.

        ``‖|K| * ·‖`` is bounded like the conv itself by the circular polyphase conv of :func:`conv_fft_bound`;
        for a nonnegative kernel every frequency's matrix is dominated entrywise, in modulus, by the zero
        frequency's, so that bound is the norm of the kernel summed over its taps (itself bounded by
        :func:`_abs_norm`).
        """
        m = self.conv
        kh, kw = m.kernel_size
        c = rounding_coefficient(m.in_channels // m.groups * kh * kw + 1)
        gain = _abs_norm(_polyphase(self.dense_kernel().abs(), self.stride).sum((-2, -1)))
        bias = m.bias
        offset = 0.0
        if bias is not None:
            per_pixel = math.sqrt(self.out_shape[1] * self.out_shape[2])
            offset = per_pixel * float(torch.linalg.vector_norm(bias.detach().double()))
        return c * gain, c * offset


class FixedConvBound(ConvBound):
    """An overlapping average pool, bounded as the fixed depthwise conv it is (one channel suffices)."""

    def __init__(self, name: str, module: nn.Module, conv: nn.Conv2d, in_shape: Shape) -> None:
        super().__init__(name, conv, (1, *in_shape[1:]))
        self.module = module
        self.iterate_shape = None
        self._value: float | None = None

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def weight(self) -> Tensor:
        return self.conv.weight

    def apply(self, v: Tensor, weight: Tensor) -> Tensor:
        v = F.pad(v, (self.left, self.right, self.top, self.bottom))
        return F.conv2d(v, weight, None, self.stride)

    def dense_kernel(self) -> Tensor:
        return self.conv.weight.detach().double()

    def constant(self) -> float:
        if self._value is None:
            self._value = super().guaranteed()
        return self._value

    def guaranteed(self) -> float:
        return self.constant()


def unrolled_norm(layer: LayerBound, in_shape: Shape) -> float:
    """Exact ``σ_max`` of a layer's linear part, by unrolling it on the identity basis in float64.

    The basis goes through the layer :data:`UNROLL_CHUNK` vectors at a time, so memory is that of the
    unrolled matrix, not of an ``n_in × n_in`` identity.
    """
    n = math.prod(in_shape)
    w = layer.weight().detach().double()
    rows = []
    for start in range(0, n, UNROLL_CHUNK):
        stop = min(n, start + UNROLL_CHUNK)
        basis = torch.zeros(stop - start, n, dtype=torch.float64, device=w.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        rows.append(layer.apply(basis.view(-1, *in_shape), w).reshape(stop - start, -1))
    m = torch.cat(rows)  # rows: images of the basis vectors, i.e. Aᵀ
    gram = m @ m.t() if m.shape[0] <= m.shape[1] else m.t() @ m
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


def conv_fft_bound(kernel: Tensor, stride: tuple[int, int], padded: tuple[int, int]) -> float:
    """A guaranteed upper bound on a zero-padded, strided conv's norm: a circular conv that contains it.

    ``kernel`` is a float64 ``(C_out, C_in, kh, kw)`` kernel applied with ``stride`` to an input already
    zero-padded to size ``padded``. The strided conv is rewritten as a stride-1 conv on the polyphase
    decomposition of the input (``C_in·s_h·s_w`` channels on a ``⌈H/s_h⌉×⌈W/s_w⌉`` grid, kernel
    ``⌈k/s⌉``); that rewrite and the zero padding are isometric embeddings, and the valid outputs are a
    subset of those of the circular convolution on the same grid (no window wraps around), so
    ``‖conv‖ ≤ ‖circular conv‖ = max_ω σ_max(K̂(ω))``, computed exactly per frequency by an FFT.
    The polyphase form keeps the bound close to the true norm of a strided conv (``tests/test_gloro.py``
    checks it against the exact norm); bounding the unstrided conv instead would ignore the stride.
    """
    sh, sw = stride
    k = _polyphase(kernel, stride)
    bh, bw = k.shape[-2:]
    grid = (max(-(-padded[0] // sh), bh), max(-(-padded[1] // sw), bw))
    # Frequencies left out by the real FFT are conjugates of kept ones: same singular values.
    spectrum = torch.fft.rfft2(k, s=grid).permute(2, 3, 0, 1)
    best = 0.0
    for row in spectrum:  # one frequency row at a time keeps the SVD workspace small
        best = max(best, float(torch.linalg.matrix_norm(row, ord=2).max()))
    return best


def _polyphase(kernel: Tensor, stride: tuple[int, int]) -> Tensor:
    """A strided conv's kernel ``(C_out, C_in, kh, kw)`` as the stride-1 kernel ``(C_out, C_in·s_h·s_w, ⌈kh/s_h⌉,
    ⌈kw/s_w⌉)`` that acts on the polyphase decomposition of its input."""
    co, ci, kh, kw = kernel.shape
    sh, sw = stride
    bh, bw = -(-kh // sh), -(-kw // sw)
    k = F.pad(kernel, (0, bw * sw - kw, 0, bh * sh - kh))
    # k[o, c, sh*b + r, sw*b' + r'] -> k'[o, (c, r, r'), b, b']
    return k.view(co, ci, bh, sh, bw, sw).permute(0, 1, 3, 5, 2, 4).reshape(co, ci * sh * sw, bh, bw)


def _pool_window(
    name: str, module: nn.MaxPool2d | nn.AvgPool2d
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    k = _pair(module.kernel_size)
    s = _pair(module.stride if module.stride is not None else module.kernel_size)
    p = _pair(module.padding)
    if getattr(module, "dilation", 1) not in (1, (1, 1)):
        raise CertkitError(f"layer {name!r}: {type(module).__name__} with dilation is not supported")
    return k, s, p


def _maxpool_bound(name: str, module: nn.MaxPool2d) -> LayerBound:
    (kh, kw), (sh, sw), _ = _pool_window(name, module)
    # Each output is 1-Lipschitz in its window; a pixel lies in at most ⌈k/s⌉² windows, and a one-hot
    # input reaches it, so the bound is tight. Overlapping max pooling is *not* 1-Lipschitz.
    windows = math.ceil(kh / sh) * math.ceil(kw / sw)
    return ConstantBound(name, module, math.sqrt(windows), f"sqrt of max windows per pixel ({windows})")


def _avgpool_bound(name: str, module: nn.AvgPool2d, in_shape: Shape) -> LayerBound:
    (kh, kw), (sh, sw), (ph, pw) = _pool_window(name, module)
    if module.divisor_override:
        coef = 1.0 / module.divisor_override
    elif ph or pw:
        if not module.count_include_pad:
            raise CertkitError(f"layer {name!r}: AvgPool2d with padding and count_include_pad=False is not supported")
        coef = 1.0 / (kh * kw)
    else:
        coef = 1.0 / (kh * kw)
    if module.ceil_mode:
        h, w = in_shape[1:]
        if any((n + 2 * p - k) % s for n, p, k, s in ((h, ph, kh, sh), (w, pw, kw, sw))):
            raise CertkitError(f"layer {name!r}: AvgPool2d with ceil_mode=True and partial windows is not supported")
    if sh >= kh and sw >= kw:
        # Disjoint windows: each output is coef·Σ window, of norm coef·sqrt(kh·kw) (Cauchy–Schwarz).
        return ConstantBound(name, module, coef * math.sqrt(kh * kw), "disjoint windows", ops=kh * kw + 1)
    conv = nn.Conv2d(1, 1, (kh, kw), (sh, sw), (ph, pw), bias=False)
    with torch.no_grad():
        conv.weight.fill_(coef)
    return FixedConvBound(name, module, conv, in_shape)


def _adaptive_avgpool_bound(name: str, module: nn.AdaptiveAvgPool2d, in_shape: Shape) -> LayerBound:
    _, h, w = in_shape
    oh, ow = _pair(tuple(o if o is not None else n for o, n in zip(_pair_or_none(module.output_size), (h, w))))
    if h % oh or w % ow:
        raise CertkitError(
            f"layer {name!r}: AdaptiveAvgPool2d from {h}x{w} to {oh}x{ow} has uneven windows; not supported"
        )
    kh, kw = h // oh, w // ow
    return ConstantBound(name, module, 1.0 / math.sqrt(kh * kw), "disjoint windows", ops=kh * kw + 1)


def _pair_or_none(v: int | Sequence[int | None] | None) -> tuple[int | None, int | None]:
    return (v, v) if v is None or isinstance(v, int) else (v[0], v[1])


# Zero padding is an isometric embedding; constant padding an isometry plus a shift. None of these rounds.
_ONE_LIPSCHITZ = (nn.ReLU, MinMax, nn.Identity, nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.ConstantPad2d)
#: rounded operations charged to tanh: libm and CUDA evaluate it within 2 ulp (4u relative); 3 leave room for
#: the error bound's own arithmetic
TANH_OPS = 3
#: builds the :class:`LayerBound` of a leaf from its name, the module and its input shape (None: not reached)
LayerRule = Callable[[str, Any, Shape | None], LayerBound]

#: the rule of every leaf layer kind, by exact class (certkit's fast paths count as the torch class whose function
#: they compute, :func:`torch_type`); a module of a proper subclass of one is refused, since the subclass may
#: compute another function
LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: lambda name, m, shape: LinearBound(name, m, _need(name, shape)),
    nn.Conv2d: lambda name, m, shape: ConvBound(name, m, _need(name, shape)),
    Normalize: lambda name, m, shape: NormalizeBound(name, m, _need(name, shape)),
    nn.LeakyReLU: lambda name, m, _: ConstantBound(name, m, max(1.0, abs(m.negative_slope)), "max slope", ops=1),
    nn.Tanh: lambda name, m, _: ConstantBound(name, m, 1.0, "1-Lipschitz", ops=TANH_OPS),
    **dict.fromkeys(_ONE_LIPSCHITZ, lambda name, m, _: ConstantBound(name, m, 1.0, "1-Lipschitz")),
    nn.MaxPool2d: lambda name, m, _: _maxpool_bound(name, m),
    nn.AvgPool2d: lambda name, m, shape: _avgpool_bound(name, m, _need(name, shape)),
    nn.AdaptiveAvgPool2d: lambda name, m, shape: _adaptive_avgpool_bound(name, m, _need(name, shape)),
}


def leaf_rule(name: str, module: nn.Module) -> LayerRule | None:
    """The rule of ``module``'s layer kind (None: it has none), refusing a module of a proper subclass of a kind
    with a rule: it may redefine ``forward`` or a helper that ``forward`` calls, so the rule of its base class
    says nothing about it."""
    rule = LAYER_RULES.get(torch_type(module))
    if rule is None:
        base = next((k for k in LAYER_RULES if isinstance(module, k)), None)
        if base is not None:
            raise CertkitError(
                f"layer {name or '<root>'!r} is a {type(module).__name__}, a subclass of {base.__name__}; GloRo "
                f"bounds only {base.__name__} itself (a subclass may compute another function): use {base.__name__}"
            )
    return rule


def layer_bound(name: str, module: nn.Module, in_shape: Shape | None) -> LayerBound:
    """The :class:`LayerBound` of one leaf module; unknown kinds and subclasses of known ones raise
    :class:`CertkitError`."""
    rule = leaf_rule(name, module)
    if rule is None:
        raise CertkitError(
            f"layer {name or '<root>'!r} of kind {type(module).__name__} has no known Lipschitz bound; GloRo nets "
            f"may only use {', '.join(k.__name__ for k in LAYER_RULES)}, Residual and Sequential"
        )
    return rule(name, module, in_shape)


def _need(name: str, shape: Shape | None) -> Shape:
    if shape is None:
        raise CertkitError(f"layer {name!r} was not reached by the forward pass; its input shape is unknown")
    return shape


# --------------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------------
class Analysis(NamedTuple):
    """What certification reads off the weights, once per set of weights (:meth:`LipschitzBound.analyse`)."""

    #: layer name -> guaranteed float64 bound (:meth:`LayerBound.guaranteed`)
    bounds: dict[str, float]
    #: layer name -> ``(gain, offset)`` of its float64 rounding (:meth:`LayerBound.rounding`)
    rounding: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class Drift:
    """How far activations evaluated in float64 may be from exact ones, at an input ``x`` and anywhere near it.

    For every ``x'`` with ``‖x' − x‖ ≤ r``, ``both + growth·r`` bounds ``‖â(x) − a(x)‖ + ‖â(x') − a(x')‖``, the L2
    distances (per sample, shape ``(B,)``) between the computed and the exact activation at the two points;
    ``lipschitz`` bounds how far the exact activation moves per unit of ``r``. Covering ``x'`` too is what lets a
    certificate hold for the float64 classifier in the whole ball, where nothing is evaluated.
    """

    both: Tensor
    growth: float
    lipschitz: float


class Term:
    """A node of the bound's expression tree: a layer, a product (Sequential) or ``1 + L`` (Residual)."""

    def layers(self) -> Iterator[LayerBound]:
        raise NotImplementedError

    def estimate(self, iterates: MutableMapping[str, Tensor], iterations: int) -> Tensor | float:
        raise NotImplementedError

    def guaranteed(self) -> float:
        raise NotImplementedError

    def watched(self) -> Iterator[tuple[str, nn.Module, bool]]:
        """``(name, module, output)``: the activations whose norms :meth:`drift` reads (input or output)."""
        raise NotImplementedError

    def drift(self, d: Drift, norms: Mapping[str, Tensor], facts: Analysis) -> Drift:
        """The drift after this node, from the drift ``d`` of its input and the recorded activation norms."""
        raise NotImplementedError


class Leaf(Term):
    def __init__(self, layer: LayerBound) -> None:
        self.layer = layer

    def layers(self) -> Iterator[LayerBound]:
        yield self.layer

    def estimate(self, iterates: MutableMapping[str, Tensor], iterations: int) -> Tensor | float:
        key = self.layer.name
        value, v = self.layer.estimate(iterates.get(key), iterations)
        if v is not None:
            iterates[key].copy_(v)  # in place: the caller's buffers keep their identity and device
        return value

    def guaranteed(self) -> float:
        return self.layer.guaranteed()

    def watched(self) -> Iterator[tuple[str, nn.Module, bool]]:
        yield self.layer.name, self.layer.module, False

    def drift(self, d: Drift, norms: Mapping[str, Tensor], facts: Analysis) -> Drift:
        # ‖f̂(x̂) − f(a)‖ ≤ ‖f̂(x̂) − f(x̂)‖ + L·‖x̂ − a‖; the first term is the layer's rounding on its computed input,
        # gain·‖x̂‖ + offset at x and, with ‖x̂(x')‖ ≤ ‖x̂(x)‖ + (both + growth·r) + lipschitz·r, at x'
        name = self.layer.name
        lip, (gain, offset) = facts.bounds[name], facts.rounding[name]
        both = lip * d.both + gain * (2 * norms[name] + d.both) + 2 * offset
        return Drift(both, lip * d.growth + gain * (d.lipschitz + d.growth), lip * d.lipschitz)


class Product(Term):
    def __init__(self, terms: list[Term]) -> None:
        self.terms = terms

    def layers(self) -> Iterator[LayerBound]:
        for t in self.terms:
            yield from t.layers()

    def estimate(self, iterates: MutableMapping[str, Tensor], iterations: int) -> Tensor | float:
        out: Tensor | float = 1.0
        for t in self.terms:
            out = out * t.estimate(iterates, iterations)
        return out

    def guaranteed(self) -> float:
        return math.prod(t.guaranteed() for t in self.terms)

    def watched(self) -> Iterator[tuple[str, nn.Module, bool]]:
        for t in self.terms:
            yield from t.watched()

    def drift(self, d: Drift, norms: Mapping[str, Tensor], facts: Analysis) -> Drift:
        for t in self.terms:
            d = t.drift(d, norms, facts)
        return d


class ResidualTerm(Term):
    def __init__(self, inner: Term, name: str, module: Residual) -> None:
        self.inner = inner
        self.name = name
        self.module = module

    def layers(self) -> Iterator[LayerBound]:
        yield from self.inner.layers()

    def estimate(self, iterates: MutableMapping[str, Tensor], iterations: int) -> Tensor | float:
        return 1 + self.inner.estimate(iterates, iterations)

    def guaranteed(self) -> float:
        return 1.0 + self.inner.guaranteed()

    def watched(self) -> Iterator[tuple[str, nn.Module, bool]]:
        yield from self.inner.watched()
        yield self.name, self.module, True

    def drift(self, d: Drift, norms: Mapping[str, Tensor], facts: Analysis) -> Drift:
        # both summands carry their drift; the addition rounds by u·|sum|, read off the recorded output
        inner = self.inner.drift(d, norms, facts)
        both, growth, lip = d.both + inner.both, d.growth + inner.growth, d.lipschitz + inner.lipschitz
        c = rounding_coefficient(1)
        return Drift(both + c * (2 * norms[self.name] + both), growth + c * (lip + growth), lip)


class LipschitzBound:
    """The Lipschitz bound of a module tree: training estimate, guaranteed bound, per-layer report.

    Built by :func:`build_bound`. The power-iteration iterates are *not* owned here but passed in as a
    mapping ``layer name -> tensor`` that is updated in place, so a model can keep them as buffers (saved
    with its state dict, warm-starting resumed training).
    """

    def __init__(self, root: Term, modules: Mapping[str, nn.Module]) -> None:
        self.root = root
        self.modules = dict(modules)  # the analysed tree, by path: see check_layers
        self.classes = {name: type(m) for name, m in self.modules.items()}
        self.settings = {name: copy.deepcopy(layer_settings(m)) for name, m in self.modules.items() if not m._modules}

    def layers(self) -> list[LayerBound]:
        return list(self.root.layers())

    def iterate_shapes(self) -> dict[str, Shape]:
        return {b.name: b.iterate_shape for b in self.layers() if b.iterate_shape is not None}

    def init_iterates(
        self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> dict[str, Tensor]:
        """Fresh random unit iterates, one per weighted layer."""
        return {k: _unit(torch.randn(s, generator=generator, dtype=dtype)) for k, s in self.iterate_shapes().items()}

    def estimate(self, iterates: MutableMapping[str, Tensor], iterations: int = 1) -> Tensor:
        """The differentiable power-iteration estimate (a lower bound in the limit), updating ``iterates``."""
        return torch.as_tensor(self.root.estimate(iterates, iterations))

    def guaranteed_layers(self) -> dict[str, float]:
        """``layer name -> guaranteed float64 bound``, each computed once (the exact ones take seconds)."""
        return {b.name: b.guaranteed() for b in self.layers()}

    def analyse(self) -> Analysis:
        """Every layer's guaranteed bound and rounding coefficients for the current weights."""
        return Analysis(self.guaranteed_layers(), {b.name: b.rounding() for b in self.layers()})

    def guaranteed(self, values: Mapping[str, float] | None = None) -> float:
        """A sound float64 upper bound (before any floating-point safety factor).

        ``values`` are per-layer bounds from :meth:`guaranteed_layers`, to compose without recomputing.
        """
        if values is None:
            return float(self.root.guaranteed())
        return float(_compose(self.root, lambda b: values[b.name]))

    def converge(self, iterates: MutableMapping[str, Tensor], tol: float = 1e-6, max_iterations: int = 500) -> float:
        """Run every iterate towards convergence in float64; returns the converged estimates composed like the bound.

        A *lower* bound on the true constant of a pure product (each factor is a Rayleigh quotient), kept as
        a tightness diagnostic beside the guaranteed bound; the iterates stay warm for further training.
        Constant layers enter with their exact value.
        """
        values: dict[str, float] = {}
        for b in self.layers():
            if b.iterate_shape is not None:
                value, v = b.converged_estimate(iterates[b.name], tol, max_iterations)
                iterates[b.name].copy_(v)
                values[b.name] = value
        return _compose(self.root, lambda b: values[b.name] if b.name in values else b.constant())

    def report(self, values: Mapping[str, float] | None = None) -> list[dict[str, object]]:
        """One row per layer: name, kind and guaranteed bound (for model.json and ``--verbose`` output)."""
        values = self.guaranteed_layers() if values is None else values
        return [{"layer": b.name, "kind": b.kind, "bound": values[b.name]} for b in self.layers()]

    def watched(self) -> dict[str, tuple[nn.Module, bool]]:
        """``name -> (module, output)``: whose input (or, for a residual sum, output) norms :meth:`drift` needs."""
        return {name: (m, output) for name, m, output in self.root.watched()}

    def drift(self, exact_input: Tensor, norms: Mapping[str, Tensor], facts: Analysis) -> Drift:
        """The :class:`Drift` of the tree's output for a batch whose input is exact (``exact_input``: zeros of
        shape ``(B,)``), from the norms :func:`recorded_norms` took of its float64 forward pass."""
        return self.root.drift(Drift(exact_input, 0.0, 1.0), norms, facts)

    def check_layers(self, module: nn.Module) -> None:
        """Refuse to certify ``module`` (the one analysed) when its layers are no longer what was analysed: a layer
        replaced, added or removed since, one hooked (:func:`check_plain`), or one whose class was swapped or whose
        settings (:func:`layer_settings`), which its rule read once, changed. The root itself is not checked: its
        owner evaluates it as a plain Sequential of these layers."""
        current = dict(module.named_modules())
        if current.keys() != self.modules.keys() or any(current[k] is not m for k, m in self.modules.items()):
            raise CertkitError(
                "the model's layers changed after its Lipschitz bound was built (a layer replaced, added or "
                "removed); build the GloRo net again around the new model"
            )
        layers = [(name, m) for name, m in current.items() if m is not module]
        check_plain(layers)
        for name, m in layers:
            if type(m) is not self.classes[name]:
                raise CertkitError(
                    f"layer {name!r} is a {type(m).__name__} now but was a {self.classes[name].__name__} when the "
                    "Lipschitz bound was built (its class was swapped); build the GloRo net again around the model"
                )
        for name, before in self.settings.items():
            now = layer_settings(current[name])
            changed = [
                k for k in sorted(now.keys() | before.keys()) if k not in now or k not in before or now[k] != before[k]
            ]
            if changed:
                k = changed[0]
                raise CertkitError(
                    f"layer {name!r} ({type(current[name]).__name__}) has {_setting(now, k)} now but had "
                    f"{_setting(before, k)} when the Lipschitz bound was built, which read it then; build the GloRo "
                    "net again around the model"
                )


def _compose(term: Term, value: Callable[[LayerBound], float]) -> float:
    if isinstance(term, Leaf):
        return value(term.layer)
    if isinstance(term, Product):
        return math.prod(_compose(t, value) for t in term.terms)
    if isinstance(term, ResidualTerm):
        return 1.0 + _compose(term.inner, value)
    raise TypeError(type(term))


def layer_settings(m: nn.Module) -> dict[str, object]:
    """A layer's settings: its public attributes other than parameters, buffers, submodules and the training
    flag (kernel size, stride, padding, slope, divisor, output size, ...). A rule reads them once, when the bound
    is built, where it reads parameters and buffers again whenever their version counters move."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


def _setting(settings: Mapping[str, object], key: str) -> str:
    return f"{key}={settings[key]!r}" if key in settings else f"no {key}"


def check_plain(modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Refuse ``(name, module)`` pairs whose call may compute something else than their class's forward
    (:func:`~certkit.models.layers.call_override`: a forward hook or pre-hook on the module or a global one, or a
    call method set on the instance), which the GloRo bound, read off the class, does not see."""
    reason = call_override(modules)
    if reason is not None:
        raise CertkitError(f"{reason}, which can change a layer's output that the GloRo bound does not see: remove it")


def _check_container(name: str, m: nn.Module, base: type[nn.Module], extra: tuple[str, ...] = ()) -> None:
    """Refuse a subclass of ``base`` that redefines how it is called (``extra``: further methods its forward
    calls), since it may wire its children another way than the product or ``1 + L`` the bound assumes."""
    redefined = [a for a in (*CALL_PATH, *extra) if getattr(type(m), a) is not getattr(base, a)]
    if redefined:
        raise CertkitError(
            f"layer {name or '<root>'!r}: {type(m).__name__} redefines {redefined[0]} of {base.__name__}, so it may "
            f"wire its children another way than the GloRo bound assumes: use {base.__name__} itself "
            "(Residual for a skip connection)"
        )


@contextmanager
def recorded_norms(watch: Mapping[str, tuple[nn.Module, bool]]) -> Iterator[dict[str, Tensor]]:
    """Per-sample L2 norms (float64, shape ``(B,)``) of each watched module's input (``output`` False) or
    output, from the forward pass run inside the block; the hooks are removed when it ends."""
    norms: dict[str, Tensor] = {}

    def hook_for(name: str, output: bool) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
            t = out if output else args[0]
            norms[name] = torch.linalg.vector_norm(t.flatten(1).double(), dim=1)

        return hook

    handles = [m.register_forward_hook(hook_for(name, output)) for name, (m, output) in watch.items()]
    try:
        yield norms
    finally:
        for h in handles:
            h.remove()


class Shapes(NamedTuple):
    """``id(submodule) -> shape without batch`` of each module's input and output (:func:`record_shapes`)."""

    inputs: dict[int, Shape]
    outputs: dict[int, Shape]


def record_shapes(module: nn.Module, in_shape: Sequence[int]) -> Shapes:
    """Every submodule's input and output shapes from one forward pass of zeros of ``in_shape``.

    A module called twice (weight sharing) would have two inputs; it is refused because its bound would
    enter the product twice, which the tree analysis does not model.
    """
    shapes = Shapes({}, {})
    twice: list[str] = []
    names = {id(m): n for n, m in module.named_modules()}

    def hook(m: nn.Module, args: tuple, out: object) -> None:
        if id(m) in shapes.inputs:
            twice.append(names.get(id(m), "?"))
        for found, value in ((shapes.inputs, args[0] if args else None), (shapes.outputs, out)):
            if isinstance(value, Tensor):
                found[id(m)] = tuple(value.shape[1:])

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    ref: Tensor | None = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()), torch.zeros(()))
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(
                torch.zeros(
                    1, *in_shape, dtype=ref.dtype if ref.is_floating_point() else torch.float32, device=ref.device
                )
            )
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    if twice:
        raise CertkitError(f"layer(s) {sorted(set(twice))} are called more than once in forward; not supported")
    return shapes


def _check_residual_shapes(name: str, m: Residual, shapes: Shapes) -> None:
    """Refuse a :class:`Residual` whose inner output has another shape than its input: ``x + g(x)`` then
    broadcasts one of them, repeating it, and ``1 + L(g)`` no longer bounds the sum (with ``g`` channel 0 of
    ``c``, a unit step in channel 0 moves the sum by ``sqrt(c + 3)``, where the rule says 2)."""
    x, g = _need(name, shapes.inputs.get(id(m))), shapes.outputs.get(id(m.inner))
    if g != x:
        raise CertkitError(
            f"layer {name or '<root>'!r}: the Residual's inner output has shape {g} but its input {x}; x + g(x) "
            "would broadcast, and GloRo bounds it by 1 + L(g) only for equal shapes"
        )


def build_bound(module: nn.Module, in_shape: Sequence[int], exclude: Sequence[nn.Module] = ()) -> LipschitzBound:
    """Analyse ``module`` (a tree of Sequential/Residual and known layers) for input shape ``in_shape``.

    ``exclude`` lists modules left out of the bound — the GloRo head, which enters through ``‖w_i − w_j‖``.
    Hooks and instance-level forwards are refused on every module, the excluded ones included
    (:func:`check_plain`); in the analysed tree, so are containers that redefine how they are called and
    subclasses of known layers (:func:`leaf_rule`), which may compute another function.
    """
    check_plain(module.named_modules())  # before record_shapes adds (and removes) its own hooks
    shapes = record_shapes(module, in_shape)
    skip = {id(m) for m in exclude}

    def build(name: str, m: nn.Module) -> Term | None:
        if id(m) in skip:
            return None
        if isinstance(m, nn.Sequential):
            _check_container(name, m, nn.Sequential, ("__iter__",))
            kids = [build(f"{name}.{k}" if name else k, c) for k, c in m.named_children()]
            return Product([t for t in kids if t is not None])
        if isinstance(m, Residual):
            _check_container(name, m, Residual)
            _check_residual_shapes(name, m, shapes)
            inner = build(f"{name}.inner" if name else "inner", m.inner)
            return ResidualTerm(inner if inner is not None else Product([]), name, m)
        return Leaf(layer_bound(name, m, shapes.inputs.get(id(m))))

    root = build("", module)
    return LipschitzBound(root if root is not None else Product([]), dict(module.named_modules()))


def lipschitz_upper_bound(module: nn.Module, in_shape: Sequence[int]) -> float:
    """Guaranteed float64 upper bound on ``module``'s L2 Lipschitz constant (no safety factor)."""
    return build_bound(module, in_shape).guaranteed()
