"""The training-objective interface shared by every method.

A training method in certkit is an *objective*: an object built with its hyperparameters and called on a
batch, returning the loss to minimise and its named parts for logging. One trainer loop serves every
method (Gaussian, SmoothAdv, MACER, SmoothMix, Consistency, CRT, GloRo), so cost comparisons between
methods are comparisons of objectives, not of training scripts.

Conventions every objective follows:

* ``x`` is a float batch ``(B, C, H, W)`` in ``[0, 1]`` pixel space on the model's device; normalization is
  the model's first layer, so Gaussian noise ``sigma * randn`` is added directly to ``x``.
* Noise comes from torch's global RNG, which the trainer re-seeds from ``(seed, epoch)`` at every epoch so
  a resumed run is bit-for-bit the uninterrupted one on CPU.
* The model arrives in train mode, possibly wrapped in DistributedDataParallel. Each step makes exactly
  one gradient-carrying forward call of ``model``; attacks run inside ``with eval_mode(model) as net:``
  on the unwrapped ``net`` (eval mode, parameter gradients off), restored afterwards.
* The loss's named parts are returned as detached 0-d tensors (no ``.item()`` per step, which would
  synchronise the GPU); the trainer averages them over the epoch.
* ``num_chunks``: methods published with chunking (SmoothAdv, Consistency, SmoothMix) split each loader
  batch of B images into ``m`` chunks of ``B/m`` images and take one optimizer step per chunk; the trainer
  does the splitting, the objective only sees one chunk.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from certkit.errors import CertkitError


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of an objective: its type and what it means (shown by ``certkit train --help``)."""

    type: Callable[[str], Any]
    help: str


class Objective:
    """Base class: a loss over a batch plus the epoch-dependent schedules of its method.

    Subclasses set ``name``, ``HYPERS`` and implement :meth:`defaults` and :meth:`loss`.
    """

    name: ClassVar[str] = ""
    #: hyperparameters of this method (CLI flag ``--foo-bar`` for key ``foo_bar``)
    HYPERS: ClassVar[dict[str, Hyper]] = {}
    #: optimizer steps per loader batch (the batch is split into this many chunks)
    num_chunks: int = 1

    def __init__(self, sigma: float, **hparams: Any) -> None:
        if not sigma > 0:
            raise CertkitError(f"sigma must be > 0 (got {sigma})")
        unknown = set(hparams) - set(self.HYPERS)
        if unknown:
            raise CertkitError(
                f"method {self.name!r} has no hyperparameter(s) {sorted(unknown)}; it takes {sorted(self.HYPERS)}"
            )
        self.sigma = float(sigma)
        self.hparams: dict[str, Any] = dict(hparams)
        self.epoch = 0
        self.num_epochs = 1

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def defaults(cls, family: str, sigma: float) -> dict[str, Any]:
        """Published defaults for a dataset family (``mnist`` for MNIST-like, ``cifar10``, ``imagenet``)."""
        return {}

    @classmethod
    def from_config(cls, sigma: float, family: str, overrides: dict[str, Any] | None = None) -> "Objective":
        """Build with the published defaults for ``family``/``sigma``, then apply explicit ``overrides``."""
        params = cls.defaults(family, sigma)
        for k, v in (overrides or {}).items():
            if v is not None:
                params[k] = v
        return cls(sigma=sigma, **params)

    # --- schedule -----------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the trainer before each (0-based) epoch; warm-ups read ``self.epoch``."""
        self.epoch = epoch
        self.num_epochs = num_epochs

    # --- the loss -----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss(model, x, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-epoch test metrics on one batch, as *sums* over the batch (the trainer divides by N).

        Default: clean accuracy and noisy accuracy with one noise draw per image (a diagnostic, not a
        certificate). Methods with other guarantees (GloRo) override this.
        """
        clean = model(x).argmax(1) == y
        noisy = model(x + self.noise(x)).argmax(1) == y
        return {"clean_acc": clean.float().sum(), "noisy_acc": noisy.float().sum()}

    def noise(self, x: Tensor) -> Tensor:
        """Fresh Gaussian noise of this objective's sigma, shaped and placed like ``x``."""
        return torch.randn_like(x) * self.sigma

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this objective; written into ``model.json``."""
        return {"method": self.name, "sigma": self.sigma, "hparams": dict(self.hparams)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.hparams.items()))
        return f"{type(self).__name__}(sigma={self.sigma}{', ' if args else ''}{args})"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run an attack with the model in eval mode and parameter gradients off, then restore both.

    Yields the *unwrapped* module: attack passes must not go through a DDP wrapper, whose reducer expects
    exactly one training forward per backward. Use it as ``with eval_mode(model) as net: ... net(x) ...``.
    """
    model = unwrap(model)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def add_hyper_arguments(parser: argparse.ArgumentParser, objectives: dict[str, type[Objective]]) -> None:
    """Add one ``--flag`` per hyperparameter name across all methods; the help says which methods use it."""
    users: dict[str, list[str]] = {}
    specs: dict[str, Hyper] = {}
    for name, cls in objectives.items():
        for key, spec in cls.HYPERS.items():
            users.setdefault(key, []).append(name)
            specs.setdefault(key, spec)
    group = parser.add_argument_group("method hyperparameters (default: the published value for the dataset and sigma)")
    for key in sorted(specs):
        spec = specs[key]
        group.add_argument(
            "--" + key.replace("_", "-"),
            dest="hp_" + key,
            metavar=key.upper(),
            type=spec.type,
            default=None,
            help=f"{spec.help} [{', '.join(users[key])}]",
        )


def collect_hyper_overrides(args: argparse.Namespace, cls: type[Objective]) -> dict[str, Any]:
    """The hyperparameters of ``cls`` that were given explicitly on the command line."""
    given = {k: getattr(args, "hp_" + k, None) for k in cls.HYPERS}
    return {k: v for k, v in given.items() if v is not None}
