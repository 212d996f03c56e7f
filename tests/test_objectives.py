"""Defining properties of the noise-based training objectives (SmoothAdv, MACER, SmoothMix, Consistency,
Stability), checked on tiny models and tensors, plus a short real Fashion-MNIST run per method."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.gloro.layers import MinMax
from certkit.gloro.model import GloroNet
from certkit.gloro.objective import Gloro
from certkit.methods import get_objective, registry
from certkit.models import Normalize
from certkit.objectives import Objective
from certkit.objectives._smoothing import (
    DivergenceError,
    draw_noises,
    l2_norms,
    noisy_logits,
    smoothed_nll,
)
from certkit.objectives.consistency import Consistency
from certkit.objectives.crt import CRT
from certkit.objectives.macer import Macer
from certkit.objectives.smoothadv import SmoothAdv
from certkit.objectives.smoothmix import SmoothMix
from certkit.objectives.stability import Stability

MINE = ["smoothadv", "macer", "smoothmix", "consistency", "stability"]
SHAPE = (1, 6, 6)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


# --------------------------------------------------------------------------------------------------
# tiny models and data
# --------------------------------------------------------------------------------------------------
def mlp(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), nn.ReLU(), nn.Linear(16, num_classes))


class ConstantLogits(nn.Module):
    """Ignores its input: every noisy copy gets the same logits (a learnable bias)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(logits))

    def forward(self, x: Tensor) -> Tensor:
        return self.bias.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class Recorder(nn.Module):
    """Wraps a model and records (training, params require grad) at every forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append((self.training, all(p.requires_grad for p in self.inner.parameters())))
        return self.inner(x)


def batch(n: int = 8, num_classes: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    x[0].fill_(1.0)  # a saturated image: clipping into [0, 1] matters for it
    return x, torch.randint(0, num_classes, (n,), generator=g)


def separable(n: int = 64, seed: int = 2) -> tuple[Tensor, Tensor]:
    """Two classes, dark and bright images: learnable through noise of sigma 0.25."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (0.3 + 0.4 * y.float()).view(-1, 1, 1, 1) + 0.1 * torch.rand(n, *SHAPE, generator=g)
    return x.clamp(0, 1), y


def small(name: str, sigma: float = 0.25, **extra: object) -> Objective:
    """Each method with cheap settings for unit tests (``extra`` overrides them)."""
    cheap = {
        "smoothadv": dict(epsilon=0.5, num_steps=3, num_noise_vec=2, warmup=1),
        "macer": dict(gauss_num=4, deferred_epochs=0, lbd=1.0),
        "smoothmix": dict(num_noise_vec=2, num_steps=3, step_size=0.5, mix_step=1, warmup=1),
        "consistency": dict(num_noise_vec=2),
        "stability": dict(),
    }[name]
    return get_objective(name).from_config(sigma, "mnist", {**cheap, **extra})


# --------------------------------------------------------------------------------------------------
# registry, hyperparameters, defaults
# --------------------------------------------------------------------------------------------------
def test_registered_and_shared_names_agree() -> None:
    reg = registry()
    for name in MINE:
        assert name in reg
    seen: dict[str, object] = {}
    for cls in reg.values():
        for key, spec in cls.Params.field_specs().items():
            # one CLI flag serves every method that uses a name: same type everywhere
            assert seen.setdefault(key, (spec["kind"], spec["optional"])) == (spec["kind"], spec["optional"]), key


@pytest.mark.parametrize(
    "name, family, sigma, expected",
    [
        ("smoothadv", "mnist", 0.5, dict(epsilon=255 / 256, num_steps=10, num_noise_vec=4, warmup=10)),
        ("smoothadv", "cifar10", 0.5, dict(epsilon=1.0, num_noise_vec=8)),
        ("smoothadv", "cifar10", 1.0, dict(epsilon=2.0, num_noise_vec=2)),
        ("smoothadv", "imagenet", 0.25, dict(epsilon=1.0, num_noise_vec=4)),
        ("macer", "mnist", 0.25, dict(gauss_num=16, beta=16.0, gamma=8.0, lbd=16.0, deferred_epochs=31)),
        ("macer", "fashion-mnist", 1.0, dict(lbd=6.0, deferred_epochs=31)),
        ("macer", "cifar10", 0.25, dict(lbd=12.0, deferred_epochs=0)),
        ("macer", "cifar10", 0.5, dict(lbd=6.0, deferred_epochs=0)),
        ("macer", "cifar10", 1.0, dict(lbd=12.0, deferred_epochs=51)),
        ("smoothmix", "mnist", 0.25, dict(num_noise_vec=4, step_size=1.0, num_steps=2, eta=5.0, mix_step=1)),
        ("smoothmix", "mnist", 0.5, dict(num_steps=4, eta=5.0, mix_step=0, warmup=10, maxnorm=None)),
        ("smoothmix", "mnist", 1.0, dict(num_steps=8, mix_step=1, maxnorm_s=None)),
        ("smoothmix", "cifar10", 0.25, dict(num_noise_vec=2, step_size=0.5, num_steps=4, mix_step=0)),
        ("smoothmix", "cifar10", 1.0, dict(step_size=2.0, mix_step=1)),
        ("consistency", "mnist", 0.25, dict(num_noise_vec=2, lbd=10.0, eta=0.5)),
        ("consistency", "mnist", 1.0, dict(lbd=5.0)),
        ("consistency", "cifar10", 0.25, dict(lbd=20.0)),
        ("stability", "cifar10", 1.0, dict(lbd=1.0, detach_target=False)),
        ("stability", "mnist", 1.0, dict(lbd=2.0, detach_target=False)),
        # untabulated sigma: nearest tabulated on a log scale
        ("consistency", "mnist", 0.12, dict(lbd=10.0)),
        ("smoothadv", "cifar10", 0.75, dict(epsilon=2.0)),
        ("macer", "cifar10", 0.4, dict(lbd=6.0)),
    ],
)
def test_defaults(name: str, family: str, sigma: float, expected: dict) -> None:
    cls = get_objective(name)
    got = cls.defaults(family, sigma)
    assert set(got) == set(cls.Params.field_specs())
    for k, v in expected.items():
        assert got[k] == v, k
    obj = cls.from_config(sigma, family)
    resolved = dict(got)
    if name == "smoothmix" and got["maxnorm_s"] is None:
        resolved["maxnorm_s"] = got["step_size"] * got["mix_step"]  # "None" is resolved to α·mix_step
    assert obj.hparams == resolved
    assert obj.config() == {"method": name, "sigma": sigma, "hparams": resolved}
    # rebuilding from the recorded hyperparameters gives the same objective
    assert cls(sigma=sigma, **obj.config()["hparams"]).hparams == obj.hparams


def test_construction_and_errors() -> None:
    # bare constructor: the command line's default family (Fashion-MNIST's), for every method
    assert SmoothAdv(sigma=0.5).hparams == SmoothAdv.defaults("mnist", 0.5)
    assert SmoothAdv(sigma=0.5, family="cifar10").hparams == SmoothAdv.defaults("cifar10", 0.5)
    obj = SmoothAdv.from_config(0.25, "mnist", {"num_noise_vec": 2})
    assert obj.num_chunks == 2 and obj.hp.epsilon == 255 / 256
    assert SmoothMix.from_config(0.25, "mnist").num_chunks == 4
    assert Consistency.from_config(0.25, "mnist").num_chunks == 2
    assert Macer.from_config(0.25, "mnist").num_chunks == 1
    with pytest.raises(CertkitError, match="identically 0"):
        Consistency(sigma=0.25, num_noise_vec=1)
    with pytest.raises(CertkitError, match="--mix-step"):
        SmoothMix(sigma=0.25, num_steps=2, mix_step=2)
    with pytest.raises(CertkitError, match="no hyperparameter"):
        SmoothAdv.from_config(0.25, "mnist", {"bogus": 1})
    with pytest.raises(CertkitError, match="family"):
        Macer.defaults("svhn", 0.25)
    with pytest.raises(CertkitError):
        SmoothAdv(sigma=0.25, epsilon=-1.0)


# --------------------------------------------------------------------------------------------------
# SmoothAdv
# --------------------------------------------------------------------------------------------------
def test_smoothadv_perturbation_in_ball_and_box_and_increases_loss() -> None:
    model, (x, y) = mlp(), batch()
    obj = SmoothAdv(sigma=0.25, epsilon=0.5, num_steps=5, num_noise_vec=4, warmup=1)
    noises = draw_noises(x, 4, 0.25)
    delta = obj.perturb(model, x, y, noises, 0.5)
    assert delta.shape == x.shape
    assert (l2_norms(delta).flatten() <= 0.5 + 1e-5).all()
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
    with torch.no_grad():
        before = smoothed_nll(model, x, noises, y)
        after = smoothed_nll(model, x + delta, noises, y)
    assert after.sum() > before.sum()
    assert (after >= before - 1e-4).all()


def test_smoothadv_zero_gradient_takes_a_random_step_to_the_budget() -> None:
    """As the reference attacks: a zero gradient becomes a standard normal draw, not a unit vector, so one step
    of 2ε/T carries the perturbation out to the ε-ball's surface (T random unit steps would not reach it)."""
    model, (x, y) = ConstantLogits([0.0, 1.0, 2.0]), batch()
    x = x * 0 + 0.5  # interior, so clipping cannot cut the step
    delta = SmoothAdv(sigma=0.25, epsilon=0.3, num_steps=10, num_noise_vec=2).perturb(
        model, x, y, draw_noises(x, 2, 0.25), 0.3
    )
    norms = l2_norms(delta).flatten()
    assert torch.isfinite(delta).all()
    torch.testing.assert_close(norms, torch.full_like(norms, 0.3))


def test_smoothadv_epsilon_warmup() -> None:
    obj = SmoothAdv(sigma=0.25, epsilon=1.0, num_steps=2, num_noise_vec=2, warmup=10)
    obj.start_epoch(0, 90)
    assert obj.current_epsilon() == pytest.approx(0.1)
    _, parts = obj(mlp(), *batch())
    assert float(parts["epsilon"]) == pytest.approx(0.1)
    obj.start_epoch(4, 90)
    assert obj.current_epsilon() == pytest.approx(0.5)
    obj.start_epoch(30, 90)
    assert obj.current_epsilon() == 1.0


def test_smoothadv_divergence_is_reported() -> None:
    model = mlp()
    with torch.no_grad():
        model[3].bias[0] = float("nan")
    with pytest.raises(DivergenceError, match="non-finite"):
        SmoothAdv(sigma=0.25, epsilon=0.5, num_steps=1, num_noise_vec=2)(model, *batch())
    assert issubclass(DivergenceError, CertkitError)


# --------------------------------------------------------------------------------------------------
# MACER
# --------------------------------------------------------------------------------------------------
def _k_copies(rows: list[list[float]], k: int = 4) -> Tensor:
    return torch.tensor(rows).unsqueeze(0).expand(k, -1, -1)


def test_macer_hinge_zero_for_misclassified_and_large_margin() -> None:
    obj = Macer(sigma=0.5, gauss_num=4, beta=1.0, gamma=8.0, lbd=1.0, deferred_epochs=0)
    y = torch.tensor([0, 0, 0, 0])
    logits = _k_copies([[0.0, 1.0], [12.0, 0.0], [200.0, 0.0], [1.0, 0.0]])  # wrong, ξ>γ, p1=1, kept
    t = obj.terms(logits, y)
    assert t.kept.tolist() == [False, False, False, True]
    assert float(t.xi[1]) > 8.0 and math.isfinite(float(t.xi[1]))
    assert not math.isfinite(float(t.xi[2]))
    p1 = torch.sigmoid(torch.tensor(1.0))
    xi = torch.special.ndtri(p1) - torch.special.ndtri(1 - p1)
    assert float(t.rl) == pytest.approx(0.25 * (8.0 - float(xi)), rel=1e-5)
    # nothing kept -> no hinge at all
    assert float(obj.terms(logits[:, :3], y[:3]).rl) == 0.0
    # ...and no gradient from it either: only the kept point's logits move
    z = logits.clone().requires_grad_(True)
    obj.terms(z, y).rl.backward()
    assert torch.all(z.grad[:, :3] == 0) and z.grad[:, 3].abs().sum() > 0
    # CL is −log of the β-free soft prediction (β only enters the votes of the hinge)
    sharp = Macer(sigma=0.5, gauss_num=4, beta=16.0, gamma=8.0, lbd=1.0, deferred_epochs=0)
    expected_cl = -torch.log(torch.softmax(logits[0], dim=1)[torch.arange(4), y] + 1e-10).sum()
    assert float(sharp.terms(logits, y).cl) == pytest.approx(float(expected_cl), rel=1e-6)


def test_macer_gradient_flows_through_soft_votes() -> None:
    obj = Macer(sigma=0.25, gauss_num=4, beta=16.0, gamma=8.0, lbd=1.0, deferred_epochs=0)
    model = ConstantLogits([0.05, 0.0, -0.05])  # a correct, small-margin point: kept
    x = torch.rand(2, *SHAPE)
    y = torch.tensor([0, 0])
    t = obj.terms(model(x.repeat(4, 1, 1, 1)).view(4, 2, 3), y)
    assert t.kept.all()
    t.rl.backward()
    assert model.bias.grad is not None and torch.isfinite(model.bias.grad).all()
    assert model.bias.grad.abs().sum() > 0
    assert model.bias.grad[0] < 0  # descending RL widens the margin of the true class

    # a batch mixing a kept point with a saturated one (p1 = 1) must not produce NaN gradients
    logits = _k_copies([[0.1, 0.0, 0.0], [100.0, 0.0, 0.0]]).clone().requires_grad_(True)
    obj.terms(logits, torch.tensor([0, 0])).rl.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 0].abs().sum() > 0


def test_macer_deferral() -> None:
    obj = Macer(sigma=0.25, gauss_num=2, lbd=16.0, deferred_epochs=3)
    model, (x, y) = mlp(), batch()
    obj.start_epoch(2, 10)
    torch.manual_seed(0)
    loss, parts = obj(model, x, y)
    assert float(parts["lbd"]) == 0.0 and loss.item() == pytest.approx(float(parts["cl"]))
    obj.start_epoch(3, 10)
    torch.manual_seed(0)
    loss, parts = obj(model, x, y)
    assert float(parts["lbd"]) == 16.0
    assert loss.item() == pytest.approx(float(parts["cl"]) + 16.0 * float(parts["rl"]), rel=1e-5)
    with pytest.warns(UserWarning, match="never used"):
        Macer(sigma=0.25, deferred_epochs=31).start_epoch(0, 5)


# --------------------------------------------------------------------------------------------------
# SmoothMix
# --------------------------------------------------------------------------------------------------
def test_smoothmix_mixed_points_and_targets() -> None:
    model, (x, y) = mlp(), batch()
    obj = SmoothMix(sigma=0.25, num_noise_vec=2, step_size=0.5, num_steps=3, mix_step=1, warmup=10)
    obj.start_epoch(0, 90)  # w_0 = 0.1 scales maxnorm_s = 0.5·1
    noises = draw_noises(x, 2, 0.25)
    mb = obj.mix_batch(model, x, y, noises)
    lam = mb.lam.view(-1, 1, 1, 1)
    # the clean half of the single training forward is f(x_c + n_j) with the attack's draws
    assert torch.allclose(mb.logits_clean, noisy_logits(model, mb.x_clean, noises), atol=1e-5)
    assert ((mb.lam >= 0) & (mb.lam <= 0.5)).all()
    assert torch.allclose(mb.x_mix, (1 - lam) * mb.x_clean + lam * mb.x_adv, atol=1e-6)
    k = mb.y_mix.shape[1]
    assert torch.allclose(mb.y_mix, (1 - mb.lam[:, None]) * mb.p_bar_clean + mb.lam[:, None] / k, atol=1e-6)
    assert torch.allclose(mb.y_mix.sum(1), torch.ones(len(y)), atol=1e-5)
    assert mb.y_mix.requires_grad and mb.p_bar_clean.requires_grad  # p̄_c is not detached
    assert torch.equal(mb.correct, mb.p_bar_clean.argmax(1) == y)
    assert (l2_norms(mb.x_clean - x).flatten() <= 0.05 + 1e-5).all()
    for z in (mb.x_clean, mb.x_adv, mb.x_mix):
        assert (z >= 0).all() and (z <= 1).all()
    assert (l2_norms(mb.x_adv - x).flatten() > 0.05).all()  # the adversary went further than the clean side


def test_smoothmix_clean_side_and_caps() -> None:
    model, (x, y) = mlp(), batch()
    noises = draw_noises(x, 2, 0.25)
    x_c, x_adv = SmoothMix(sigma=0.25, num_noise_vec=2, step_size=1.0, num_steps=4, mix_step=0).attack(
        model, x, y, noises
    )
    assert torch.equal(x_c, x)
    _, x_adv = SmoothMix(sigma=0.25, num_noise_vec=2, step_size=1.0, num_steps=4, mix_step=0, maxnorm=0.3).attack(
        model, x, y, noises
    )
    assert (l2_norms(x_adv - x).flatten() <= 0.3 + 1e-5).all()


def test_smoothmix_mix_loss_only_on_correct_inputs() -> None:
    model = ConstantLogits([3.0, 0.0, 0.0])  # predicts class 0 everywhere
    x, _ = batch()
    y = torch.ones(len(x), dtype=torch.long)  # ...and every label is 1: no input counts
    obj = SmoothMix(sigma=0.25, num_noise_vec=2, step_size=0.5, num_steps=2, mix_step=0)
    mb = obj.mix_batch(model, x, y, draw_noises(x, 2, 0.25))
    assert not mb.correct.any() and mb.mix.item() == 0.0
    loss, parts = obj(model, x, y)
    assert loss.item() == pytest.approx(float(parts["ce"]))


def bn_net(seed: int = 0) -> nn.Module:
    """A network whose training forward depends on its batch (BatchNorm), as the CIFAR-10 ResNets' does."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def test_smoothmix_on_batchnorm_is_the_reference_step() -> None:
    """Oracle: the reference ``train.py`` step written out (two training calls, copy-major batches, its KL
    and mask) on the attack's points, λ and draws; the loss and the running statistics must agree."""
    model, (x, y) = bn_net(), batch()
    reference = copy.deepcopy(model)
    obj = SmoothMix(sigma=0.25, num_noise_vec=2, step_size=0.5, num_steps=3, mix_step=1, warmup=10, eta=2.0)
    obj.start_epoch(3, 90)
    noises = draw_noises(x, 2, 0.25)
    mb = obj.mix_batch(model, x, y, noises)
    ours = mb.ce + 2.0 * obj.weight() * mb.mix

    m, k = 2, 3
    logits_c = reference(torch.cat([mb.x_clean + n for n in noises]))
    clean_avg_sm = sum(F.softmax(c, dim=1) for c in logits_c.chunk(m)) / m
    loss_xent = F.cross_entropy(logits_c, y.repeat(m), reduction="none")
    lam = mb.lam
    in_mix = (1 - lam).view(-1, 1, 1, 1) * mb.x_clean + lam.view(-1, 1, 1, 1) * mb.x_adv
    targets_mix = (1 - lam).view(-1, 1) * clean_avg_sm + lam.view(-1, 1) * torch.full((1, k), 1 / k)
    logits_mix_c = F.log_softmax(reference(torch.cat([in_mix + n for n in noises])), dim=1)
    ind_correct = (clean_avg_sm.argmax(1) == y).float().repeat(m)
    loss_mixup = F.kl_div(logits_mix_c, targets_mix.repeat(m, 1), reduction="none").sum(1)
    theirs = loss_xent.mean() + 2.0 * obj.weight() * (ind_correct * loss_mixup).mean()

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours_bn, their_bn = model[2], reference[2]
    assert int(ours_bn.num_batches_tracked) == int(their_bn.num_batches_tracked) == 2  # two training calls
    torch.testing.assert_close(ours_bn.running_mean, their_bn.running_mean)
    torch.testing.assert_close(ours_bn.running_var, their_bn.running_var)


def test_stability_on_batchnorm_is_the_reference_step() -> None:
    """Oracle: ``train_stab.py``'s step (two training calls, the soft target not detached) on the same draw:
    the same loss, gradient and running statistics."""
    x, y = batch()
    model = bn_net()
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    ours, _ = Stability(sigma=0.25, lbd=2.0)(model, x, y)
    ours.backward()
    torch.manual_seed(5)
    noise = torch.randn_like(x) * 0.25
    logits, logits_n = reference(x), reference(x + noise)
    stab = (-F.softmax(logits, dim=1) * F.log_softmax(logits_n, dim=1)).sum(1).mean()
    theirs = F.cross_entropy(logits, y) + 2.0 * stab
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(model[2].running_mean, reference[2].running_mean)


# --------------------------------------------------------------------------------------------------
# Consistency
# --------------------------------------------------------------------------------------------------
def test_consistency_kl_zero_when_predictions_agree() -> None:
    x, y = batch()
    _, parts = Consistency(sigma=0.5, num_noise_vec=4, lbd=10.0, eta=0.5)(ConstantLogits([1.0, 0.0, -1.0]), x, y)
    assert abs(float(parts["kl"])) < 1e-6
    assert float(parts["entropy"]) > 0
    _, parts = Consistency(sigma=0.5, num_noise_vec=4, lbd=10.0, eta=0.5)(mlp(), x, y)
    assert float(parts["kl"]) > 0


# --------------------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------------------
def test_stability_target_detached_or_trained() -> None:
    x, y = batch()
    grads, losses = {}, {}
    for detach in (True, False):
        model = mlp()
        torch.manual_seed(5)
        loss, parts = Stability(sigma=0.25, lbd=2.0, detach_target=detach)(model, x, y)
        assert loss.item() == pytest.approx(float(parts["ce"]) + 2.0 * float(parts["stab"]), rel=1e-6)
        loss.backward()
        losses[detach] = loss.item()
        grads[detach] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # same loss value, different gradient: the reference's form also trains through softmax(f(x))
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert not torch.allclose(grads[True], grads[False])
    with pytest.raises(CertkitError, match="--detach-target"):
        Stability(sigma=0.25, detach_target="yes")
    parse = Stability.Params.parse_function("detach_target")
    assert parse("false") is False and parse("True") is True
    with pytest.raises(ValueError):
        parse("maybe")


# --------------------------------------------------------------------------------------------------
# every method
# --------------------------------------------------------------------------------------------------
def test_resolved_hyperparameters_land_in_model_json(tmp_path: Path) -> None:
    import json

    from certkit.train import train
    from helpers import make_idx_dataset

    data = make_idx_dataset(tmp_path / "data", n_train=8, n_test=4)
    trainer = train(
        "mnist",
        "smallcnn",
        "smoothmix",
        sigma=0.5,
        out=tmp_path / "run",
        hparams={"num_noise_vec": 2, "mix_step": 1},
        data_dir=str(data),
        test_subset=0,
        device="cpu",
        progress=False,
        epochs=1,
        batch_size=8,
    )
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["method"] == "smoothmix" and meta["sigma"] == 0.5
    # MNIST-like defaults at σ = 0.5 (T = 4, η = 5), the overrides, and maxnorm_s resolved to α·mix_step
    assert meta["hparams"] == trainer.objective.config()["hparams"]
    assert meta["hparams"]["num_steps"] == 4 and meta["hparams"]["num_noise_vec"] == 2
    assert meta["hparams"]["maxnorm_s"] == 1.0 and meta["hparams"]["maxnorm"] is None
    rebuilt = SmoothMix(sigma=meta["sigma"], **meta["hparams"])
    assert rebuilt.hparams == trainer.objective.hparams and rebuilt.num_chunks == 2


@pytest.mark.parametrize("name", MINE)
def test_parts_and_modes_restored(name: str) -> None:
    model = Recorder(mlp())
    model.train()
    loss, parts = small(name)(model, *batch())
    assert loss.dim() == 0 and loss.requires_grad
    for k, v in parts.items():
        assert isinstance(v, Tensor) and v.dim() == 0 and not v.requires_grad, k
    assert model.training and all(p.requires_grad for p in model.parameters())
    train_calls = [c for c in model.calls if c[0]]
    attack_calls = [c for c in model.calls if not c[0]]
    assert all(grad for _, grad in train_calls)  # update passes: train mode, parameter grads on
    assert all(not grad for _, grad in attack_calls)  # attack passes: eval mode, parameter grads off
    assert len(attack_calls) == {"smoothadv": 3, "smoothmix": 3}.get(name, 0)
    # the reference code's gradient-carrying calls: SmoothMix (clean, mixed) and Stability (clean, noisy) two
    assert len(train_calls) == {"smoothmix": 2, "stability": 2}.get(name, 1)


@pytest.mark.parametrize(
    "name, extra",
    [(name, {}) for name in MINE] + [("stability", {"detach_target": False})],
    ids=[*MINE, "stability-reference"],
)
def test_learns_on_a_tiny_batch(name: str, extra: dict) -> None:
    x, y = separable()
    model = mlp(num_classes=2)
    obj = small(name, **extra)
    obj.start_epoch(20, 30)  # past every warm-up

    def measured() -> float:
        torch.manual_seed(123)
        return obj(model, x, y)[0].item()

    before = measured()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # the literature's optimizer
    for _ in range(40):
        opt.zero_grad()
        obj(model, x, y)[0].backward()
        opt.step()
    after = measured()
    assert after < 0.6 * before, (before, after)
    with torch.no_grad():
        noisy = model(x + 0.25 * torch.randn_like(x)).argmax(1)
    assert (noisy == y).float().mean() > 0.9


# --------------------------------------------------------------------------------------------------
# a short real run per method: Fashion-MNIST, 1,500 training images, one epoch of 47 optimizer steps
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fmnist(fmnist_root: Path):
    from certkit.data import load_dataset

    train = load_dataset("fashion-mnist", "train", str(fmnist_root)).subset(1500)
    return train, load_dataset("fashion-mnist", "test", str(fmnist_root)).subset(500)


REAL = {
    # Published MNIST-like defaults, except: cheaper attacks and fewer copies; no warm-up, so the full
    # attack is trained on; MACER without deferral and with λ = 2, since λ = 16 from the first step is
    # what the published deferral exists to avoid (a one-epoch run with the default deferral never uses RL).
    "smoothadv": dict(num_steps=1, num_noise_vec=2, warmup=1),
    "macer": dict(gauss_num=4, deferred_epochs=0, lbd=2.0),
    "smoothmix": dict(num_noise_vec=2, num_steps=1, mix_step=0, warmup=1),
    "consistency": dict(),
    "stability": dict(),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MINE)
def test_fashion_mnist_one_epoch_beats_chance(name: str, fmnist) -> None:
    """One epoch must take noisy test accuracy from chance (0.10) to well above it.

    The bar, 0.30, is far below what these runs reach (0.61-0.74 over seeds 0-3 on the development
    machine; results differ across CPUs, and a bar near the typical value failed on other hardware), yet
    a method whose loss does not train the classifier stays near 0.10 and fails it.
    """
    from certkit.models import create_model
    from certkit.train import TrainConfig, Trainer

    train, test = fmnist
    torch.manual_seed(0)
    model = create_model("smallcnn", 10, (1, 28, 28))
    obj = get_objective(name).from_config(0.25, "mnist", REAL[name])
    # 47 optimizer steps of 32 images for every method: chunked methods step once per chunk of B/m images
    batch = 32 * obj.num_chunks
    cfg = TrainConfig(epochs=1, batch_size=batch, optimizer="adam", lr=3e-3, schedule="constant", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a MACER deferral that would switch the regulariser off
        history = Trainer(
            model, obj, train, test, cfg, out_dir=None, device="cpu", progress=False, log=lambda m: None
        ).fit()
    rec = history[-1]
    assert math.isfinite(rec["loss"])
    assert rec["test_noisy_acc"] > 0.3, rec


# --------------------------------------------------------------------------------------------------
# precision and modes
# --------------------------------------------------------------------------------------------------
class Bf16Logits(nn.Module):
    """A linear classifier whose logits are rounded to bf16, returned as bf16 or, with ``widen``, as the fp32
    numbers of the same values. Its products are elementwise, which autocast leaves in fp32 forwards and
    backwards (an attack's backward runs inside the autocast region): the two differ in the logits' dtype
    alone."""

    def __init__(self, widen: bool, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(3, math.prod(SHAPE), generator=g) / 3)
        self.bias = nn.Parameter(torch.randn(3, generator=g))
        self.widen = widen

    def forward(self, x: Tensor) -> Tensor:
        out = ((x.flatten(1).unsqueeze(1) * self.weight).sum(-1) + self.bias).bfloat16()
        return out.float() if self.widen else out


BF16_CASES: dict[str, Callable[[bool], Objective]] = {
    **{name: (lambda widen, name=name: small(name)) for name in MINE},
    "smoothadv-ddn": lambda widen: small("smoothadv", attack="ddn"),
    "consistency-adv": lambda widen: small("consistency", adv_training=True, epsilon=0.5, num_steps=2, warmup=1),
    "gaussian": lambda widen: get_objective("gaussian")(0.25),
    "crt": lambda widen: CRT(0.25, teacher=Bf16Logits(widen, seed=5)),
    "crt-softmax-mixed": lambda widen: CRT(0.25, teacher=Bf16Logits(widen, seed=5), alpha=0.5, match="softmax"),
}


@pytest.mark.parametrize("case", sorted(BF16_CASES))
def test_losses_under_cpu_bf16_autocast_are_fp32_arithmetic_on_the_logits(case: str) -> None:
    """Under CPU bf16 autocast (``--amp bf16``), which runs softmax, log_softmax and pow in bf16, every loss
    and part is fp32 and equals what fp32 arithmetic gives on the same (bf16-valued) logits, attacks included:
    the README's "losses kept in fp32"."""
    results = []
    for widen in (False, True):
        model = Bf16Logits(widen)
        obj = BF16_CASES[case](widen)
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not widen):
            loss, parts = obj(model, *batch())
        assert loss.dtype == torch.float32, case
        assert all(v.dtype == torch.float32 for v in parts.values()), {k: v.dtype for k, v in parts.items()}
        results.append({"loss": loss.detach(), **parts})
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("robust_loss", ["kl", "trades_ce"])
def test_gloro_loss_under_cpu_bf16_autocast_is_fp32(robust_loss: str) -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), MinMax(), nn.Linear(16, 3))
    net = GloroNet(nn.Sequential(Normalize([0.0], [1.0]), body), SHAPE, epsilon=0.3)
    obj = Gloro(epsilon=0.3, lbd=1.0, robust_loss=robust_loss, power_iterations=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = obj(obj.prepare_model(net, SHAPE), *batch())
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in parts.values()), {k: v.dtype for k, v in parts.items()}


def test_attacks_restore_each_submodules_own_mode() -> None:
    """A BatchNorm the caller put in eval mode (frozen statistics) inside a train-mode net is still in eval
    mode after an attack, and the rest is back in train mode."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    net.train()
    net[2].eval()
    small("smoothadv")(net, *batch())
    assert [m.training for m in net] == [True, True, False, True, True]


def test_attacks_restore_modes_through_each_modules_own_train() -> None:
    """A module may override train() (GloroNet does): restoring its mode goes through it."""

    calls: list[bool] = []

    class Counting(nn.Linear):
        def train(self, mode: bool = True) -> Counting:
            calls.append(mode)
            return super().train(mode)

    net = nn.Sequential(nn.Flatten(), Counting(math.prod(SHAPE), 3)).train()
    small("smoothadv")(net, *batch())
    assert calls[-1] is True and net[1].training
