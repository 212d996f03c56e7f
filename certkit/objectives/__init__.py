"""The smoothing-training objectives, one module per method, and the :class:`Objective` interface.

The registry of every training method by name (these plus CRT and GloRo) is :mod:`certkit.methods`.
"""

from __future__ import annotations

from certkit.objectives.base import Hypers, Objective, eval_mode, hyper, unwrap
from certkit.objectives.consistency import Consistency
from certkit.objectives.crt import CRT
from certkit.objectives.gaussian import Gaussian
from certkit.objectives.macer import Macer
from certkit.objectives.smoothadv import SmoothAdv
from certkit.objectives.smoothmix import SmoothMix
from certkit.objectives.stability import Stability

__all__ = [
    "CRT",
    "Consistency",
    "Gaussian",
    "Hypers",
    "Macer",
    "Objective",
    "SmoothAdv",
    "SmoothMix",
    "Stability",
    "eval_mode",
    "hyper",
    "unwrap",
]
