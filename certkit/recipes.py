"""Published training recipes by name (``certkit train --recipe NAME``, ``certkit list recipes``).

The family-level defaults (:data:`certkit.train.RECIPES`) are what the re-implementations share; papers that
ran their own settings — Cohen's 90-epoch CIFAR-10 runs, MACER's 440-epoch original, ImageNet commands,
SmoothAdv + Consistency — differ from them in ways that change the numbers they report. Each such set of
settings is declared once here (timm-style named configurations): the optimisation fields of
:class:`~certkit.train.TrainConfig` it sets, the method hyperparameters it sets (per sigma where the paper
varies them), the method and dataset family it was published for, and its source. Explicit flags override
a recipe; the resolved values go to ``model.json`` as always, with the recipe's name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from certkit.errors import CertkitError

_E1 = 255 / 256  # the reference CLIs' "255" in 1/256 units


@dataclass(frozen=True)
class Recipe:
    """One published set of training settings.

    ``hparams`` maps a sigma (or None for "every sigma") to method hyperparameters; a sigma between the
    listed ones takes the nearest on a log scale, as the methods' own published tables do.
    """

    name: str
    description: str
    source: str
    family: str
    #: the method the settings were published for; None: any smoothing method of the family recipe
    method: str | None
    train: Mapping[str, Any]
    hparams: Mapping[float | None, Mapping[str, Any]] = field(default_factory=dict)

    def hyperparameters(self, sigma: float | None) -> dict[str, Any]:
        """The recipe's method hyperparameters at ``sigma`` (the nearest listed sigma)."""
        if not self.hparams:
            return {}
        if None in self.hparams or sigma is None:
            return dict(next(iter(self.hparams.values())))
        keys = [s for s in self.hparams if s is not None]
        nearest = min(sorted(keys), key=lambda s: abs(math.log(s / sigma)))
        return dict(self.hparams[nearest])


def _recipes(*items: Recipe) -> dict[str, Recipe]:
    return {r.name: r for r in items}


#: every named recipe; training-methods.md §1–§6, gloro.md §5–§7 and the papers' training commands
RECIPES: dict[str, Recipe] = _recipes(
    Recipe(
        "fmnist-lenet",
        "Fashion-MNIST/MNIST LeNet protocol: 90 epochs, SGD lr 0.01, x0.1 every 30, batch 256",
        "smoothmix EXPERIMENTS.MD; smoothing-catrs data/fmnist training logs",
        "mnist",
        None,
        dict(epochs=90, batch_size=256, lr=0.01, schedule="step", lr_step=30, weight_decay=1e-4),
    ),
    Recipe(
        "cohen-cifar10",
        "Cohen et al.'s own CIFAR-10 Gaussian runs: 90 epochs, lr 0.1, x0.1 every 30, batch 400",
        "Cohen, Rosenfeld & Kolter, ICML 2019 (locuslab/smoothing)",
        "cifar10",
        "gaussian",
        # Cohen's train.py steps its StepLR at the start of each epoch: the decays come on time
        dict(epochs=90, batch_size=400, lr=0.1, schedule="step", lr_step=30, lr_step_lag=0, weight_decay=1e-4),
    ),
    Recipe(
        "rs-cifar10",
        "the re-implementations' CIFAR-10 ResNet-110 recipe: 150 epochs, lr 0.1, x0.1 every 50, batch 256",
        "smoothmix and smoothing-catrs EXPERIMENTS.MD",
        "cifar10",
        None,
        dict(epochs=150, batch_size=256, lr=0.1, schedule="step", lr_step=50, weight_decay=1e-4),
    ),
    Recipe(
        "macer-cifar10",
        "MACER's own CIFAR-10 run: 440 epochs, batch 64, lr 0.01, wd 5e-4, x0.1 at 200/400; "
        "k 16, beta 16, gamma 8, lambda 12, no deferral",
        "Zhai et al., ICLR 2020 (RuntianZ/macer main.py)",
        "cifar10",
        "macer",
        dict(epochs=440, batch_size=64, lr=0.01, weight_decay=5e-4, schedule="multistep", milestones=(200, 400)),
        {None: dict(gauss_num=16, beta=16.0, gamma=8.0, lbd=12.0, deferred_epochs=0)},
    ),
    Recipe(
        "macer-imagenet",
        "MACER's ImageNet length (120 epochs) over the ImageNet family recipe (lr 0.1, x0.1 every 30)",
        "Zhai et al., ICLR 2020, ImageNet experiments",
        "imagenet",
        "macer",
        dict(epochs=120, batch_size=256, lr=0.1, schedule="step", lr_step=30, weight_decay=1e-4),
    ),
    Recipe(
        "smoothmix-imagenet",
        "SmoothMix on ImageNet as CAT-RS runs it: m 2, T 1 (not CIFAR-10's m 2, T 4); 90 epochs, lr 0.1, x0.1 every 30",
        "Jeong et al., NeurIPS 2021; smoothing-catrs ImageNet commands",
        "imagenet",
        "smoothmix",
        dict(epochs=90, batch_size=256, lr=0.1, schedule="step", lr_step=30, weight_decay=1e-4),
        {None: dict(num_noise_vec=2, num_steps=1)},
    ),
    Recipe(
        "consistency-adv-mnist",
        "SmoothAdv + Consistency on MNIST-like data: m 4, lambda 1, eps 255/256, T 10, warm-up 10",
        "Jeong & Shin, NeurIPS 2020 (train_consistency.py --adv-training)",
        "mnist",
        "consistency",
        dict(epochs=90, batch_size=256, lr=0.01, schedule="step", lr_step=30, weight_decay=1e-4),
        {None: dict(adv_training=True, num_noise_vec=4, lbd=1.0, epsilon=_E1, num_steps=10, warmup=10)},
    ),
    Recipe(
        "consistency-adv-cifar10",
        "SmoothAdv + Consistency on CIFAR-10: sigma 0.25 m 4, lambda 2, eps 255/256; "
        "sigma 0.5/1.0 m 2, lambda 1, eps 2.0; T 10",
        "Jeong & Shin, NeurIPS 2020 (train_consistency.py --adv-training)",
        "cifar10",
        "consistency",
        dict(epochs=150, batch_size=256, lr=0.1, schedule="step", lr_step=50, weight_decay=1e-4),
        {
            0.25: dict(adv_training=True, num_noise_vec=4, lbd=2.0, epsilon=_E1, num_steps=10, warmup=10),
            0.5: dict(adv_training=True, num_noise_vec=2, lbd=1.0, epsilon=2.0, num_steps=10, warmup=10),
            1.0: dict(adv_training=True, num_noise_vec=2, lbd=1.0, epsilon=2.0, num_steps=10, warmup=10),
        },
    ),
    Recipe(
        "gloro-icml-mnist",
        "GloRo-TRADES on MNIST eps 0.3 as the ICML code: Adam 1e-3 constant for half the run, "
        "then exponential decay to 1e-6; 500 epochs, batch 256; trades_ce with lambda 0 -> 2",
        "Leino et al., ICML 2021 (klasleino/gloro ICML experiment code)",
        "mnist",
        "gloro",
        dict(
            optimizer="adam", lr=1e-3, schedule="half-exp", lr_final=1e-6, weight_decay=0.0, batch_size=256, epochs=500
        ),
        {None: dict(robust_loss="trades_ce", lbd_start=0.0, lbd=2.0)},
    ),
)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise CertkitError(
            f"unknown recipe {name!r}; valid recipes: {', '.join(sorted(RECIPES))} (certkit list recipes)"
        )
    return RECIPES[name]


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def describe_recipes() -> str:
    """One line per recipe: name, family, method, description and source (``certkit list recipes``)."""
    width = max(len(n) for n in RECIPES)
    lines = []
    for name in list_recipes():
        r = RECIPES[name]
        lines.append(f"{name:<{width}}  [{r.family}, {r.method or 'any method'}] {r.description} (source: {r.source})")
    return "\n".join(lines)


def check_recipe(recipe: Recipe, family: str, method: str) -> None:
    """A recipe published for another dataset family or method is a one-line error, not a silent mismatch."""
    if recipe.family != family:
        raise CertkitError(f"recipe {recipe.name!r} is for dataset family {recipe.family}, not {family}")
    if recipe.method is not None and recipe.method != method:
        raise CertkitError(f"recipe {recipe.name!r} is for --method {recipe.method}, not {method}")
