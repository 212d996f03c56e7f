"""certkit: train neural classifiers to be certifiably robust, and certify them.

The data flow is one line: dataset → model (normalization is its first layer; noise lives in [0, 1] pixel
space) → objective (a training loss on a batch) → trainer → checkpoint → certifier → result TSV → report.

The names most programs need are here::

    import certkit
    model = certkit.load("runs/gaussian")                 # safetensors + JSON, nothing unpickled
    smoothed = certkit.Smooth(model, num_classes=10, sigma=0.25)
    prediction, radius = smoothed.certify(x, n0=100, n=100_000, alpha=0.001, batch_size=1000)
    certkit.certify_dataset(smoothed, test_set, certkit.RunPlan(n=10_000, skip=20), out="certify.tsv")

and, for training, ``certkit.train`` (one call) or ``build_trainer``/``Trainer``/``TrainConfig`` (the parts),
``build_objective``, and GloRo's ``GloroNet`` and ``certify_gloro_dataset``.
"""

# The one place the version is written (pyproject.toml reads it from here). First: submodules read it while
# this package is still importing.
__version__ = "0.1.0"

import sys as _sys
import types as _types
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it, imported on first use: they all need torch, which takes
#: seconds to import, and ``certkit --help`` or ``--version`` should not wait for it
_LAZY = {
    "load": "certkit.checkpoint",
    "CertkitError": "certkit.errors",
    "ABSTAIN": "certkit.smoothing.statistics",
    "AdaptiveSchedule": "certkit.smoothing.statistics",
    "Smooth": "certkit.smoothing.smooth",
    "RunPlan": "certkit.smoothing.runner",
    "certify_dataset": "certkit.smoothing.runner",
    "train": "certkit.train",
    "build_trainer": "certkit.train",
    "Trainer": "certkit.train",
    "TrainConfig": "certkit.train",
    "build_objective": "certkit.methods",
    "GloroNet": "certkit.gloro.model",
    "certify_gloro_dataset": "certkit.gloro.certify",
}

__all__ = [
    "ABSTAIN",
    "AdaptiveSchedule",
    "CertkitError",
    "GloroNet",
    "RunPlan",
    "Smooth",
    "TrainConfig",
    "Trainer",
    "__version__",
    "build_objective",
    "build_trainer",
    "certify_dataset",
    "certify_gloro_dataset",
    "load",
    "train",
]

if TYPE_CHECKING:  # the lazy names with their real types, for type checkers and editors
    from certkit.checkpoint import load
    from certkit.errors import CertkitError
    from certkit.gloro.certify import certify_gloro_dataset
    from certkit.gloro.model import GloroNet
    from certkit.methods import build_objective
    from certkit.smoothing.runner import RunPlan, certify_dataset
    from certkit.smoothing.smooth import Smooth
    from certkit.smoothing.statistics import ABSTAIN, AdaptiveSchedule
    from certkit.train import TrainConfig, Trainer, build_trainer, train


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'certkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, imported yet or not, for tab completion."""
    return sorted({*globals(), *__all__})


class _Package(_types.ModuleType):
    """``certkit.train`` names both a submodule and the function most programs call. Importing the submodule
    binds its name on the package (the import system's ``setattr``); the package keeps the function there."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, _types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
