"""Layers shared by the zoo."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.modules import module as module_hooks


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (grad, jvp, vmap, ...) or a forward-mode AD level is active.

    The fast paths below are autograd Functions without ``setup_context``, a jvp or a batching rule, and an
    ``out=`` maximum: those transforms refuse them, while torch's own layers support them. Under a transform
    the layers therefore run torch's; both checks read a flag, so the fast paths keep their speed.
    """
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the model's first layer.

    Keeping normalization inside the model means noise is added in [0, 1] pixel space and radii are in pixel
    units; mean and std are buffers, so they travel with the checkpoint and cannot be forgotten at load time
    (the cause of the ~30%-accuracy reports on released checkpoints of public code bases).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have one value per channel")
        if any(s <= 0 for s in std):
            raise ValueError("std must be positive")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def single_channel_input_gradient(grad_out: Tensor, weight: Tensor, padding: int) -> Tensor:
    """∂L/∂x of a stride-1 convolution of a one-channel image, from the output gradient ``(B, C, H, W)``.

    Each input pixel collects, over the k² kernel taps, the output gradient at that tap's offset weighted over
    the output channels: one batched matrix product (taps × channels by channels × positions) and k² shifted
    additions, then the padding cropped off. oneDNN's ``convolution_backward`` runs this product about ten
    times below its speed on the network's other convolutions on CPU (one input channel leaves its kernels
    nothing to vectorise over), and the attack steps of SmoothAdv and SmoothMix need it on every step
    (figures: docs/benchmarks.md).
    """
    b, c, h, w = grad_out.shape
    k = weight.shape[-1]
    if grad_out.is_contiguous(memory_format=torch.channels_last):
        # (B, H*W, C) in memory: the product reads it transposed through its strides, without a copy to
        # (B, C, H*W), which took a large share of this function's time (docs/benchmarks.md)
        rows = grad_out.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2)
    else:
        rows = grad_out.contiguous().view(b, c, h * w)
    taps = torch.matmul(weight.reshape(c, k * k).t(), rows).view(b, k, k, h, w)
    grad_in = grad_out.new_zeros(b, h + k - 1, w + k - 1)
    for i in range(k):
        for j in range(k):
            grad_in[:, i : i + h, j : j + w].add_(taps[:, i, j])  # in place: `+=` would copy back
    if padding:
        grad_in = grad_in[:, padding:-padding, padding:-padding]
    return grad_in.unsqueeze(1)


class _SingleChannelConv(torch.autograd.Function):
    """A convolution whose input gradient is :func:`single_channel_input_gradient`; the weight and bias
    gradients are torch's own."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return torch.nn.functional.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        p = ctx.padding
        grad_x = single_channel_input_gradient(grad_out, weight, p) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out,
                x,
                weight,
                [weight.shape[0]] if ctx.has_bias else None,
                [1, 1],
                [p, p],
                [1, 1],
                False,
                [0, 0],
                1,
                [False, ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
            )
        return grad_x, grad_w, grad_b, None


class FirstConv(nn.Conv2d):
    """``nn.Conv2d`` for the first layer of a network on one-channel images (MNIST, Fashion-MNIST).

    The same function and parameters (a checkpoint does not tell them apart); only when a gradient with
    respect to the input is asked for in fp32 on CPU — an attack step — it is computed by
    :func:`single_channel_input_gradient` instead of oneDNN. Everything else (training passes, whose inputs
    need no gradient, CUDA, autocast, other shapes, ``torch.func`` transforms and forward-mode AD) runs
    ``nn.Conv2d`` itself.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.requires_grad
            and torch.is_grad_enabled()
            and x.dim() == 4  # an unbatched (C, H, W) image goes to nn.Conv2d, which takes it
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and self.in_channels == 1
            and self.groups == 1
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and self.padding[0] == self.padding[1]
            and self.kernel_size[0] == self.kernel_size[1]
            and not _transformed()
        ):
            return _SingleChannelConv.apply(x, self.weight, self.bias, self.padding[0])
        return super().forward(x)


def max_pool_2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)``, the same values (NaN included), as two elementwise maxima of strided views.

    torch's CPU max-pool also writes the argmax indices, which only a backward pass needs, and is slow on
    contiguous (NCHW) tensors; without them the pool is a pass over memory, several times faster, and a
    sizeable share of LeNet's forward pass, which certification runs n times per image (figures:
    docs/benchmarks.md). An odd last row or column is dropped, as the floor-mode pool does.
    """
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    top = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
    return torch.maximum(top, torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]), out=top)


class Pool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` that skips the argmax indices when no gradient can flow through it on CPU.

    Inference (certification, evaluation, a CRT teacher's forward pass) runs :func:`max_pool_2x2`; a pass
    that needs the backward, every pass on another device (where torch's pool is one kernel launch against
    three) and every pass under a ``torch.func`` transform or forward-mode AD (the ``out=`` maximum has
    neither a batching rule nor a forward derivative) runs ``nn.MaxPool2d`` itself, so training and its
    gradients are unchanged.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) or _transformed():
            return super().forward(x)
        return max_pool_2x2(x)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN's matmul (the primitive torch's inductor uses on CPU)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """A linear layer whose forward and both gradient products run on oneDNN.

    oneDNN's matmul has no derivative of its own, so a backward that builds a graph (``create_graph=True``:
    an input-gradient penalty, a Hessian-vector product) computes the products with ``torch.mm`` instead,
    whose derivative autograd knows; through oneDNN that graph would treat them as constants and give zero
    second-order gradients without an error."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if torch.is_grad_enabled():  # a double backward: differentiable products
            if ctx.needs_input_grad[0]:
                grad_x = grad_out.mm(weight)
            if ctx.needs_input_grad[1]:
                grad_w = grad_out.t().mm(x)
        else:
            # oneDNN reads the transposed views through their strides, faster than copying them first
            if ctx.needs_input_grad[0]:  # grad_out @ weight: a linear layer with weight.T
                grad_x = _onednn_linear(grad_out, weight.t(), None)
            if ctx.needs_input_grad[1]:  # grad_out.T @ x
                grad_w = _onednn_linear(grad_out.t(), x.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b


_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class WideLinear(nn.Linear):
    """``nn.Linear`` for a network's wide hidden layer (LeNet's 800 → 500), computed by oneDNN on CPU in fp32.

    torch runs a CPU linear layer in fp32 on the BLAS it was built with (MKL), which on the AMD EPYC this
    project is developed on reaches about half the rate of oneDNN's matmul, the library that already runs the
    convolutions, and the hidden layer is a sizeable share of LeNet's training step. The same parameters and
    function, rounded in another summation order (a double backward computes its products with ``torch.mm``);
    CUDA, autocast, torch.compile, ``torch.func`` transforms, forward-mode AD, other dtypes and inputs that are
    not a non-empty batch of vectors run ``nn.Linear`` itself. Narrow layers (a 10-class head) are
    faster on MKL and stay ``nn.Linear`` (figures: docs/benchmarks.md).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (
            _HAS_ONEDNN_LINEAR
            and x.device.type == "cpu"
            and x.dim() == 2
            and x.shape[0] > 0  # oneDNN has no empty inner product (the weight gradient's would be)
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # inductor lowers oneDNN's matmul for frozen weights only
            and not _transformed()
        ):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return _onednn_linear(x, self.weight, self.bias)


#: certkit's CPU fast paths above, each computing the function of the torch layer it maps to: code that takes
#: layers by kind (the shared-noise split, GloRo's bounds) takes them as that layer, and nothing else than
#: exactly a torch class
COMPUTES: dict[type[nn.Module], type[nn.Module]] = {FirstConv: nn.Conv2d, Pool2x2: nn.MaxPool2d, WideLinear: nn.Linear}


def torch_type(m: nn.Module) -> type[nn.Module]:
    """The torch layer class whose function ``m`` computes: its own class, or the one of a certkit fast path."""
    return COMPUTES.get(type(m), type(m))


#: what calling a module runs: a class or an instance that redefines one of them may compute another function
CALL_PATH = ("__call__", "_wrapped_call_impl", "_call_impl", "forward")


def call_override(modules: Iterable[tuple[str, nn.Module]]) -> str | None:
    """What may make calling one of the ``(name, module)`` pairs compute something else than its class's
    ``forward``, in words, or None: a forward hook or pre-hook, registered globally or on the module (either may
    replace an input or an output), or a call method (:data:`CALL_PATH`) set on the instance.

    Code that computes a layer's function from its class instead of calling it (GloRo's bounds, the
    shared-noise stem split) holds only for modules where this is None.
    """
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return "a global forward hook is registered (register_module_forward_hook or _pre_hook)"
    for name, m in modules:
        label = f"layer {name or '<root>'!r} ({type(m).__name__})"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{label} has a forward hook or pre-hook"
        replaced = [a for a in CALL_PATH if a in vars(m)]
        if replaced:
            return f"{label} has {replaced[0]} set on the instance"
    return None
