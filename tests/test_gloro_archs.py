"""The registry's GloRo architectures (:mod:`certkit.gloro.archs`): TensorFlow "same" padding, and a bound that
the bound analysis accepts and no margin gradient exceeds.

Oracles: ``⌈n/s⌉`` for every convolution's output size, whatever the parity of ``n`` (odd sizes take the
asymmetric ``ZeroPad2d`` path of ``same_conv``), and the gradient norm of every class margin at random inputs,
which a sound constant ``K_ji`` bounds.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from certkit.gloro.model import GloroNet
from certkit.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


Size = tuple[int, ...]


def conv_sizes(body: nn.Sequential, in_shape: tuple[int, int, int]) -> list[tuple[Size, int, Size]]:
    """``(block input size, stride, output size)`` of every conv, a ``ZeroPad2d`` before it counted in its block."""
    seen: dict[nn.Module, tuple[Size, Size]] = {}

    def record(m: nn.Module, args: tuple[Tensor], out: Tensor) -> None:
        seen[m] = (tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))

    hooks = [m.register_forward_hook(record) for m in body]
    try:
        with torch.no_grad():
            body(torch.zeros(1, *in_shape))
    finally:
        for h in hooks:
            h.remove()
    layers = list(body)
    sizes = []
    for i, m in enumerate(layers):
        if isinstance(m, nn.Conv2d):
            first = layers[i - 1] if i and isinstance(layers[i - 1], nn.ZeroPad2d) else m
            sizes.append((seen[first][0], m.stride[0], seen[m][1]))
    return sizes


ARCHS = [
    ("gloro-2c2f", (1, 28, 28)),
    ("gloro-2c2f", (1, 7, 7)),  # odd: the first 4x4/2 conv pads 1 before and 2 after (7 -> 4)
    ("gloro-4c3f", (1, 28, 28)),
    ("gloro-6c2f", (3, 32, 32)),
    ("gloro-8c2f", (3, 64, 64)),
]


@pytest.mark.parametrize("arch, in_shape", ARCHS)
def test_convolutions_have_tensorflow_same_output_sizes(arch: str, in_shape: tuple[int, int, int]) -> None:
    body = create_model(arch, 10, in_shape)[1]
    sizes = conv_sizes(body, in_shape)
    assert len(sizes) == {"2c2f": 2, "4c3f": 4, "6c2f": 6, "8c2f": 8}[arch[-4:]]
    for (h, w), s, out in sizes:  # the gloro-* convs have square strides
        assert out == (math.ceil(h / s), math.ceil(w / s))
    asymmetric = [m for m in body if isinstance(m, nn.ZeroPad2d) and len(set(m.padding)) > 1]
    assert bool(asymmetric) == (in_shape[-1] % 2 == 1)


def margin_gradient_ratio(net: GloroNet, x: Tensor) -> float:
    """The largest ``‖∇(y_j − y_i)‖ / K_ji`` over the inputs ``x`` and every pair of classes (float64)."""
    k = net.margin_constants(net.certification_constant()).detach().double()
    twin = copy.deepcopy(net).double()
    x = x.double().requires_grad_(True)
    logits = twin(x)
    worst = 0.0
    for j in range(net.num_classes):
        for i in range(net.num_classes):
            if i != j:
                (g,) = torch.autograd.grad((logits[:, j] - logits[:, i]).sum(), x, retain_graph=True)
                worst = max(worst, float((g.flatten(1).norm(dim=1) / k[j, i]).max()))
    return worst


@pytest.mark.parametrize(
    "arch, in_shape",
    # the deeper nets' freeze takes seconds (8c2f about 50 s): the slow tier checks them
    [pytest.param(*a, marks=pytest.mark.slow) if a[0] in ("gloro-6c2f", "gloro-8c2f") else a for a in ARCHS],
)
def test_the_bound_is_accepted_and_beats_every_margin_gradient(arch: str, in_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    net = GloroNet.from_arch(arch, 4, in_shape, epsilon=0.3).eval()
    info = net.freeze()
    assert info["lipschitz_bound"] >= info["lipschitz_guaranteed"] >= info["lipschitz_estimate"] > 0
    ratio = margin_gradient_ratio(net, torch.rand(8, *in_shape))
    assert 0 < ratio <= 1
