"""Split a model at its first linear layer, so that noise shared by several inputs is sent through it once.

Every certkit model starts ``Normalize -> (Flatten ->) Conv2d | Linear``: an affine map of the input. For
a noisy copy ``x + sigma * eps`` it is therefore the sum of an *image part* and a *noise part*:

    layer(normalize(x + sigma * eps)) = layer(normalize(x)) + layer_without_bias(sigma * eps / std)

(zero padding is linear too: padding the sum pads each term). When G inputs share the same noise draws
(:class:`certkit.smoothing.samplers.SharedNoise`), the image part is computed once per input and the
noise part once per draw, instead of the whole layer once per (input, draw) pair. On the small
Fashion-MNIST nets the first convolution, with its single input channel, writes a large feature map for
little arithmetic, which CPU kernels run far below their peak; the gain is measured by
``benchmarks/certify_throughput.py --shared-noise``.

The two sides are equal in exact arithmetic, but only for the modules the split re-implements: it calls
``F.conv2d`` with the layer's weight and divides by the Normalize's ``std`` itself. So the split is made only
when those modules are exactly the known classes (a subclass may compute something else), no forward or
pre-forward hook runs anywhere in the model or globally (``torch.fx`` inlines hooked containers, and the
split never calls the stem modules' hooks) and no module has its own ``forward`` set on the instance (the
noise part would skip it). Otherwise the caller sends whole noisy copies through the model,
which is always exact. In floating point the two sides still differ by rounding, which is why a run that
uses the split checks its votes against the plain model first (``vote_agreement``).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks

from certkit.models.layers import CALL_PATH, COMPUTES, Normalize, call_override, torch_type


@dataclass
class StemSplit:
    """``model(x) == rest(pair_sum(image_part(x), noise_part(0)))`` up to rounding, in two halves.

    ``relu`` and ``pool`` record a ReLU and a non-overlapping ``pool`` x ``pool`` max-pool that directly
    follow the first layer (LeNet's ``conv -> ReLU -> MaxPool2d(2)``): they are taken into the pair sum,
    where the pool becomes a maximum over the ``pool**2`` pixel phases of the two halves. That is exact
    (max and ReLU commute, and each pooling window holds one pixel of every phase) and lets the compiler
    emit one plain element-wise kernel for sum, pool and ReLU instead of a strided one over the full map.
    """

    normalize: Normalize
    flatten: bool
    layer: nn.Conv2d | nn.Linear
    relu: bool
    pool: int
    rest: nn.Module

    def image_part(self, x: Tensor) -> Tensor:
        """The first layer on the clean images, bias included."""
        z = self.normalize(x)
        return self._phases(self.layer(z.flatten(1) if self.flatten else z))

    def noise_part(self, eps: Tensor, sigma: float) -> Tensor:
        """The first layer's bias-free response to ``sigma * eps`` (eps: standard normal, pixel space)."""
        e = eps * (sigma / self.normalize.std)
        if isinstance(self.layer, nn.Linear):
            return F.linear(e.flatten(1) if self.flatten else e, self.layer.weight)
        conv = self.layer
        return self._phases(F.conv2d(e, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups))

    def pair_sum(self, a: Tensor, b: Tensor, channels_last: bool = False) -> Tensor:
        """The input of ``rest`` for every (image, draw) pair, image-major: (R * M, ...)."""
        if not self.pool:
            h = outer_sum(a, b, channels_last)
            return F.relu(h) if self.relu else h
        h = (a.unsqueeze(1) + b.unsqueeze(0)).amax(2).flatten(0, 1)  # (R, M, k*k, ...) -> (R * M, ...)
        h = F.relu(h) if self.relu else h
        return h.contiguous(memory_format=torch.channels_last) if channels_last else h

    def _phases(self, t: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, k*k, C, H // k, W // k): pixel (k*i + u, k*j + v) goes to phase (u, v)."""
        k = self.pool
        if not k:
            return t
        h, w = t.shape[-2] // k * k, t.shape[-1] // k * k
        return torch.stack([t[..., u:h:k, v:w:k] for u in range(k) for v in range(k)], dim=1)


class _NormalizeLeaf(fx.Tracer):
    """Keeps Normalize as one node, so the graph shows it as the input's only consumer, and certkit's fast
    paths as one each, like the torch layers they compute."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or type(m) in COMPUTES or super().is_leaf_module(m, qualname)


def structure_key(model: nn.Module) -> Hashable:
    """What a stem split depends on besides the weights: every module's identity, class, hooks and call methods
    set on the instance, and the global hooks (what :func:`~certkit.models.layers.call_override` reads). Cheap to
    compute, so a caller can re-split whenever it changes."""
    modules = tuple(
        (
            name,
            id(m),
            type(m),
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
            tuple(a for a in CALL_PATH if a in vars(m)),
        )
        for name, m in model.named_modules()
    )
    return modules, tuple(module_hooks._global_forward_hooks), tuple(module_hooks._global_forward_pre_hooks)


def split_stem(model: nn.Module) -> StemSplit | None:
    """Split ``model`` as :class:`StemSplit`, or None when it does not start with a splittable affine stem.

    Splittable: every module is called as its class defines (no forward hook and no ``forward`` set on an
    instance: :func:`~certkit.models.layers.call_override`); the input goes only into a
    :class:`Normalize`, whose output goes only (optionally through a default ``nn.Flatten``) into a
    ``Conv2d`` with zero padding or a ``Linear``, each of exactly that class or certkit's fast path for it
    (``COMPUTES``: the same function), not a subclass of the user's; and the model traces with ``torch.fx`` (no
    data-dependent control flow). Anything else returns None and the caller
    sends whole noisy copies through the model, which is always correct.
    """
    if call_override(model.named_modules()) is not None:
        return None
    try:
        tracer = _NormalizeLeaf()
        graph = tracer.trace(model)
    except Exception:  # fx raises many types on untraceable code; the fallback is always valid
        return None
    root = tracer.root

    def sole_user(node: fx.Node) -> fx.Node | None:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args != (node,) or users[0].kwargs:
            return None
        return users[0]

    def module(node: fx.Node) -> nn.Module:
        return root.get_submodule(str(node.target))

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    chain = [placeholders[0]]
    norm = sole_user(chain[0])
    if norm is None or type(module(norm)) is not Normalize:
        return None
    chain.append(norm)
    node = sole_user(norm)
    flatten = False
    if node is not None and type(module(node)) is nn.Flatten:
        if (module(node).start_dim, module(node).end_dim) != (1, -1):
            return None
        flatten = True
        chain.append(node)
        node = sole_user(node)
    if node is None:
        return None
    layer = module(node)
    conv = torch_type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not flatten
    if not conv and torch_type(layer) is not nn.Linear:
        return None
    # an element-wise ReLU and a non-overlapping max-pool right after it, in either order, join the stem
    relu, pool, last = False, 0, node
    while True:
        nxt = sole_user(last)
        if nxt is None:
            break
        m = module(nxt)
        if type(m) is nn.ReLU and not relu:
            relu = True
        elif conv and not pool and _plain_max_pool(m):
            pool = _plain_max_pool(m)
        else:
            break
        chain.append(last)
        last = nxt

    # the rest: the same graph with the stem's output as its input
    rest_graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {last: rest_graph.placeholder("h")}
    for n in graph.nodes:
        if n in chain or n is last:
            continue
        values[n] = rest_graph.node_copy(n, lambda arg: values[arg])
    rest = fx.GraphModule(root, rest_graph)
    return StemSplit(module(norm), flatten, layer, relu, pool, rest)  # type: ignore[arg-type]


def _plain_max_pool(m: nn.Module) -> int:
    """k for a ``MaxPool2d`` with square kernel k = stride, no padding, dilation or ceil mode; else 0."""
    if not isinstance(m, nn.MaxPool2d) or torch_type(m) is not nn.MaxPool2d:
        return 0
    if m.padding not in (0, (0, 0)) or m.dilation not in (1, (1, 1)):
        return 0
    k, stride = m.kernel_size, m.stride
    k = k if isinstance(k, int) else (k[0] if k[0] == k[1] else 0)
    stride = stride if isinstance(stride, int) else (stride[0] if stride[0] == stride[1] else 0)
    return k if k > 1 and stride == k and not m.ceil_mode and not m.return_indices else 0


def outer_sum(a: Tensor, b: Tensor, channels_last: bool = False) -> Tensor:
    """Rows ``a[i] + b[j]`` for every pair, input-major: (R, ...) and (M, ...) give (R * M, ...).

    ``channels_last`` with 4-D inputs sums in NHWC order and returns a channels-last tensor, so an eager
    convolution gets the layout it was prepared for without another copy (under ``torch.compile`` leave it
    off: the compiler picks the layout of the fused kernel itself).
    """
    if channels_last and a.dim() == 4:
        r, c, h, w = a.shape
        nhwc = a.permute(0, 2, 3, 1).unsqueeze(1) + b.permute(0, 2, 3, 1).unsqueeze(0)
        return nhwc.reshape(r * len(b), h, w, c).permute(0, 3, 1, 2)
    return (a.unsqueeze(1) + b.unsqueeze(0)).flatten(0, 1)
