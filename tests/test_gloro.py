"""GloRo nets: sound per-layer Lipschitz bounds, the ⊥ logit and its certificate, the objective, checkpoints
and the one-pass certifier.

Oracles: the exact operator norm (SVD of the Jacobian of a small layer, unrolled), gradient norms and PGD
attacks that try to beat a bound or a certificate, and closed-form cases (ties, constant layers).
"""

from __future__ import annotations

import json
import math
import re
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit import checkpoint
from certkit.cli import main
from certkit.data import ArrayDataset, DatasetInfo
from certkit.errors import CertkitError
from certkit.gloro.certify import certify_gloro_dataset, file_metrics
from certkit.gloro.layers import MinMax, Residual
from certkit.gloro.lipschitz import LAYER_RULES, build_bound, conv_fft_bound, layer_bound, lipschitz_upper_bound
from certkit.gloro.model import GloroNet, LogitError
from certkit.gloro.objective import Gloro
from certkit.methods import get_objective
from certkit.models import Normalize, create_model
from certkit.models.layers import FirstConv, Pool2x2, WideLinear
from certkit.results import floor_significant, read_results, summary_path
from certkit.train import TrainConfig, Trainer, recipe, train

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


def jacobian_norm(f: nn.Module, x: Tensor) -> float:
    """Spectral norm of the Jacobian of ``f`` at one input ``x`` (no batch dim), in float64."""
    x = x.double()
    jac = torch.autograd.functional.jacobian(lambda z: f(z[None]).flatten(), x, vectorize=True)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel()), ord=2))


def unrolled_operator_norm(f: nn.Module, shape: tuple[int, ...]) -> float:
    """Exact norm of an affine module on inputs of ``shape``: SVD of its matrix, unrolled on the basis."""
    n = math.prod(shape)
    with torch.no_grad():
        basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
        matrix = (f(basis) - f(torch.zeros(1, *shape, dtype=torch.float64))).reshape(n, -1)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def guaranteed(module: nn.Module, in_shape: tuple[int, ...]) -> float:
    return build_bound(module, in_shape).guaranteed()


def no_rounding(logits: Tensor) -> LogitError:
    """The rounding bound of logits taken as exact (written by hand, or the float32 certificate of old)."""
    return LogitError(torch.zeros_like(logits), torch.zeros(logits.shape[1], dtype=logits.dtype))


def tiny_gloro(seed: int = 0, epsilon: float = 0.3) -> GloroNet:
    """A small conv GloRo net on 1×8×8 inputs with 3 classes."""
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(1, 4, 3, 2, 1), MinMax(), nn.Flatten(), nn.Linear(4 * 4 * 4, 32), MinMax(), nn.Linear(32, 3)
    )
    return GloroNet(nn.Sequential(Normalize([0.0], [1.0]), body), (1, 8, 8), epsilon=epsilon)


def linear_gloro() -> GloroNet:
    """Normalize -> orthogonal 64x64 -> head: K_sub is exact (1, up to the safety factor)."""
    torch.manual_seed(3)
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Linear(64, 3))
    nn.init.orthogonal_(body[1].weight)
    return GloroNet(nn.Sequential(Normalize([0.0], [1.0]), body), (1, 8, 8), epsilon=0.0)


def blobs(n: int = 192, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Three classes of 1×8×8 images: a fixed random prototype per class plus small noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(99))
    y = torch.arange(n) % 3
    x = (protos[y] + 0.08 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained_tiny() -> GloroNet:
    """``tiny_gloro`` trained with the gloro objective for a few hundred steps (seconds)."""
    net = tiny_gloro()
    obj = Gloro(epsilon=0.3, eps_ramp=0.0, train_eps_factor=1.5, power_iterations=5)
    x, y = blobs()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(100):
        idx = torch.arange(step * 48, step * 48 + 48) % len(y)
        loss, _ = obj(net, x[idx], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


# --------------------------------------------------------------------------------------------------
# per-layer bounds against the exact operator norm
# --------------------------------------------------------------------------------------------------
def test_dense_bound_is_the_largest_singular_value() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(7, 5)
    exact = unrolled_operator_norm(lin.double(), (7,))
    assert guaranteed(lin, (7,)) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize(
    "c_in, c_out, k, stride, padding, size, dilation, groups",
    [
        (2, 3, 3, 1, 1, 6, 1, 1),
        (2, 3, 4, 2, 1, 7, 1, 1),  # strided, odd size: output_padding matters in the transpose
        (1, 2, 3, 2, 0, 8, 1, 1),
        (2, 4, 4, 1, "same", 6, 1, 1),  # asymmetric 'same' padding
        (2, 4, 3, 1, 2, 7, 2, 1),  # dilation
        (4, 4, 3, 2, 1, 9, 1, 2),  # groups
    ],
)
def test_conv_bound_matches_the_unrolled_operator(c_in, c_out, k, stride, padding, size, dilation, groups) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, dilation=dilation, groups=groups).double()
    shape = (c_in, size, size)
    exact = unrolled_operator_norm(conv, shape)
    bound = guaranteed(conv, shape)
    assert bound >= exact * (1 - 1e-9)
    assert bound <= exact * 1.10
    # the power-iteration pair (conv, transposed conv) is a true adjoint pair: <Av, u> = <v, Aᵀu>
    lb = layer_bound("c", conv, shape)
    v, u = torch.randn(1, *shape, dtype=torch.float64), torch.randn(1, *lb.out_shape, dtype=torch.float64)
    w = conv.weight.detach()
    assert (lb.apply(v, w) * u).sum().item() == pytest.approx((v * lb.adjoint(u, w)).sum().item(), rel=1e-9)


@pytest.mark.parametrize(
    "c_in, c_out, k, stride, padding, size", [(3, 5, 3, 1, 1, 12), (3, 5, 4, 2, 1, 16), (3, 6, 5, 3, 2, 17)]
)
def test_fft_bound_of_larger_convs_is_sound_and_tight(c_in, c_out, k, stride, padding, size) -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, bias=False).double()
    lb = layer_bound("c", conv, (c_in, size, size))
    exact = lb.exact_norm()
    fft = conv_fft_bound(lb.dense_kernel(), lb.stride, lb.padded)
    assert exact * (1 - 1e-9) <= fft <= exact * 1.10
    assert exact == pytest.approx(unrolled_operator_norm(conv, (c_in, size, size)), rel=1e-9)


def test_pooling_bounds() -> None:
    x = torch.rand(2, 6, 6)
    # disjoint average pooling: 1/p per side
    assert guaranteed(nn.AvgPool2d(2), (2, 6, 6)) == pytest.approx(0.5)
    assert jacobian_norm(nn.AvgPool2d(2), x) == pytest.approx(0.5)
    # overlapping average pooling: the fixed depthwise conv's exact norm
    pool = nn.AvgPool2d(3, stride=1, padding=1)
    exact = unrolled_operator_norm(pool, (2, 6, 6))
    assert exact * (1 - 1e-9) <= guaranteed(pool, (2, 6, 6)) <= exact * 1.10
    # max pooling: 1 only without overlap; 3x3 / stride 1 is 3, attained by a one-hot input
    assert guaranteed(nn.MaxPool2d(2), (2, 6, 6)) == 1.0
    mp = nn.MaxPool2d(3, stride=1)
    assert guaranteed(mp, (1, 7, 7)) == pytest.approx(3.0)
    bump = torch.zeros(1, 1, 7, 7)
    bump[0, 0, 3, 3] = 1.0
    assert torch.linalg.vector_norm(mp(bump) - mp(torch.zeros_like(bump))).item() == pytest.approx(3.0)
    assert guaranteed(nn.AdaptiveAvgPool2d(3), (2, 6, 6)) == pytest.approx(0.5)


def test_reshape_activation_normalize_and_residual_bounds() -> None:
    torch.manual_seed(3)
    x = torch.randn(6, 4, 4)
    assert guaranteed(nn.Flatten(), (6, 4, 4)) == 1.0 and jacobian_norm(nn.Flatten(), x) == pytest.approx(1.0)
    assert guaranteed(MinMax(), (6, 4, 4)) == 1.0 and jacobian_norm(MinMax(), x) == pytest.approx(1.0)
    assert MinMax()(torch.tensor([[3.0, -1.0, 1.0, 2.0]])).tolist() == [[1.0, -1.0, 3.0, 2.0]]
    assert guaranteed(Normalize([0.1, 0.2], [0.5, 0.25]), (2, 3, 3)) == pytest.approx(4.0)
    # x + Wx with W symmetric PSD: ‖I + W‖ = 1 + ‖W‖, so the 1 + L(g) rule is exact here
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    lin = nn.Linear(5, 5, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(q @ torch.diag(torch.tensor([0.7, 0.5, 0.3, 0.2, 0.0], dtype=torch.float64)) @ q.t())
    res = Residual(lin)
    assert guaranteed(res, (5,)) == pytest.approx(jacobian_norm(res, torch.randn(5)), rel=1e-9)
    assert guaranteed(res, (5,)) == pytest.approx(1.7, rel=1e-9)


def test_two_layer_network_bound_beats_every_sampled_gradient() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    bound = lipschitz_upper_bound(net, (6,))
    x = (3 * torch.randn(4000, 6)).requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x).sum(), x)
    biggest = grad.norm(dim=1).max().item()
    assert biggest <= bound
    assert biggest >= 0.25 * bound  # the search is not vacuous


def test_margin_gradients_stay_below_the_pairwise_constants(trained_tiny: GloroNet) -> None:
    net = trained_tiny
    kmat = net.margin_constants(net.certification_constant())
    x = torch.rand(64, 1, 8, 8, requires_grad=True)
    logits = net(x)
    for j in range(3):
        for i in range(3):
            if i != j:
                (g,) = torch.autograd.grad((logits[:, j] - logits[:, i]).sum(), x, retain_graph=True)
                assert g.flatten(1).norm(dim=1).max().item() <= kmat[j, i].item() * (1 + 1e-6)


def test_unknown_layers_are_refused() -> None:
    with pytest.raises(CertkitError, match="Sigmoid"):
        build_bound(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), (4,))

    class Custom(nn.Module):  # a custom forward could wire its children any way
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x) * 3

    with pytest.raises(CertkitError, match="Custom"):
        build_bound(nn.Sequential(Custom()), (4,))
    with pytest.raises(CertkitError, match="Dropout"):
        GloroNet(nn.Sequential(nn.Linear(4, 8), nn.Dropout(), nn.Linear(8, 3)), (4,), epsilon=0.1)


# --------------------------------------------------------------------------------------------------
# the certificate
# --------------------------------------------------------------------------------------------------
def test_tied_logits_never_certify() -> None:
    net = tiny_gloro()
    logits = torch.tensor([[2.0, 2.0, -5.0], [3.0, -1.0, 3.0], [4.0, 0.0, 0.0]])
    for eps in (0.0, 0.3):
        pred, radius, certified = net.certify_logits(logits, no_rounding(logits), eps, 1.0)
        assert pred.tolist() == [0, 0, 0]  # one index: the first maximum
        assert radius[:2].tolist() == [0.0, 0.0] and radius[2] > 0
        assert certified[:2].tolist() == [False, False]
        # only index j is masked: the tied class keeps ⊥ at or above y_j
        bottom = net.bottom_logit(logits, eps, 1.0)
        assert (bottom[:2] >= logits[:2, 0]).all()
    # identical head rows (K_ji ≈ 0) with equal biases: the classic infinite-radius bug must not appear
    with torch.no_grad():
        net.head.weight[1] = net.head.weight[0]
        net.head.bias[1] = net.head.bias[0]
        net.head.bias[0] += 100.0
        net.head.bias[1] += 100.0
    net.eval()
    pred, radius, _ = net.certify(torch.rand(32, 1, 8, 8))
    assert (pred == -1).all() and (radius < 1e-3).all()


def test_certified_points_survive_pgd_inside_their_radius(trained_tiny: GloroNet) -> None:
    net = trained_tiny
    x, _ = blobs(60, seed=5)
    pred, radius, j = net.certify(x)
    ok = pred >= 0
    assert ok.sum() >= 20, "the tiny model should certify most blobs at 0.3"
    xs, js, rs = x[ok], j[ok], radius[ok].float()  # float64 radii; 0.999 r below leaves room for the cast
    # inside the radius: no flip; at 4x the radius the same attack flips some (so the attack is real)
    assert pgd_flips(net, xs, js, 0.999 * rs).sum() == 0
    assert pgd_flips(net, xs, js, 4.0 * rs).sum() > 0


@pytest.mark.parametrize("margin", [1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
def test_no_point_flips_inside_its_radius_at_tiny_margins(margin: float) -> None:
    """The nearest class's bias is set so the margin at x is ``margin``; then x is moved 0.999 of its radius
    along the margin's exact (float64) gradient for every class, and along random directions. The net is
    linear with an orthogonal body, so its bound is tight and the gradient direction is the worst case."""
    net = linear_gloro().eval()
    k = net.certification_constant()
    reference = linear_gloro().double().eval()  # float64 twin for the gradients
    x_all, _ = blobs(12, seed=9)
    original = net.head.bias.detach().clone()
    float32_flips = 0
    for x in x_all.double():
        with torch.no_grad():
            y = net.exact_logits(x[None])[0]
            j = int(y.argmax())
            kj = net.margin_constants(k).double()[j]
            ratio = torch.where(torch.arange(3) == j, torch.tensor(float("inf"), dtype=torch.float64), (y[j] - y) / kj)
            i = int(ratio.argmin())
            for model in (net, reference):
                model.head.bias[i] += float(y[j] - y[i]) - margin
            y = net.exact_logits(x[None])[0]
        assert float(y[j] - y[i]) == pytest.approx(margin, rel=0.2)  # float32 biases: not exactly margin
        pred, radius, clean = net.certify(x[None], epsilon=0.0)
        assert pred.item() == j == clean.item() and 0 < radius.item() <= float(y[j] - y[i]) / float(kj[i])
        directions = torch.randn(8, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(j))
        for c in range(3):
            if c != j:
                xg = x[None].clone().requires_grad_(True)
                out = reference(xg)[0]
                (grad,) = torch.autograd.grad(out[j] - out[c], xg)
                directions = torch.cat([directions, -grad])
        unit = directions / directions.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        moved = x[None] + 0.999 * radius.item() * unit
        assert (net.certify(moved, epsilon=0.0)[2] == j).all()
        # power: the radius of the float32 logits (the old certificate) overstates some of these
        with torch.no_grad():
            logits32 = net(x[None].float()).double()
            radius32 = net.certify_logits(logits32, no_rounding(logits32), 0.0, k)[1].item()
        float32_flips += int((net.certify(x[None] + 0.999 * radius32 * unit, epsilon=0.0)[2] != j).sum())
        net.head.bias.data, reference.head.bias.data = original.clone(), original.clone().double()
    if margin <= 1e-5:  # 5 and 8 of 120 moved points at 1e-5 and 1e-6
        assert float32_flips > 0


def test_a_constant_that_no_longer_matches_the_weights_is_refused() -> None:
    net = tiny_gloro().eval()
    x, _ = blobs(8)
    net.certify(x)
    with torch.no_grad():
        for p in net[1][0].parameters():
            p.mul_(3.0)  # the bound triples; the frozen constant does not
    with pytest.raises(CertkitError, match="below the guaranteed bound"):
        net.certify(x)
    with pytest.raises(CertkitError, match="below the guaranteed bound"):
        net.certified_radius(x)
    net.freeze()
    assert net.certified_radius(x).shape == (8,)
    with torch.no_grad():
        net.head.bias.add_(1.0)  # the head's bias is not in K_sub: verified again and kept
    assert net.certify(x)[1].shape == (8,)


def pgd_flips(net: nn.Module, x: Tensor, j: Tensor, rho: Tensor, restarts: int = 16, steps: int = 30) -> Tensor:
    """L2 PGD on the best wrong logit's margin inside balls of radii ``rho``; True where argmax changed."""
    g = torch.Generator().manual_seed(0)
    xr, jr = x.repeat(restarts, 1, 1, 1), j.repeat(restarts)
    rr = rho.repeat(restarts).view(-1, 1, 1, 1)
    delta = torch.randn(xr.shape, generator=g)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * rr * torch.rand(len(xr), 1, 1, 1, generator=g)
    flipped = torch.zeros(len(xr), dtype=torch.bool)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = net(xr + delta)
        flipped |= logits.argmax(1) != jr
        own = logits.gather(1, jr[:, None])[:, 0]
        other = logits.scatter(1, jr[:, None], float("-inf")).max(1).values
        (grad,) = torch.autograd.grad((other - own).sum(), delta)
        with torch.no_grad():
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta + 0.25 * rr * step
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(rr / norm.clamp_min(1e-12), max=1.0)
    with torch.no_grad():
        flipped |= net(xr + delta).argmax(1) != jr
    return flipped.view(restarts, -1).any(0)


# --------------------------------------------------------------------------------------------------
# what the bound does not describe is refused
# --------------------------------------------------------------------------------------------------
def pooled_gloro() -> GloroNet:
    """1×8×8 → global average pool → 2 classes: the pool's bound, 1/8, holds for 8×8 inputs only."""
    body = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        body[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        body[2].bias.zero_()
    return GloroNet(body, (1, 8, 8), epsilon=0.0).eval()


def test_inputs_of_another_shape_are_refused(tmp_path: Path) -> None:
    net = pooled_gloro()
    small = torch.full((1, 1, 2, 2), 0.5)  # the pool's constant there is 1/2: the radius would be 4x too large
    for call in (net.certify, net.predict_with_bottom, net.certified_radius):
        with pytest.raises(CertkitError, match=r"shape \(1, 8, 8\); got \(1, 2, 2\)"):
            call(small)
    info = DatasetInfo("small", 2, (1, 2, 2), (0.0,), (1.0,), "mnist")
    data = ArrayDataset(info, torch.full((3, 1, 2, 2), 128, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(CertkitError, match=r"shape \(1, 2, 2\); this GloRo net's bound is for \(1, 8, 8\)"):
        certify_gloro_dataset(net, data, out=tmp_path / "r.tsv", progress=False)
    assert list(tmp_path.iterdir()) == []  # refused before any file
    assert net.certified_radius(torch.full((1, 1, 8, 8), 0.5)).item() > 0  # its own shape certifies


class Doubling(nn.Sequential):
    """A residual block written as a Sequential subclass: ``x + layers(x)``, Lipschitz 2, not 1."""

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class Scaled(Residual):
    """``10x + g(x)``: Lipschitz 10 + L(g), not the 1 + L(g) of a Residual."""

    def forward(self, x: Tensor) -> Tensor:
        return 10 * x + self.inner(x)


class LoudReLU(nn.ReLU):
    def forward(self, x: Tensor) -> Tensor:
        return 10 * super().forward(x)


class Head(nn.Linear):
    """Redefines nothing, and is refused all the same: a subclass could redefine a helper of forward."""


class LoudLeakyReLU(nn.LeakyReLU):
    def forward(self, x: Tensor) -> Tensor:
        return 1000 * super().forward(x)


@pytest.mark.parametrize(
    "layer, head, message",
    [
        (Doubling(nn.Linear(4, 4)), nn.Linear(4, 2), "Doubling redefines forward of Sequential"),
        (Scaled(nn.Linear(4, 4)), nn.Linear(4, 2), "Scaled redefines forward of Residual"),
        (LoudReLU(), nn.Linear(4, 2), "'1' is a LoudReLU, a subclass of ReLU"),
        (nn.ReLU(), Head(4, 2), "'2' is a Head, a subclass of Linear"),
    ],
)
def test_subclasses_that_may_compute_another_function_are_refused(
    layer: nn.Module, head: nn.Linear, message: str
) -> None:
    with pytest.raises(CertkitError, match=message):
        GloroNet(nn.Sequential(nn.Linear(4, 4), layer, head), (4,), epsilon=0.1)


def test_hooks_and_replaced_layers_are_refused() -> None:
    x, _ = blobs(4)
    hooked = nn.Linear(64, 16)
    hooked.register_forward_hook(lambda m, args, out: 7 * out)
    model = nn.Sequential(Normalize([0.0], [1.0]), nn.Sequential(nn.Flatten(), hooked, nn.Linear(16, 3)))
    with pytest.raises(CertkitError, match=r"'1.1' \(Linear\) has a forward hook or pre-hook"):
        GloroNet(model, (1, 8, 8), 0.1)
    net = tiny_gloro().eval()
    net.certify(x)
    conv = net[1][0]
    # added after the bound was built: refused when the constant is checked, at every certification
    for register in (conv.register_forward_hook, conv.register_forward_pre_hook):
        handle = register(lambda *a: None)
        with pytest.raises(CertkitError, match=r"'1.0' \(Conv2d\) has a forward hook or pre-hook"):
            net.certify(x)
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        with pytest.raises(CertkitError, match="a global forward hook is registered"):
            net.certify(x)
        with pytest.raises(CertkitError, match="a global forward hook is registered"):
            tiny_gloro()
    finally:
        handle.remove()
    conv.forward = lambda t: 10 * nn.Conv2d.forward(conv, t)
    with pytest.raises(CertkitError, match="has forward set on the instance"):
        net.certify(x)
    del conv.forward
    assert net.certify(x)[1].shape == (4,)
    net[1][1] = nn.ReLU()  # another module where the analysed MinMax was
    with pytest.raises(CertkitError, match="layers changed after its Lipschitz bound was built"):
        net.certify(x)


def test_every_kind_with_a_rule_refuses_its_subclasses() -> None:
    for kind in LAYER_RULES:
        sub = type(f"My{kind.__name__}", (kind,), {})  # redefines nothing, and may not be bounded as its base
        with pytest.raises(CertkitError, match=f"'x' is a {sub.__name__}, a subclass of {kind.__name__}"):
            layer_bound("x", sub.__new__(sub), (4,))


def test_a_swapped_class_or_a_changed_setting_after_the_build_is_refused() -> None:
    """The bound read every layer's class and settings once, when it was built: a LeakyReLU given the class of a
    subclass that multiplies by 1000 certified radii near 207 at the old constant, and so did a slope of 50."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.5), nn.AvgPool2d(2), nn.Flatten())
    net = GloroNet(nn.Sequential(Normalize([0.0], [1.0]), body, nn.Linear(16, 3)), (1, 4, 4), epsilon=0.1).eval()
    x = torch.rand(2, 1, 4, 4)
    radius = net.certified_radius(x)
    relu, pool = net[1][1], net[1][2]
    relu.__class__ = LoudLeakyReLU
    with pytest.raises(CertkitError, match=r"'1\.1' is a LoudLeakyReLU now but was a LeakyReLU"):
        net.certify(x)
    relu.__class__ = nn.LeakyReLU
    changes = [(relu, "negative_slope", 50.0), (pool, "kernel_size", 1), (pool, "divisor_override", 1)]
    for layer, setting, value in changes:
        before = getattr(layer, setting)
        setattr(layer, setting, value)
        with pytest.raises(CertkitError, match=re.escape(f"has {setting}={value!r} now but had {setting}={before!r}")):
            net.certify(x)
        setattr(layer, setting, before)
    assert torch.equal(net.certified_radius(x), radius)
    # Normalize's std is a buffer, which the bound reads again when its version counter moves
    with torch.no_grad():
        net[0].std.mul_(0.5)
    with pytest.raises(CertkitError, match="below the guaranteed bound"):
        net.certify(x)


def test_a_residual_whose_inner_output_broadcasts_is_refused() -> None:
    """``x + g(x)`` with ``g`` channel 0 of 4 adds ``x_0`` to every channel: a step along channel 0 moves the sum
    by sqrt(7), where 1 + L(g) says 2."""
    inner = nn.Conv2d(4, 1, 1, bias=False)
    with torch.no_grad():
        inner.weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1))
    step = torch.zeros(1, 4, 2, 2)
    step[0, 0, 0, 0] = 1.0
    assert Residual(inner)(step).norm().item() == pytest.approx(math.sqrt(7))
    body = nn.Sequential(Residual(inner), nn.Flatten(), nn.Linear(16, 2))
    message = r"'0': the Residual's inner output has shape \(1, 2, 2\) but its input \(4, 2, 2\)"
    with pytest.raises(CertkitError, match=message):
        GloroNet(body, (4, 2, 2), epsilon=0.1)


def test_the_float64_pass_runs_without_cudnn() -> None:
    """cuDNN may choose an FFT or Winograd convolution, whose rounding the per-layer bounds do not cover."""
    net = tiny_gloro().eval()
    enabled = torch.backends.cudnn.enabled
    seen: list[bool] = []
    handle = net[1][0].register_forward_pre_hook(lambda m, args: seen.append(torch.backends.cudnn.enabled))
    try:
        net.exact_logits(torch.rand(2, 1, 8, 8))
    finally:
        handle.remove()
    assert seen == [False] and torch.backends.cudnn.enabled == enabled


def test_plain_subclasses_fast_paths_and_hooks_on_the_net_itself_are_allowed() -> None:
    class Body(nn.Sequential):  # only a constructor: Sequential's own forward
        def __init__(self) -> None:
            super().__init__(nn.Flatten(), nn.Linear(64, 16), MinMax(), nn.Linear(16, 3))

    torch.manual_seed(0)
    net = GloroNet(nn.Sequential(Normalize([0.0], [1.0]), Body()), (1, 8, 8), epsilon=0.1).eval()
    x, _ = blobs(8)
    before = net.certify(x)
    outputs: list[Tensor] = []
    handle = net.register_forward_hook(lambda m, args, out: outputs.append(out))  # as the trainer's pass counter
    try:
        after = net.certify(x)
    finally:
        handle.remove()
    # certification runs the net's layers, not the net's own call: its hooks neither run nor matter
    assert outputs == [] and all(torch.equal(a, b) for a, b in zip(before, after))
    # certkit's fast paths compute the function of their torch layer
    layer_bound("c", FirstConv(1, 2, 3), (1, 6, 6))
    layer_bound("p", Pool2x2(), (2, 6, 6))
    layer_bound("w", WideLinear(4, 2), (4,))


def test_a_negative_or_non_finite_epsilon_is_refused() -> None:
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    net = GloroNet(nn.Sequential(nn.Identity(), head), (2,), epsilon=0.3).eval()
    tied = torch.tensor([[0.5, 0.5]])  # with epsilon < 0 these certified
    assert net.predict_with_bottom(tied).tolist() == [-1]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(CertkitError, match="epsilon must be a finite number >= 0"):
            net.predict_with_bottom(tied, epsilon=eps)
        with pytest.raises(CertkitError, match="epsilon must be a finite number >= 0"):
            net.certify_logits(tied, no_rounding(tied), eps, 1.0)
        with pytest.raises(CertkitError, match="epsilon must be a finite number >= 0"):
            GloroNet(nn.Sequential(nn.Identity(), nn.Linear(2, 2)), (2,), epsilon=eps)
        net.load_state_dict({**state, "epsilon": torch.tensor(eps, dtype=torch.float64)})  # a loaded buffer
        with pytest.raises(CertkitError, match="epsilon must be a finite number >= 0"):
            net.predict_with_bottom(tied)
    net.load_state_dict(state)
    assert net.predict_with_bottom(tied).tolist() == [-1]


def test_certify_logits_uses_the_guaranteed_constant_in_training_mode() -> None:
    torch.manual_seed(0)
    net = GloroNet(nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Linear(16, 3)), (1, 4, 4), epsilon=0.1)
    logits = net.exact_logits(torch.rand(4, 1, 4, 4))
    net.train()
    iterates = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("lip_iterate_")}
    assert net.lipschitz_constant(0).item() < net.bound.guaranteed()  # the training estimate is below the bound
    radius_training = net.certify_logits(logits, no_rounding(logits))[1]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in iterates.items())  # and it was not advanced
    net.eval()
    assert torch.equal(radius_training, net.certify_logits(logits, no_rounding(logits))[1])


def test_per_epoch_vra_is_the_certified_classifiers() -> None:
    """Gloro.evaluate decides as certify() does, from float64 logits. Here a hidden offset of 1e12, which the
    head cancels, swallows the input in float32 (every logit ties) but not in float64."""
    hidden, head = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        hidden.weight.copy_(torch.eye(2))
        hidden.bias.fill_(1e12)
        head.weight.copy_(torch.eye(2))
        head.bias.fill_(-1e12)
    net = GloroNet(nn.Sequential(hidden, head), (2,), epsilon=0.01).eval()
    x, y = torch.tensor([[0.0, 0.5], [0.5, 0.0]]), torch.tensor([1, 0])
    assert (net(x) == 0).all()
    pred, _, clean = net.certify(x)
    assert clean.tolist() == [1, 0] and pred.tolist() == [1, 0]
    m = Gloro(epsilon=0.01).evaluate(net, x, y)
    assert (m["clean_acc"].item(), m["vra"].item(), m["rejection"].item()) == (2, 2, 0)


def test_frozen_bound_is_guaranteed_and_discarded_by_training() -> None:
    net = tiny_gloro().eval()
    info = net.freeze()
    assert info["lipschitz_bound"] >= info["lipschitz_guaranteed"] >= info["lipschitz_estimate"]
    assert net.is_frozen and float(net.lipschitz_frozen) == info["lipschitz_bound"]
    net.train()
    assert not net.is_frozen


def test_floor_significant_never_rounds_up() -> None:
    for v in (0.49999, 0.123456, 1.0, 2.0000001, 1234.56):
        f = floor_significant(v)
        assert f <= v and v - f < 1e-5 * v
    assert floor_significant(0.0) == 0.0 and floor_significant(float("nan")) == 0.0


def test_file_metrics_reads_the_older_layout(tmp_path: Path) -> None:
    """Files written before certified_eps: predict -1 and radius 0 below epsilon, the prediction in clean_predict."""
    path = tmp_path / "old.tsv"
    rows = [(0, 1, 1, 0.6, 1, 1), (1, 2, -1, 0.0, 0, 2), (2, 3, -1, 0.0, 0, 4), (3, 0, 5, 0.7, 0, 5)]
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime\tclean_predict"]
    lines += [f"{i}\t{label}\t{p}\t{r}\t{c}\t0:00:00.000100\t{clean}" for i, label, p, r, c, clean in rows]
    path.write_text("\n".join(lines) + "\n")
    # clean: rows 0 and 1 right; certified (predict not -1): rows 0 and 3; certified and right: row 0
    assert file_metrics(path) == {"N": 4, "clean_accuracy": 0.5, "vra": 0.25, "rejection_rate": 0.5}
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:00.000100\n")
    with pytest.raises(CertkitError, match="not a GloRo result file"):
        file_metrics(path)


# --------------------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------------------
def test_objective_needs_a_gloro_net_and_ignores_sigma() -> None:
    x, y = blobs(16)
    plain = create_model("gloro-2c2f", 3, (1, 8, 8))
    with pytest.raises(CertkitError, match="GloroNet"):
        Gloro(epsilon=0.3)(plain, x, y)
    losses = []
    for sigma in (0.12, 1.0):
        obj = get_objective("gloro").from_config(sigma, "mnist", {"epsilon": 0.3})
        assert obj.sigma is None and obj.config()["sigma"] is None
        net = tiny_gloro().train()
        losses.append(obj(net, x, y)[0].item())
    assert losses[0] == losses[1]


def test_defaults_and_recipe_are_the_published_ones() -> None:
    d = Gloro.defaults("mnist", 0.25)
    assert d["epsilon"] == 0.3 and d["train_eps_factor"] == 1.5 and d["power_iterations"] == 10
    assert Gloro.defaults("cifar10", 0.25)["epsilon"] == pytest.approx(36 / 255)
    r = recipe("mnist", "gloro")
    assert (r["optimizer"], r["lr"], r["schedule"], r["lr_final"], r["weight_decay"]) == (
        "adam",
        1e-3,
        "exp",
        1e-6,
        0.0,
    )


def test_training_epsilon_ramps_above_the_evaluation_epsilon() -> None:
    obj = Gloro(epsilon=0.4, train_eps_factor=1.5, eps_ramp=0.5)
    values = []
    for epoch in range(10):
        obj.start_epoch(epoch, 10)
        values.append(obj.train_epsilon())
    assert all(a < b for a, b in pairwise(values[:5]))  # increasing over the first half
    assert values[4:] == [pytest.approx(0.6)] * 6
    assert values[0] > 0.4 * 0.01
    t = 0.2  # after epoch 1 of 10, 20% of the ramp: the library's log-concave form
    assert values[0] == pytest.approx(0.4 * math.log(math.exp(0.01) + (math.exp(1.5) - math.exp(0.01)) * t))
    flat = Gloro(epsilon=0.4, eps_ramp=0.0, train_eps_factor=1.2)
    flat.start_epoch(0, 10)
    assert flat.train_epsilon() == pytest.approx(0.48)


def test_losses_are_gloro_ce_and_trades() -> None:
    x, y = blobs(16)
    net = tiny_gloro().train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ce_obj = Gloro(epsilon=0.3, eps_ramp=0.0, train_eps_factor=1.0, power_iterations=3)
    loss, parts = ce_obj(net, x, y)
    net.load_state_dict(state)  # same iterates for the reference computation
    logits = net(x)
    k = net.lipschitz_constant(3)
    bottom = net.bottom_logit(logits, 0.3, k)
    assert loss.item() == pytest.approx(F.cross_entropy(torch.cat([logits, bottom[:, None]], 1), y).item(), rel=1e-5)
    net.load_state_dict(state)
    trades, parts = Gloro(epsilon=0.3, eps_ramp=0.0, train_eps_factor=1.0, power_iterations=3, lbd=2.0)(net, x, y)
    p = torch.cat([F.softmax(logits, 1), torch.zeros(len(y), 1)], 1)
    q = F.log_softmax(torch.cat([logits, bottom[:, None]], 1), 1)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - q)).sum(1).mean()
    assert trades.item() == pytest.approx((F.cross_entropy(logits, y) + 2.0 * kl).item(), rel=1e-4)
    assert set(parts) >= {"ce", "robust", "vra", "acc", "lipschitz", "train_eps"}


def test_power_iteration_is_warm_started_and_converges_from_below() -> None:
    net = tiny_gloro().train()
    obj = Gloro(epsilon=0.3, power_iterations=5)
    x, y = blobs(8)
    keys = [k for k in net.state_dict() if k.startswith("lip_iterate_")]
    assert keys
    before = {k: net.state_dict()[k].clone() for k in keys}
    estimates = []
    for _ in range(60):
        estimates.append(obj(net, x, y)[1]["lipschitz"].item())
    assert any(not torch.equal(before[k], net.state_dict()[k]) for k in keys)  # iterates persist as buffers
    bound = net.bound.guaranteed()
    assert estimates[-1] <= bound * (1 + 1e-5)
    assert estimates[-1] >= 0.98 * bound


def test_resumed_training_is_exact_and_saving_does_not_perturb_it(tmp_path: Path) -> None:
    """Iterates travel in the checkpoint; freezing for the checkpoint leaves the training iterates alone."""
    info = DatasetInfo("blobs", 3, (1, 8, 8), (0.0,), (1.0,), "mnist")
    x, y = blobs(96)
    data = ArrayDataset(info, (x * 255).round().to(torch.uint8), y)
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=1e-2, schedule="constant", weight_decay=0.0)

    def trainer(out: Path | None) -> Trainer:
        obj = Gloro(epsilon=0.3, power_iterations=2)
        meta = {"arch": "tiny", "num_classes": 3, "in_shape": [1, 8, 8], "normalization": {"mean": [0.0], "std": [1.0]}}
        return Trainer(
            tiny_gloro(), obj, data, None, cfg, out_dir=out, meta=meta, device="cpu", progress=False, log=lambda m: None
        )

    full = trainer(None)  # never saves, so never freezes
    full.fit()
    part = trainer(tmp_path / "run")
    for epoch in range(2):
        part.history.append(part.train_epoch(epoch))
        part.save(epoch)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["gloro"]["lipschitz_bound"] > 0
    resumed = trainer(tmp_path / "run")
    assert resumed.resume()
    resumed.fit()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        if k != "lipschitz_frozen":  # the saving run's model ends frozen
            assert torch.equal(a, b), k


def test_evaluate_reports_sums(trained_tiny: GloroNet) -> None:
    x, y = blobs(30, seed=7)
    m = Gloro(epsilon=0.3).evaluate(trained_tiny, x, y)
    assert set(m) == {"clean_acc", "vra", "rejection"}
    assert 0 <= m["vra"] <= m["clean_acc"] <= 30 and m["vra"] + m["rejection"] <= 30
    assert m["vra"] >= 10  # sums, not means


# --------------------------------------------------------------------------------------------------
# checkpoints and the certifier, on real Fashion-MNIST
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    run = tmp_path_factory.mktemp("gloro") / "run"
    code = main(
        [
            "train",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(fmnist_root),
            "--arch",
            "gloro-2c2f",
            "--method",
            "gloro",
            "--epsilon",
            "0.5",
            "--train-subset",
            "512",
            "--test-subset",
            "0",
            "--epochs",
            "1",
            "--lr-final",
            "1e-3",
            "--device",
            "cpu",
            "--out",
            str(run),
        ]
    )
    assert code == 0
    return run


@pytest.mark.slow  # trains on the real dataset
def test_checkpoint_keeps_certificates_identical(tmp_path: Path, fmnist_root: Path) -> None:
    trainer = train(
        "fashion-mnist",
        "gloro-2c2f",
        "gloro",
        hparams={"epsilon": 0.5},
        data_dir=str(fmnist_root),
        out=tmp_path / "run",
        train_subset=256,
        test_subset=100,
        epochs=1,
        device="cpu",
        progress=False,
    )
    record = trainer.history[-1]
    assert 0 <= record["test_vra"] <= record["test_clean_acc"] and "test_rejection" in record
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["method"] == "gloro" and meta["sigma"] is None
    assert meta["gloro"]["epsilon"] == 0.5 and meta["gloro"]["lipschitz_bound"] >= meta["gloro"]["lipschitz_guaranteed"]
    loaded = checkpoint.load(tmp_path / "run")
    assert isinstance(loaded, GloroNet) and loaded.is_frozen
    assert float(loaded.lipschitz_frozen) == meta["gloro"]["lipschitz_bound"]
    original = trainer.model.eval()
    x = torch.stack([trainer.test_data[i][0] for i in range(100)])
    for a, b in zip(original.certify(x), loaded.certify(x)):
        assert torch.equal(a, b)
    # the wrapper is rebuilt through the key model.json declares; files written before the key still load
    assert meta["wrapper"] == "gloro"
    del meta["wrapper"]
    (tmp_path / "run" / "model.json").write_text(json.dumps(meta))
    legacy = checkpoint.load(tmp_path / "run")
    assert isinstance(legacy, GloroNet) and float(legacy.lipschitz_frozen) == meta["gloro"]["lipschitz_bound"]


@pytest.mark.slow  # trains on the real dataset (cli_run)
def test_cli_train_then_certify_writes_a_result_file(cli_run: Path, fmnist_root: Path, capsys) -> None:
    out = cli_run.parent / "gloro.tsv"
    args = [
        "certify",
        str(cli_run),
        "--data-dir",
        str(fmnist_root),
        "--max",
        "300",
        "--batch",
        "128",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "clean accuracy" in printed and "VRA" in printed and "rejection rate" in printed
    res = read_results(out)
    assert res.idx.tolist() == list(range(300))
    # every row keeps its prediction and true margin radius; the decision at ε = 0.5 is its own column
    assert (res.predict >= 0).all() and res.certified_eps is not None
    assert (res.radius[res.certified_eps == 1] >= 0.499).all()  # radius floored to 3 digits
    assert (res.radius[res.certified_eps == 0] <= 0.5).all() and (res.radius[res.certified_eps == 0] > 0).any()
    assert (res.correct == (res.predict == res.label)).all()
    summary = json.loads(summary_path(out).read_text())
    g = summary["gloro"]
    assert g["N"] == 300 and g["clean_accuracy"] == pytest.approx(res.correct.mean())
    assert g["vra"] == pytest.approx((res.correct & res.certified_eps).mean()) and g["vra"] < g["clean_accuracy"]
    assert g["rejection_rate"] == pytest.approx((res.certified_eps == 0).mean())
    # so the curve read off the file starts at clean accuracy, not at VRA
    assert summary["certified_accuracy"]["0"] == pytest.approx(g["clean_accuracy"])
    # the rows are the model's own certificates
    model = checkpoint.load(cli_run)
    from certkit.data import load_dataset

    data = load_dataset("fashion-mnist", "test", str(fmnist_root))
    x = torch.stack([data[i][0] for i in range(300)])
    pred, _, clean = model.certify(x)
    assert clean.tolist() == res.predict.tolist() and ((pred != -1) == (res.certified_eps == 1)).all()
    # resuming adds nothing, also with the certifier named; another epsilon is refused (settings differ)
    before = out.read_text()
    assert main(args) == 0 and out.read_text() == before
    assert main([*args, "--method", "gloro"]) == 0 and out.read_text() == before
    # shards merge into the same rows, the decision at epsilon included
    shards = [str(cli_run.parent / f"shard{i}.tsv") for i in range(2)]
    for i, shard in enumerate(shards):
        assert main([*args, "--shard", f"{i}/2", "--out", shard]) == 0
    merged = cli_run.parent / "merged.tsv"
    assert main(["merge", *shards, "--out", str(merged)]) == 0
    joined = read_results(merged)
    assert joined.idx.tolist() == res.idx.tolist() and joined.certified_eps is not None
    assert (joined.certified_eps == res.certified_eps).all() and (joined.radius == res.radius).all()
    assert main([*args, "--epsilon", "0.3"]) == 2
    assert main([*args, "--epsilon", "0.3", "--overwrite"]) == 0 and read_results(out).settings["epsilon"] == 0.3
    # sampling options of randomized smoothing are refused, not silently ignored
    capsys.readouterr()
    assert main([*args, "--shared-noise", "4"]) == 2
    assert "--shared-noise applies to randomized smoothing" in capsys.readouterr().err
    assert main([*args, "--rng", "philox"]) == 2
    assert "--rng applies to randomized smoothing" in capsys.readouterr().err
    # --batch auto sizes smoothing's noisy batches; PREDICT is smoothing's test: both refused for GloRo
    assert main([*args, "--batch", "auto"]) == 2
    assert "give a GloRo net --batch N images" in capsys.readouterr().err
    predict = ["predict", str(cli_run), "--data-dir", str(fmnist_root), "--max", "4", "--out", str(out) + ".p"]
    assert main(predict) == 2
    assert "certifies deterministically: use `certkit certify`" in capsys.readouterr().err


@pytest.mark.slow  # trains on the real dataset (cli_run)
def test_a_tampered_frozen_bound_is_refused(cli_run: Path, fmnist_root: Path, tmp_path: Path) -> None:
    model = checkpoint.load(cli_run)
    with torch.no_grad():
        model.lipschitz_frozen.mul_(0.5)

    class Few:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[Tensor, int]:
            return torch.rand(1, 28, 28), 0

    with pytest.raises(CertkitError, match="below the guaranteed bound"):
        certify_gloro_dataset(model, Few(), out=tmp_path / "t.tsv", progress=False)
