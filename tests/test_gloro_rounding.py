"""The float64 rounding that GloRo certificates allow for (:meth:`GloroNet.exact_forward`), against the rounding
itself.

Oracles: an evaluation of the same net in numpy's 80-bit ``longdouble`` (2048 times finer than float64), and
nets whose hidden activations carry large offsets that the head cancels, so that float64 logits are wrong by
far more than any allowance scaled by the logits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.gloro.layers import MinMax, Residual
from certkit.gloro.model import FLOAT64_ALLOWANCE, GloroNet
from certkit.models import Normalize

LD = np.longdouble


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    """The exact function of ``m`` (up to 80-bit rounding) for the layer kinds of :func:`rounding_net`."""
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
    if isinstance(m, nn.Conv2d):  # its matrix, unrolled in float64 (each entry one weight: exact)
        n = int(np.prod(x.shape[1:]))
        with torch.no_grad():
            basis = torch.eye(n, dtype=torch.float64).view(n, *x.shape[1:])
            unrolled = F.conv2d(basis, m.weight.double(), None, m.stride, m.padding)
        y = x.reshape(len(x), n) @ as_ld(unrolled.reshape(n, -1))
        return y.reshape(len(x), *unrolled.shape[1:]) + as_ld(m.bias)[None, :, None, None]
    if isinstance(m, MinMax):
        a, b = np.split(x, 2, axis=1)
        return np.concatenate([np.minimum(a, b), np.maximum(a, b)], 1)
    if isinstance(m, nn.AvgPool2d):  # disjoint windows
        k = m.kernel_size
        assert isinstance(k, int)
        b, c, h, w = x.shape
        return x.reshape(b, c, h // k, k, w // k, k).sum((3, 5)) / LD(k * k)
    if isinstance(m, nn.Flatten):
        return x.reshape(len(x), -1)
    if isinstance(m, nn.LeakyReLU):
        return np.where(x > 0, x, LD(m.negative_slope) * x)
    raise TypeError(type(m))


def as_ld(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy().astype(LD)


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
    net = GloroNet(nn.Sequential(Normalize([0.3], [0.7]), body), (1, 8, 8), epsilon=0.1).eval()
    with torch.no_grad():
        net.head.bias.copy_(-(net.exact_logits(torch.rand(1, 1, 8, 8)) - net.head.bias.double())[0].float())
    return net


@pytest.mark.skipif(np.finfo(LD).eps >= np.finfo(np.float64).eps, reason="longdouble is float64 on this platform")
def test_the_rounding_bound_covers_the_float64_error_at_the_point_and_in_its_ball() -> None:
    net = rounding_net()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    logits, error = net.exact_forward(x)
    at_x = np.abs(logits.numpy().astype(LD) - reference(net, as_ld(x)))
    # the float64 error exceeds the allowance of old, scaled by the logits: the activations set it
    assert at_x.max() > 4 * FLOAT64_ALLOWANCE * (1 + logits.abs().max().item())
    assert (at_x <= error.both.numpy()).all()
    # at points 0.05 away, nothing is evaluated: both + growth * r covers the two points' errors together
    r = 0.05
    step = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    moved = x + r * step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    at_moved = np.abs(net.exact_logits(moved).numpy().astype(LD) - reference(net, as_ld(moved)))
    assert (at_x + at_moved <= (error.both + r * error.growth).numpy()).all()
