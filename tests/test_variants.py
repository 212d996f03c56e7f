"""Method variants the papers' tables use, each against a transcription of the official formula on a tiny
batch, and the named recipes (``--recipe``, ``certkit list recipes``).

The transcriptions below follow the official code's steps in its own layout (image-major noise for
SmoothAdv, lists of noise batches for Consistency, Keras probabilities for GloRo), written here for the test.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.gloro.model import GloroNet
from certkit.gloro.objective import Gloro, all_max_bottom, trades_ce_term
from certkit.models import create_model
from certkit.objectives.consistency import Consistency
from certkit.objectives.smoothadv import SmoothAdv
from certkit.recipes import RECIPES, get_recipe
from certkit.train import TrainConfig, build_trainer, half_exp_factor

SHAPE = (1, 6, 6)


def mlp(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), nn.ReLU(), nn.Linear(16, num_classes))


def batch(n: int = 6, num_classes: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g), torch.randint(0, num_classes, (n,), generator=g)


# --------------------------------------------------------------------------------------------------
# SmoothAdv with DDN
# --------------------------------------------------------------------------------------------------
def official_ddn(
    model: nn.Module, inputs: Tensor, labels: Tensor, noise: Tensor, m: int, steps: int, max_norm: float, gamma: float
) -> Tensor:
    """Salman et al.'s multi-noise DDN, image-major layout (each image repeated m times in a row)."""
    b = labels.shape[0]
    reps = inputs.repeat((1, m, 1, 1)).reshape(-1, *inputs.shape[1:])
    delta = torch.zeros_like(inputs, requires_grad=True)
    norm = torch.full((b,), max_norm)
    worst = torch.max(inputs, 1 - inputs).view(b, -1).norm(p=2, dim=1)
    opt = torch.optim.SGD([delta], lr=1)
    best_l2, best = worst.clone(), torch.zeros_like(inputs)
    for i in range(steps):
        lr = 0.01 + (1 - 0.01) * (1 + math.cos(math.pi * (i + 1) / steps)) / 2
        for group in opt.param_groups:
            group["lr"] = lr
        l2 = delta.data.view(b, -1).norm(p=2, dim=1)
        logits = model(reps + delta.repeat(1, m, 1, 1).view_as(reps) + noise)
        pred = logits.argmax(1).reshape(-1, m).mode(1)[0]
        avg = F.softmax(logits, 1).reshape(-1, m, logits.shape[-1]).mean(1)
        loss = -F.nll_loss(torch.log(avg.clamp(min=1e-20)), labels)
        is_adv = pred != labels
        both = is_adv & (l2 < best_l2)
        best_l2[both] = l2[both]
        best[both] = delta.data[both]
        opt.zero_grad()
        loss.backward()
        gnorm = delta.grad.view(b, -1).norm(p=2, dim=1)
        delta.grad.div_(gnorm.view(-1, 1, 1, 1))
        opt.step()
        norm = torch.min(norm * (1 - (2 * is_adv.float() - 1) * gamma), worst)
        delta.data.mul_((norm / delta.data.view(b, -1).norm(2, 1)).view(-1, 1, 1, 1))
        delta.data.add_(inputs).mul_(255).round_().div_(255).clamp_(0, 1).sub_(inputs)
    best.renorm_(p=2, dim=0, maxnorm=max_norm)
    best.mul_(255).round_().div_(255)
    return inputs + best


def test_smoothadv_ddn_matches_the_official_attack_and_loss() -> None:
    model = mlp()
    x, _ = batch()
    y = model(x).argmax(1)  # correctly classified points: the attack must move them to flip the vote
    m, steps, eps = 2, 8, 3.0
    obj = SmoothAdv(0.1, epsilon=eps, num_steps=steps, num_noise_vec=m, warmup=1, attack="ddn")
    torch.manual_seed(3)
    noises = torch.randn(m, *x.shape) * 0.1  # certkit layout (m, B, ...)
    ours = x + obj.perturb_ddn(model, x, y, noises, eps)
    image_major = noises.transpose(0, 1).reshape(-1, *x.shape[1:])
    theirs = official_ddn(model, x, y, image_major, m, steps, eps, 0.05)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours != x).any()  # the attack found flips on this batch, so the comparison is not 0 == 0
    # the training loss on the result: mean CE over every noisy copy, as with PGD
    torch.manual_seed(4)
    loss, _ = obj(model, x, y)
    torch.manual_seed(4)
    noises = torch.randn(m, *x.shape) * 0.1
    adv = x + obj.perturb_ddn(model, x, y, noises, eps)
    expected = F.cross_entropy(model((adv.unsqueeze(0) + noises).flatten(0, 1)), y.repeat(m))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_smoothadv_default_attack_is_still_pgd() -> None:
    assert SmoothAdv(0.25).hp.attack == "pgd"
    with pytest.raises(CertkitError, match="attack"):
        SmoothAdv(0.25, attack="fgsm")


# --------------------------------------------------------------------------------------------------
# SmoothAdv + Consistency
# --------------------------------------------------------------------------------------------------
def official_consistency_adv(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    noises: list[Tensor],
    steps: int,
    max_norm: float,
    lbd: float,
    eta: float,
) -> Tensor:
    """Jeong & Shin's --adv-training step: their SmoothAdv PGD, then CE + consistency on the result."""
    adv = inputs.detach()
    alpha = max_norm / steps * 2
    for _ in range(steps):
        adv.requires_grad_()
        avg = sum(F.softmax(model(adv + n), 1) for n in noises) / len(noises)
        loss = F.nll_loss(torch.log(avg.clamp(min=1e-20)), labels)
        grad = torch.autograd.grad(loss, [adv])[0]
        grad = grad / (grad.reshape(grad.size(0), -1).norm(dim=1).view(-1, 1, 1, 1) + 1e-8)
        adv = torch.clamp(inputs + (adv + alpha * grad - inputs).renorm(p=2, dim=0, maxnorm=max_norm), 0, 1).detach()
    logits = model(torch.cat([adv + n for n in noises]))
    xent = F.cross_entropy(logits, labels.repeat(len(noises)))
    probs = [F.softmax(z, 1) for z in torch.chunk(logits, len(noises))]
    avg = sum(probs) / len(probs)
    kl = sum(
        F.kl_div(F.log_softmax(z, 1), avg, reduction="none").sum(1) for z in torch.chunk(logits, len(noises))
    ) / len(noises)
    ent = -(avg * torch.log(avg.clamp(min=1e-20))).sum(1)
    return xent + (lbd * kl + eta * ent).mean()


def test_consistency_adv_training_matches_the_official_step() -> None:
    model = mlp()
    x, y = batch()
    obj = Consistency(0.25, num_noise_vec=2, lbd=3.0, eta=0.5, adv_training=True, epsilon=0.7, num_steps=3, warmup=1)
    torch.manual_seed(5)
    loss, _ = obj(model, x, y)
    torch.manual_seed(5)
    noises = torch.randn(2, *x.shape) * 0.25
    expected = official_consistency_adv(model, x, y, list(noises), 3, 0.7, 3.0, 0.5)
    assert torch.allclose(loss, expected, atol=1e-5)
    torch.manual_seed(5)
    plain, _ = Consistency(0.25, num_noise_vec=2, lbd=3.0, eta=0.5)(model, x, y)
    assert not torch.allclose(loss, plain)  # the attack changed the inputs


def test_consistency_adv_warmup_scales_the_radius() -> None:
    obj = Consistency(0.25, adv_training=True, epsilon=1.0, warmup=4)
    x, y = batch()
    obj.start_epoch(0, 10)
    noises = torch.randn(2, *x.shape) * 0.25
    adv = obj.perturb(mlp(), x, y, noises)
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.25 + 1e-5).all()


# --------------------------------------------------------------------------------------------------
# GloRo variants
# --------------------------------------------------------------------------------------------------
def gloro_net(normalize: bool = True) -> tuple[Gloro, GloroNet]:
    torch.manual_seed(0)
    obj = Gloro(epsilon=0.3, power_iterations=2, normalize=normalize, family="mnist")
    body = create_model("gloro-2c2f", 4, (1, 8, 8), [0.5], [0.25])
    return obj, obj.prepare_model(body, (1, 8, 8))


def keras_trades_ce(logits: Tensor, bottom: Tensor) -> Tensor:
    """The library's Trades(robust_loss_string='crossentropy') robust term, with Keras's probability handling."""
    y_pred = torch.cat([logits, bottom[:, None]], 1)
    truth = torch.cat([F.softmax(logits, 1), torch.zeros(len(logits), 1)], 1)
    soft = F.softmax(y_pred, 1)
    soft = soft / soft.sum(1, keepdim=True)
    return -(truth * soft.clamp(1e-7, 1 - 1e-7).log()).sum(1).mean()


def test_gloro_trades_ce_with_lambda_schedule_matches_the_library() -> None:
    obj, net = gloro_net()
    obj.hp.robust_loss, obj.hp.lbd_start, obj.hp.lbd = "trades_ce", 0.5, 2.5
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    net.train()
    for epoch, lam in [(0, 0.5), (2, 1.5), (4, 2.5)]:
        obj.start_epoch(epoch, 5)
        assert obj.trades_lambda() == pytest.approx(lam)
        loss, _ = obj(net, x, y)
        logits = net(x)
        bottom = net.bottom_logit(logits, obj.train_epsilon(), net.lipschitz_constant(0))
        expected = F.cross_entropy(logits, y) + lam * keras_trades_ce(logits, bottom)
        assert torch.allclose(loss, expected, atol=1e-5)
    # KL + entropy: the trades_ce term exceeds the KL term by the entropy of softmax(y)
    logits = torch.randn(4, 3)
    full = torch.cat([logits, torch.randn(4, 1)], 1)
    kl = F.softplus(full[:, -1] - torch.logsumexp(logits, 1))
    entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1)
    assert torch.allclose(trades_ce_term(logits, full), kl + entropy, atol=1e-5)


def test_gloro_all_max_tie_mask_is_the_library_formula_and_training_only() -> None:
    _, net = gloro_net()
    logits = torch.tensor([[2.0, 2.0, 0.0, -1.0], [3.0, 1.0, 0.0, 0.0]])
    k = net.lipschitz_constant(0).detach()
    kj = net.margin_constants(k)[logits.argmax(1)]
    # the library: mask every entry equal to the row maximum, then take the max of y_i + eps*K_ji
    masked = torch.where(
        logits == logits.max(1, keepdim=True).values, torch.full_like(logits, -float("inf")), logits + 0.3 * kj
    )
    assert torch.equal(all_max_bottom(net, logits, 0.3, k), masked.max(1).values)
    # with a tie both tied classes are masked (the unsound library behaviour); argmax masking keeps one
    assert all_max_bottom(net, logits, 0.3, k)[0] < net.bottom_logit(logits, 0.3, k)[0]
    assert torch.equal(all_max_bottom(net, logits, 0.3, k)[1], net.bottom_logit(logits, 0.3, k)[1])


def test_gloro_without_normalization_and_fixed_epsilon() -> None:
    _, with_norm = gloro_net(normalize=True)
    obj, without = gloro_net(normalize=False)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(without[0](x), x)  # the Normalize layer is the identity
    obj.net = without
    assert obj.checkpoint_meta()["normalization"] == {"mean": [0.0], "std": [1.0]}  # model.json says so
    ratio = with_norm.lipschitz_constant(30) / without.lipschitz_constant(30)
    assert ratio.item() == pytest.approx(4.0, rel=1e-3)  # 1/std with std 0.25
    fixed = Gloro(epsilon=0.3, eps_ramp=0.0, train_eps_factor=1.0)
    for epoch in (0, 3, 9):
        fixed.start_epoch(epoch, 10)
        assert fixed.train_epsilon() == 0.3


def test_half_exp_schedule_is_constant_then_geometric() -> None:
    factors = [half_exp_factor(e, 10, 1e-3) for e in range(10)]
    assert factors[:6] == [1.0] * 6
    assert factors[-1] == pytest.approx(1e-3)
    ratios = [b / a for a, b in itertools.pairwise(factors[5:])]
    assert all(r == pytest.approx(ratios[0]) for r in ratios)


# --------------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------------
def test_recipe_sets_settings_and_hyperparameters_and_flags_override(fmnist_root) -> None:
    trainer = build_trainer(
        "fashion-mnist",
        "lenet",
        "consistency",
        sigma=0.25,
        recipe="consistency-adv-mnist",
        data_dir=str(fmnist_root),
        train_subset=8,
        test_subset=0,
        hparams={"lbd": 2.0},
        epochs=3,
        device="cpu",
    )
    hp = trainer.objective.hparams
    assert hp["adv_training"] is True and hp["num_noise_vec"] == 4 and hp["epsilon"] == 255 / 256
    assert hp["lbd"] == 2.0  # the explicit value wins over the recipe's 1.0
    assert trainer.config.epochs == 3 and trainer.config.lr == 0.01
    assert trainer.meta["recipe"] == "consistency-adv-mnist"


def test_recipe_values_and_mismatches() -> None:
    macer = get_recipe("macer-cifar10")
    cfg = TrainConfig(**macer.train)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.milestones) == (440, 64, 0.01, 5e-4, (200, 400))
    assert get_recipe("cohen-cifar10").train["batch_size"] == 400
    assert get_recipe("smoothmix-imagenet").hyperparameters(0.5) == {"num_noise_vec": 2, "num_steps": 1}
    assert get_recipe("consistency-adv-cifar10").hyperparameters(0.5)["epsilon"] == 2.0
    assert get_recipe("consistency-adv-cifar10").hyperparameters(0.25)["num_noise_vec"] == 4
    for recipe in RECIPES.values():  # every declared recipe builds a valid configuration
        TrainConfig(**recipe.train)
    with pytest.raises(CertkitError, match="cifar10"):
        build_trainer("fashion-mnist", "lenet", "macer", recipe="macer-cifar10")
    with pytest.raises(CertkitError, match="--method macer"):
        build_trainer("cifar10", "resnet20", "gaussian", recipe="macer-cifar10")
    with pytest.raises(CertkitError, match="unknown recipe"):
        get_recipe("nope")


@pytest.mark.slow  # a subprocess
def test_list_recipes_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "certkit", "list", "recipes"], capture_output=True, text=True, check=True
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == len(RECIPES)
    assert all("source:" in line for line in lines)
    assert any(line.startswith("macer-cifar10") for line in lines)


@pytest.mark.slow  # trains on the real dataset through the CLI
def test_train_cli_recipe_picks_the_method_and_records_resolved_values(fmnist_root, tmp_path) -> None:
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "certkit",
        "train",
        "--recipe",
        "consistency-adv-mnist",
        "--data-dir",
        str(fmnist_root),
        "--train-subset",
        "8",
        "--test-subset",
        "0",
        "--epochs",
        "1",
        "--num-steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    meta = json.loads((out / "model.json").read_text())
    assert meta["method"] == "consistency" and meta["recipe"] == "consistency-adv-mnist"
    assert meta["hparams"]["adv_training"] is True and meta["hparams"]["num_noise_vec"] == 4
    assert meta["hparams"]["num_steps"] == 2 and meta["train"]["epochs"] == 1  # explicit flags win
    wrong = subprocess.run(
        [*cmd[:-4], "--method", "gaussian", "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert (
        wrong.returncode == 2
        and "certkit: error: recipe 'consistency-adv-mnist' is for --method consistency" in wrong.stderr
    )
