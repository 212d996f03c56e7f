"""The float64 rounding that GloRo certificates allow for (:meth:`GloroNet.exact_forward`), against the rounding
itself.

Oracles: an evaluation of the same net in numpy's 80-bit ``longdouble`` (2048 times finer than float64), and
nets whose hidden activations carry large offsets that the head cancels, so that float64 logits are wrong by
far more than any allowance scaled by the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import Tensor, nn

from certkit.gloro.layers import MinMax, Residual
from certkit.gloro.lipschitz import layer_bound
from certkit.gloro.model import FLOAT64_ALLOWANCE, GloroNet
from certkit.models import Normalize

LD = np.longdouble


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def offset_net(offset: float) -> GloroNet:
    """``x ↦ (x + offset) − offset`` on two inputs: the identity in exact arithmetic, Lipschitz 1."""
    hidden, head = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        hidden.weight.copy_(torch.eye(2))
        hidden.bias.fill_(offset)  # 1e12 is a float32 value, so the head's bias cancels it exactly
        head.weight.copy_(torch.eye(2))
        head.bias.fill_(-offset)
    return GloroNet(nn.Sequential(hidden, head), (2,), epsilon=0.0).eval()


def test_a_hidden_offset_cancelled_by_the_head_gets_no_false_certificate() -> None:
    """At 1e12 a float64 activation is a multiple of 2^-13 ≈ 1.2e-4, so the float64 net sees a margin of 1.2e-4
    at x and the opposite one at x', 2.2e-6 away. The allowance of old, 1e-9 of the logits, certified x to 8.6e-5."""
    net = offset_net(1e12)
    x = torch.tensor([[6.2e-5, 6.0e-5]], dtype=torch.float64)
    x_flipped = torch.tensor([[6.1e-5, 6.2e-5]], dtype=torch.float64)
    distance = float((x_flipped - x).norm())
    assert net.certify(x, epsilon=0.0)[2].item() == 0 and net.certify(x_flipped, epsilon=0.0)[2].item() == 1
    pred, radius, _ = net.certify(x, epsilon=distance)
    assert radius.item() < distance and pred.item() == -1
    # without the offset the same point certifies to its margin's radius, less the 1e-9 floor on the margin
    plain = offset_net(0.0)
    margin_radius = 2e-6 / (2**0.5 * plain.certification_constant())
    assert margin_radius * (1 - 1e-3) < plain.certified_radius(x).item() <= margin_radius


def reference(m: nn.Module, x: np.ndarray) -> np.ndarray:
    """The exact function of ``m`` (up to 80-bit rounding) for the layer kinds of :func:`rounding_net` and
    :func:`stress_net`."""
    if isinstance(m, nn.Sequential):
        for child in m:
            x = reference(child, x)
        return x
    if isinstance(m, Residual):
        return x + reference(m.inner, x)
    if isinstance(m, Normalize):
        return (x - as_ld(m.mean)) / as_ld(m.std)
    if isinstance(m, nn.Linear):
        return x @ as_ld(m.weight).T + as_ld(m.bias)
    if isinstance(m, nn.Conv2d):
        weight = m.weight.double()
        y = unrolled(lambda b: F.conv2d(b, weight, None, m.stride, m.padding, m.dilation, m.groups), x)
        return y + as_ld(m.bias)[None, :, None, None]
    if isinstance(m, nn.AvgPool2d):  # every channel alike: the window's sum, then the division, in 80 bits
        k, (b, c, h, w) = m.kernel_size, x.shape
        assert isinstance(k, int)
        ones = torch.ones(1, 1, k, k, dtype=torch.float64)
        sums = unrolled(lambda t: F.conv2d(t, ones, None, m.stride, m.padding), x.reshape(b * c, 1, h, w))
        return sums.reshape(b, c, *sums.shape[2:]) / LD(k * k)
    if isinstance(m, nn.AdaptiveAvgPool2d):  # even windows
        o, (b, c, h, w) = m.output_size, x.shape
        assert isinstance(o, int)
        return x.reshape(b, c, o, h // o, o, w // o).sum((3, 5)) / LD(h // o * (w // o))
    if isinstance(m, nn.MaxPool2d):
        k, s, p = m.kernel_size, m.stride, m.padding
        assert isinstance(k, int) and isinstance(s, int) and isinstance(p, int)
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
        return sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::s, ::s].max((-1, -2))
    if isinstance(m, MinMax):
        a, b = np.split(x, 2, axis=1)
        return np.concatenate([np.minimum(a, b), np.maximum(a, b)], 1)
    if isinstance(m, nn.Flatten):
        return x.reshape(len(x), -1)
    if isinstance(m, nn.LeakyReLU):
        return np.where(x > 0, x, LD(m.negative_slope) * x)
    if isinstance(m, nn.ReLU):
        return np.maximum(x, 0)
    if isinstance(m, nn.Tanh):
        return np.tanh(x)
    raise TypeError(type(m))


def unrolled(f: Callable[[Tensor], Tensor], x: np.ndarray) -> np.ndarray:
    """A linear map ``f`` applied to ``x`` in 80 bits, through its matrix: ``f`` of the basis in float64, exact
    when every entry is one weight or a count of ones (a convolution, a window's sum)."""
    n = int(np.prod(x.shape[1:]))
    with torch.no_grad():
        images = f(torch.eye(n, dtype=torch.float64).view(n, *x.shape[1:]))
    y = x.reshape(len(x), n) @ images.reshape(n, -1).numpy().astype(LD)
    return y.reshape(len(x), *images.shape[1:])


def as_ld(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy().astype(LD)


def cancelled_by_the_head(net: GloroNet) -> GloroNet:
    """``net`` with its head's bias set to take the logits of a random input back to about 0, so hidden
    activations far larger than the logits set their float64 error."""
    with torch.no_grad():
        net.head.bias.copy_(-(net.exact_logits(torch.rand(1, *net.in_shape)) - net.head.bias.double())[0].float())
    return net


def rounding_net() -> GloroNet:
    """Normalize, a conv with biases near 1e6, MinMax, pooling, a dense layer with biases near 1e9, a residual
    block and a head whose bias takes the 1e9 back off: logits near 1e2, hidden activations near 1e9."""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        MinMax(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 16),
        Residual(nn.Linear(16, 16)),
        nn.LeakyReLU(0.5),
        nn.Linear(16, 3),
    )
    with torch.no_grad():
        body[0].bias.uniform_(1e6, 2e6)
        body[4].bias.uniform_(1e9, 2e9)
    return cancelled_by_the_head(GloroNet(nn.Sequential(Normalize([0.3], [0.7]), body), (1, 8, 8), epsilon=0.1))


def stress_net(big: float) -> GloroNet:
    """Every rule that rounds: a strided conv, a dilated grouped one and a (3, 1) grouped one in nested residual
    blocks, Tanh, overlapping max and average pools, an adaptive pool and a dense residual block; hidden biases
    near ``big`` and ``1e3·big``, which the head takes back off."""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(2, 8, 3, stride=2, padding=1),  # 12 -> 6
        nn.LeakyReLU(0.3),
        Residual(
            nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),
                nn.Tanh(),
                Residual(nn.Conv2d(8, 8, (3, 1), padding=(1, 0), groups=2)),
            )
        ),
        nn.MaxPool2d(3, 1, 1),
        MinMax(),
        nn.AvgPool2d(3, 1, 1),
        nn.AdaptiveAvgPool2d(3),  # 6 -> 3
        nn.Flatten(),
        nn.Linear(72, 32),
        Residual(nn.Linear(32, 32)),
        nn.ReLU(),
        nn.Linear(32, 5),
    )
    with torch.no_grad():
        body[0].bias.uniform_(big, 2 * big)  # positive: through the LeakyReLU unchanged
        body[8].bias.uniform_(1e3 * big, 2e3 * big)
    model = nn.Sequential(Normalize([0.3, 0.5], [0.7, 0.2]), body)
    return cancelled_by_the_head(GloroNet(model, (2, 12, 12), epsilon=0.1))


def assert_the_bound_covers_the_error(net: GloroNet, r: float) -> None:
    """The float64 error of ``net``'s logits at 16 random points and at points ``r`` away from them, against an
    80-bit evaluation: within the bound at the points, and together within ``both + r·growth``."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, *net.in_shape, dtype=torch.float64, generator=g)
    logits, error = net.exact_forward(x)
    at_x = np.abs(logits.numpy().astype(LD) - reference(net, as_ld(x)))
    # the float64 error exceeds the allowance of old, scaled by the logits: the activations set it
    assert at_x.max() > 4 * FLOAT64_ALLOWANCE * (1 + logits.abs().max().item())
    assert (at_x <= error.both.numpy()).all()
    # at points r away, nothing is evaluated: both + growth * r covers the two points' errors together
    step = torch.randn(x.shape, dtype=torch.float64, generator=g)
    moved = x + r * step / step.flatten(1).norm(dim=1).view(-1, *[1] * len(net.in_shape))
    at_moved = np.abs(net.exact_logits(moved).numpy().astype(LD) - reference(net, as_ld(moved)))
    assert (at_x + at_moved <= (error.both + r * error.growth).numpy()).all()


needs_longdouble = pytest.mark.skipif(
    np.finfo(LD).eps >= np.finfo(np.float64).eps, reason="longdouble is float64 on this platform"
)


@needs_longdouble
def test_the_rounding_bound_covers_the_float64_error_at_the_point_and_in_its_ball() -> None:
    assert_the_bound_covers_the_error(rounding_net().eval(), 0.05)


@needs_longdouble
@pytest.mark.parametrize("big", [1e6, 1e9])
def test_the_rounding_bound_covers_every_layer_that_rounds(big: float) -> None:
    net = stress_net(big).eval()
    for r in (1e-3, 1.0):
        assert_the_bound_covers_the_error(net, r)


def test_a_dense_layer_on_rows_allows_for_the_bias_of_every_row() -> None:
    """A Linear on ``(B, 400, 1)`` inputs adds its bias 400 times per sample: ``x + 1`` with ``x`` below 2^-20
    rounds by up to 2^-53 in every row. The rounding bound of old allowed for one bias per sample, a third of
    the error measured here."""
    lin = nn.Linear(1, 1).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.fill_(1.0)
    x = torch.rand(8, 400, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2.0**-20
    with torch.no_grad():
        y = lin(x)
    # exact: x·1 + 1, each error computed in rationals
    errors = [
        math.sqrt(sum(float(Fraction(out) - Fraction(inp) - 1) ** 2 for out, inp in zip(ys, xs)))
        for ys, xs in zip(y.flatten(1).tolist(), x.flatten(1).tolist())
    ]
    gain, offset = layer_bound("lin", lin, (400, 1)).rounding()
    norms = x.flatten(1).norm(dim=1).tolist()
    assert all(e <= gain * n + offset for e, n in zip(errors, norms))
    assert max(e - gain * n - offset / math.sqrt(400) for e, n in zip(errors, norms)) > 0  # one bias: too few


def test_head_row_distances_are_rounded_up_even_at_safety_one() -> None:
    """Head rows 1 and −3·2^-26: their float32 distance rounds to 1, below the exact 1 + 3·2^-26, so the float32
    constant put the radius of x = 1 (exactly 1: the margin x·(w0 − w1) over ‖w0 − w1‖) at 1 + 4e-8 and, with
    ``safety=1.0``, certified ε = 1 + 1e-8 although x − (1 + 5e-9), inside that ball, is class 1. The float64
    distance, raised by its rounding, refuses it and keeps the radius at most the exact one."""
    body = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        body[1].weight.copy_(torch.tensor([[1.0], [-3 * 2.0**-26]]))
    net = GloroNet(body, (1, 1, 1), epsilon=1.0).eval()
    net.freeze(safety=1.0)
    assert net.certification_constant() == 1.0
    w0, w1 = (Fraction(float(v)) for v in body[1].weight.flatten())
    eps, x = 1.0 + 1e-8, 1.0
    inside = Fraction(x) - (1 + Fraction(5, 10**9))
    assert inside * (w0 - w1) < 0 and x - inside < Fraction(eps)  # exactly: class 1 inside the ε-ball
    pred, radius, clean = net.certify(torch.tensor([[[[x]]]]), eps)
    assert clean.item() == 0 and pred.item() == -1
    assert 0 < radius.item() <= x
