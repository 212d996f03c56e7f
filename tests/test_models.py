"""Every registered architecture builds and gives (B, num_classes) logits; normalization is the first layer."""

from __future__ import annotations

import pytest
import torch

from certkit.errors import CertkitError
from certkit.models import Normalize, create_model, list_models, model_spec

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
