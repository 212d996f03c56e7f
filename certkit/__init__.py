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

from certkit.checkpoint import load
from certkit.errors import CertkitError
from certkit.smoothing.runner import RunPlan, certify_dataset
from certkit.smoothing.smooth import Smooth
from certkit.smoothing.statistics import ABSTAIN, AdaptiveSchedule
from certkit.train import train

__all__ = [
    "ABSTAIN",
    "AdaptiveSchedule",
    "CertkitError",
    "RunPlan",
    "Smooth",
    "certify_dataset",
    "load",
    "train",
    "__version__",
]
