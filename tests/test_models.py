"""Every registered architecture builds and gives (B, num_classes) logits; normalization is the first layer."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from certkit.errors import CertkitError
from certkit.models import Normalize, create_model, layers, list_models, model_spec
from certkit.models.layers import FirstConv, Pool2x2, WideLinear, max_pool_2x2, single_channel_input_gradient

SHAPES = {"imagenet": (3, 224, 224), "cifar": (3, 32, 32)}


@pytest.mark.parametrize("arch", list_models())
def test_output_shape(arch: str) -> None:
    family = model_spec(arch).family
    in_shape = SHAPES.get(family, (1, 28, 28))
    num_classes = 7
    model = create_model(arch, num_classes, in_shape).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *in_shape))
    assert out.shape == (2, num_classes)
    assert isinstance(model[0], Normalize)


def test_lenet_matches_the_literature() -> None:
    model = create_model("lenet", 10, (1, 28, 28))
    body = model[1]
    assert body.features[0].out_channels == 20 and body.features[3].out_channels == 50
    assert body.classifier[1].in_features == 800 and body.classifier[1].out_features == 500


def test_cifar_resnet_depths() -> None:
    for depth, blocks in ((20, 3), (110, 18)):
        body = create_model(f"resnet{depth}", 10, (3, 32, 32))[1]
        assert len(body.layer1) == blocks
        convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in body.modules())
        assert convs + 1 == depth  # 3x3 convs + the final fc


def test_normalization_is_applied() -> None:
    model = create_model("lenet", 10, (1, 28, 28), mean=[0.5], std=[0.25])
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(model[0](x), (x - 0.5) / 0.25)


def test_unknown_arch_lists_valid() -> None:
    with pytest.raises(CertkitError, match=r"valid architectures: .*lenet"):
        create_model("vgg99", 10, (1, 28, 28))


@pytest.mark.parametrize("arch", ["lenet", "smallcnn"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_pool_before_relu_is_the_papers_relu_before_pool_in_value_and_gradient(
    arch: str, memory_format: torch.memory_format
) -> None:
    """certkit's nets pool before the ReLU (cheaper); the papers' order, built from the same weights, gives
    bit-identical logits, input gradients and weight gradients."""
    torch.manual_seed(0)
    ours = create_model(arch, 10, (1, 28, 28)).to(memory_format=memory_format)
    body = ours[1]
    convs = [m for m in body.features if isinstance(m, torch.nn.Conv2d)]
    theirs_features = torch.nn.Sequential(
        *(layer for conv in convs for layer in (conv, torch.nn.ReLU(), torch.nn.MaxPool2d(2)))
    )

    def papers(x: torch.Tensor) -> torch.Tensor:
        return body.classifier(theirs_features(ours[0](x)))

    x = torch.rand(16, 1, 28, 28) * 4 - 2  # wide inputs leave many pooling windows with no positive value
    grads = []
    for forward in (ours, papers):
        xi = x.clone().to(memory_format=memory_format).requires_grad_()
        out = forward(xi)
        g = torch.autograd.grad(out.square().sum(), [xi, *ours.parameters()])
        grads.append((out.detach(), *g))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _first_conv_pair(kernel: int, padding: int) -> tuple[FirstConv, torch.nn.Conv2d]:
    torch.manual_seed(0)
    ours = FirstConv(1, 20, kernel, padding=padding)
    plain = torch.nn.Conv2d(1, 20, kernel, padding=padding)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


@pytest.mark.parametrize(("kernel", "padding"), [(5, 0), (3, 1), (5, 2)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_first_conv_is_conv2d_in_value_and_every_gradient(
    kernel: int, padding: int, memory_format: torch.memory_format
) -> None:
    """The attack path (an input that needs a gradient, fp32, CPU) runs the batched-product input gradient;
    its output and parameter gradients are torch's own, its input gradient equal up to summation order."""
    ours, plain = (m.to(memory_format=memory_format) for m in _first_conv_pair(kernel, padding))
    x = torch.rand(6, 1, 28, 28)
    results = []
    for conv in (ours, plain):
        xi = x.clone().to(memory_format=memory_format).requires_grad_()
        out = conv(xi)
        g = torch.autograd.grad(out.sin().sum(), [xi, conv.weight, conv.bias])
        results.append((out, *g))
        assert ("SingleChannelConv" in type(out.grad_fn).__name__) == (conv is ours)
    (out_a, gx_a, gw_a, gb_a), (out_b, gx_b, gw_b, gb_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gw_a, gw_b) and torch.equal(gb_a, gb_b)
    assert gx_a.shape == gx_b.shape == x.shape
    torch.testing.assert_close(gx_a, gx_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 20])
def test_single_channel_input_gradient_reads_either_layout_of_the_output_gradient(channels: int) -> None:
    """A channels-last output gradient is read through its strides (no copy), a contiguous one as it is;
    both give torch's own input gradient."""
    torch.manual_seed(0)
    weight = torch.randn(channels, 1, 5, 5)
    grad_out = torch.randn(3, channels, 24, 24)
    expected = torch.nn.grad.conv2d_input((3, 1, 28, 28), weight, grad_out)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = single_channel_input_gradient(grad_out.contiguous(memory_format=layout), weight, 0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)  # sums of up to 500 terms of size ~1


def test_first_conv_runs_conv2d_itself_when_no_input_gradient_is_asked_for() -> None:
    """A training pass (the input needs no gradient), bf16 autocast and no-grad inference take nn.Conv2d's
    own path; so do shapes the input-gradient formula does not cover (a stride)."""
    ours, _ = _first_conv_pair(5, 0)
    x = torch.rand(4, 1, 28, 28)
    assert "SingleChannelConv" not in type(ours(x).grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "SingleChannelConv" not in type(ours(x.requires_grad_()).grad_fn).__name__
    with torch.no_grad():
        assert ours(x).grad_fn is None
    strided = FirstConv(1, 4, 3, stride=2)
    assert "SingleChannelConv" not in type(strided(torch.rand(2, 1, 9, 9, requires_grad=True)).grad_fn).__name__


def test_first_conv_takes_an_unbatched_image_as_conv2d_does() -> None:
    ours, plain = _first_conv_pair(5, 0)
    grads = []
    for conv in (ours, plain):
        x = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(1)).requires_grad_()
        (gx,) = torch.autograd.grad(conv(x).sin().sum(), [x])
        grads.append(gx)
    assert grads[0].shape == (1, 28, 28)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("arch", ["lenet", "smallcnn"])
def test_one_channel_nets_start_with_first_conv_and_keep_their_parameter_names(arch: str) -> None:
    """A checkpoint saved before FirstConv existed (plain Conv2d, the same names) loads unchanged."""
    model = create_model(arch, 10, (1, 28, 28))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert isinstance(convs[0], FirstConv) and not any(isinstance(c, FirstConv) for c in convs[1:])
    assert "1.features.0.weight" in model.state_dict()
    rgb = create_model(arch, 10, (3, 28, 28))
    assert not any(isinstance(m, FirstConv) for m in rgb.modules())


@pytest.mark.parametrize("shape", [(3, 5, 8, 8), (2, 4, 9, 7), (1, 3, 2, 2)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool_2x2_is_torchs_pool_nan_and_infinities_included(
    shape: tuple[int, int, int, int], memory_format: torch.memory_format, dtype: torch.dtype
) -> None:
    """The same values and layout as ``F.max_pool2d(x, 2)``; odd sizes drop the last row/column as it does."""
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    flat = x.view(-1)
    flat[::7] = float("nan")
    flat[1::11] = float("inf")
    flat[2::13] = float("-inf")
    x = x.contiguous(memory_format=memory_format)
    ours, torchs = max_pool_2x2(x), F.max_pool2d(x, 2)
    assert ours.shape == torchs.shape and ours.dtype == torchs.dtype
    assert torch.equal(ours.isnan(), torchs.isnan()) and torch.equal(ours.nan_to_num(0.0), torchs.nan_to_num(0.0))
    assert ours.is_contiguous(memory_format=memory_format)


def test_pool2x2_skips_the_indices_only_where_no_gradient_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inference takes the index-free pool; a pass with an input gradient takes torch's, whose backward
    needs the indices; both give torch's values."""
    calls: list[int] = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return max_pool_2x2(x)

    monkeypatch.setattr(layers, "max_pool_2x2", counted)
    pool, x = Pool2x2(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(pool(x), F.max_pool2d(x, 2)) and len(calls) == 1
    assert torch.equal(pool(x), F.max_pool2d(x, 2)) and len(calls) == 2  # no input gradient: also inference
    xg = x.clone().requires_grad_()
    out = pool(xg)
    assert len(calls) == 2 and "MaxPool2DWithIndices" in type(out.grad_fn).__name__
    with torch.no_grad():
        pool(xg)
    assert len(calls) == 3


@pytest.mark.parametrize("arch", ["lenet", "smallcnn"])
def test_one_channel_nets_infer_as_with_torchs_max_pool(arch: str) -> None:
    """Logits under no-grad equal those of the same network with ``nn.MaxPool2d`` in place of Pool2x2."""
    torch.manual_seed(0)
    ours = create_model(arch, 10, (1, 28, 28)).to(memory_format=torch.channels_last)
    theirs = copy.deepcopy(ours)
    features = theirs[1].features
    for i, m in enumerate(features):
        if isinstance(m, Pool2x2):
            features[i] = torch.nn.MaxPool2d(2)
    assert sum(isinstance(m, Pool2x2) for m in ours.modules()) == 2
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def _wide_linear_pair() -> tuple[WideLinear, torch.nn.Linear]:
    torch.manual_seed(0)
    ours = WideLinear(800, 500)
    plain = torch.nn.Linear(800, 500)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


@pytest.mark.skipif(not layers._HAS_ONEDNN_LINEAR, reason="torch built without oneDNN")
def test_wide_linear_is_linear_in_value_and_every_gradient() -> None:
    """The training path runs oneDNN's matmul for the output and both gradient products (the bias gradient
    is a sum): equal to ``nn.Linear`` up to summation order, and the same from one call to the next."""
    ours, plain = _wide_linear_pair()
    x = torch.randn(64, 800)
    results = []
    for layer in (ours, plain):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        assert ("OneDNNLinear" in type(out.grad_fn).__name__) == (layer is ours)
        grads = torch.autograd.grad(out.sin().sum(), [xi, layer.weight, layer.bias])
        results.append((out, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    again = ours(x.clone().requires_grad_())
    assert torch.equal(again, results[0][0])
    with torch.no_grad():  # inference calls the primitive directly
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)


def test_wide_linear_runs_linear_itself_under_autocast_compile_and_other_shapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bf16 autocast, a 3-d input, an empty batch, fp64 and a torch.compile trace take ``nn.Linear``'s own
    path."""
    ours, plain = _wide_linear_pair()
    calls: list[int] = []
    real = layers._onednn_linear

    def counted(*args: torch.Tensor | None) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(layers, "_onednn_linear", counted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(torch.randn(4, 800)).dtype == torch.bfloat16
    three_d = torch.randn(2, 3, 800)
    assert torch.equal(ours(three_d), plain(three_d))
    empty = torch.empty(0, 800, requires_grad=True)
    ours(empty).sum().backward()
    assert empty.grad is not None and empty.grad.shape == (0, 800)
    ours64, plain64 = ours.double(), plain.double()
    x64 = torch.randn(4, 800, dtype=torch.float64)
    assert torch.equal(ours64(x64), plain64(x64))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ours.float()
    ours(torch.randn(4, 800))
    assert calls == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    if layers._HAS_ONEDNN_LINEAR:
        ours(torch.randn(4, 800))
        assert calls == [1]


@pytest.mark.parametrize("arch", ["lenet", "smallcnn"])
def test_one_channel_nets_have_a_wide_hidden_layer_and_a_plain_head(arch: str) -> None:
    model = create_model(arch, 10, (1, 28, 28))
    hidden, head = (m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert type(hidden) is WideLinear and type(head) is torch.nn.Linear
    assert "1.classifier.1.weight" in model.state_dict() and "1.classifier.3.weight" in model.state_dict()


def _with_torch_layers(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose certkit fast-path layers are the torch classes they compute (same state)."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        m.__class__ = layers.torch_type(m)
    return plain


def test_double_backward_through_lenet_is_torchs() -> None:
    """An input-gradient penalty (a backward with ``create_graph=True``, then its own backward) through LeNet's
    FirstConv, Pool2x2 and WideLinear: every parameter's gradient is the one torch's layers give. oneDNN's
    matmul has no derivative, so a backward built on it would hand the hidden layer a zero gradient."""
    torch.manual_seed(0)
    ours = create_model("lenet", 10, (1, 28, 28))
    plain = _with_torch_layers(ours)
    assert {type(m) for m in plain.modules()}.isdisjoint({FirstConv, Pool2x2, WideLinear})
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 5, 9])
    results = []
    for model in (ours, plain):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(F.cross_entropy(model(xi), y), [xi], create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), list(model.parameters())))
    for name, a, b in zip([n for n, _ in ours.named_parameters()], *results):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["wide_linear", "first_conv", "pool"])
def test_fast_layers_under_torch_func_and_forward_ad_are_torchs(kind: str) -> None:
    """``torch.func.grad``, ``jvp``, ``vmap`` and forward-mode dual tensors through each fast-path layer give
    what torch's layer gives (the fast paths have no batching rule or forward derivative, so they step
    aside)."""
    torch.manual_seed(0)
    ours: torch.nn.Module = {
        "wide_linear": lambda: WideLinear(32, 16),
        "first_conv": lambda: FirstConv(1, 4, 3, padding=1),
        "pool": Pool2x2,
    }[kind]()
    plain = _with_torch_layers(ours)
    shape = (5, 32) if kind == "wide_linear" else (2, 1, 8, 8)
    x, v = torch.randn(shape), torch.randn(shape)
    many = torch.randn(3, *shape)

    def value(layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: layer(t).sin().sum()

    for got, want in [
        (torch.func.grad(value(ours))(x), torch.func.grad(value(plain))(x)),
        (torch.func.jvp(ours, (x,), (v,))[1], torch.func.jvp(plain, (x,), (v,))[1]),
        (torch.func.vmap(ours)(many), torch.func.vmap(plain)(many)),
        (torch.func.vmap(torch.func.grad(value(ours)))(many), torch.func.vmap(torch.func.grad(value(plain)))(many)),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with forward_ad.dual_level():
        tangents = [forward_ad.unpack_dual(layer(forward_ad.make_dual(x, v))).tangent for layer in (ours, plain)]
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-5, atol=1e-6)
