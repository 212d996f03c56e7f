"""Model zoo by name: ``create_model("resnet20", num_classes=10, in_shape=(3, 32, 32))``, ``list_models()``.

Every model certkit builds is ``nn.Sequential(Normalize(mean, std), body)``: input normalization is the
*first layer of the model*, so Gaussian noise is always added in [0, 1] pixel space and every sigma and
radius is in pixel units, whatever dataset statistics the body was trained with. The body keeps the layer
names of the field's reference code bases, so their checkpoints map onto it (see
:mod:`certkit.checkpoint`).

The registry itself is :mod:`certkit.models.registry`; importing this package loads every architecture
module into it, the GloRo ones included.
"""

from __future__ import annotations

import certkit.gloro.archs  # noqa: F401  (registers the gloro-* architectures and the GloRo wrapper)
from certkit.models import cifar_resnet, imagenet, lenet, wide_resnet  # noqa: F401
from certkit.models.layers import Normalize
from certkit.models.registry import (
    ModelSpec,
    create_model,
    list_models,
    model_spec,
    register_model,
    register_wrapper,
    wrapper,
)

__all__ = [
    "ModelSpec",
    "Normalize",
    "create_model",
    "list_models",
    "model_spec",
    "register_model",
    "register_wrapper",
    "wrapper",
]
