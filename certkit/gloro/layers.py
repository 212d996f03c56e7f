"""Building blocks of GloRo networks whose Lipschitz constants :mod:`certkit.gloro.lipschitz` knows.

Only layers with a known, sound L2 Lipschitz bound may appear in a GloRo network; these are the two that
``torch.nn`` lacks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from certkit.errors import CertkitError


class MinMax(nn.Module):
    """GroupSort-2 activation: split the channels into two halves ``a, b`` and output ``(min(a,b), max(a,b))``.

    It is a permutation of its input on every pair, hence 1-Lipschitz *and* gradient-norm preserving,
    which is why GloRo nets use it instead of ReLU: ReLU throws away half of the gradient signal and with
    it much of the margin a Lipschitz-bounded network can build. Channels are paired by halves (as the
    PyTorch LiResNet does) rather than adjacent pairs; both are 1-Lipschitz. Works on ``(B, C)`` and
    ``(B, C, H, W)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c % 2:
            raise CertkitError(f"MinMax needs an even number of channels (got {c})")
        a, b = x[:, : c // 2], x[:, c // 2 :]
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)


class Residual(nn.Module):
    """``x + g(x)``: the one residual form whose bound ``1 + L(g)`` certkit computes.

    Plain ``nn.Module`` residual blocks hide their wiring inside ``forward``; the bound analysis cannot see
    it and refuses them, so residual GloRo nets must be written with this wrapper.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return x + self.inner(x)
