"""certkit: train neural classifiers to be certifiably robust, and certify them.

The data flow is one line: dataset → model (normalization is its first layer; noise lives in [0, 1] pixel
space) → objective (a training loss on a batch) → trainer → checkpoint → certifier → result TSV → report.

The names most programs need are here::

    import certkit
    model = certkit.load("runs/gaussian")                 # safetensors + JSON, nothing unpickled
    smoothed = certkit.Smooth(model, num_classes=10, sigma=0.25)
    prediction, radius = smoothed.certify(x, n0=100, n=100_000, alpha=0.001, batch_size=1000)
    certkit.certify_dataset(smoothed, test_set, certkit.RunPlan(n=10_000, skip=20), out="certify.tsv")
"""

# The one place the version is written (pyproject.toml reads it from here). First: submodules read it while
# this package is still importing.
__version__ = "0.1.0"

import sys as _sys
import types as _types
from typing import Any

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
}

__all__ = [
    "ABSTAIN",
    "AdaptiveSchedule",
    "CertkitError",
    "RunPlan",
    "Smooth",
    "__version__",
    "certify_dataset",
    "load",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'certkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


class _Package(_types.ModuleType):
    """``certkit.train`` names both a submodule and the function most programs call. Importing the submodule
    binds its name on the package (the import system's ``setattr``); the package keeps the function there."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "train" and isinstance(value, _types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
