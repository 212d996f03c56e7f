"""The GloRo architectures of Leino et al. (ICML 2021), registered in the model zoo.

``gloro-2c2f`` (MNIST ε=0.3), ``gloro-4c3f`` (MNIST ε=1.58), ``gloro-6c2f`` (CIFAR-10 ε=36/255) and
``gloro-8c2f`` (Tiny-ImageNet). Following the paper and the library: convolutions with TensorFlow-style
"same" padding (``4×4/2`` convs halve the size, ``⌈n/2⌉``), MinMax activations (1-Lipschitz and gradient-
norm preserving), orthogonal initialisation (every layer starts with all singular values 1, so the initial
Lipschitz bound is not astronomically loose), and no normalization layers (a batch-dependent layer has no
fixed Lipschitz constant). Every layer is one the bound analysis of :mod:`certkit.gloro.lipschitz` knows. The
GloroNet wrapper is registered here too, so checkpoints rebuild it by its ``wrapper`` key.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from certkit.gloro.layers import MinMax
from certkit.gloro.model import GloroNet
from certkit.models.registry import register_model, register_wrapper

# (channels, kernel, stride) per conv, then widths of the hidden dense layers
_ARCHS: dict[str, tuple[list[tuple[int, int, int]], list[int], str, str]] = {
    "gloro-2c2f": (
        [(16, 4, 2), (32, 4, 2)],
        [100],
        "any",
        "GloRo 2C2F: conv16 4x4/2, conv32 4x4/2, dense100 (MNIST eps 0.3)",
    ),
    "gloro-4c3f": (
        [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)],
        [512, 512],
        "any",
        "GloRo 4C3F: conv32, conv32/2, conv64, conv64/2, dense512 x2 (MNIST eps 1.58)",
    ),
    "gloro-6c2f": (
        [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)],
        [512],
        "any",
        "GloRo 6C2F: conv32 x2, conv32/2, conv64 x2, conv64/2, dense512 (CIFAR-10 eps 36/255)",
    ),
    "gloro-8c2f": (
        [(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 3, 1), (128, 4, 2), (256, 3, 1), (256, 4, 2)],
        [256],
        "any",
        "GloRo 8C2F: conv64 x2, conv64/2, conv128 x2, conv128/2, conv256, conv256/2, dense256 (Tiny-ImageNet)",
    ),
}


def same_conv(c_in: int, c_out: int, k: int, s: int, size: tuple[int, int]) -> tuple[list[nn.Module], tuple[int, int]]:
    """A conv with TensorFlow "same" padding for input ``size``: output ``⌈n/s⌉``.

    Torch's ``padding='same'`` only exists for stride 1, and a symmetric ``padding=1`` on a 4×4/2 conv only
    gives ``⌈n/2⌉`` for even ``n``; the total padding ``(out−1)·s + k − n`` is therefore computed per input
    size, with the odd pixel after (TF's convention) through an explicit ``ZeroPad2d`` when asymmetric.
    """
    layers: list[nn.Module] = []
    pads = []
    out = []
    for n in size:
        o = -(-n // s)
        total = max((o - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
        out.append(o)
    (t, b), (left, right) = pads
    if t == b and left == right:
        layers.append(nn.Conv2d(c_in, c_out, k, s, padding=(t, left)))
    else:
        layers += [nn.ZeroPad2d((left, right, t, b)), nn.Conv2d(c_in, c_out, k, s)]
    return layers, (out[0], out[1])


def gloro_body(
    convs: Sequence[tuple[int, int, int]], dense: Sequence[int], num_classes: int, in_shape: tuple[int, int, int]
) -> nn.Sequential:
    """conv/MinMax blocks, flatten, dense/MinMax blocks, linear head; orthogonal weights, zero biases."""
    c, h, w = in_shape
    size = (h, w)
    layers: list[nn.Module] = []
    for width, k, s in convs:
        block, size = same_conv(c, width, k, s, size)
        layers += [*block, MinMax()]
        c = width
    layers.append(nn.Flatten())
    features = c * size[0] * size[1]
    for width in dense:
        layers += [nn.Linear(features, width), MinMax()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def _register(name: str) -> None:
    convs, dense, family, description = _ARCHS[name]

    @register_model(name, description, family=family)
    def factory(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
        return gloro_body(convs, dense, num_classes, in_shape)


for _name in _ARCHS:
    _register(_name)

# a GloRo checkpoint's model.json says "wrapper": "gloro"; its frozen bound, epsilon and iterates are buffers
register_wrapper("gloro", GloroNet.from_meta)
