"""Model zoo by name: ``create_model("resnet20", num_classes=10, in_shape=(3, 32, 32))``, ``list_models()``.

Every model certkit builds is ``nn.Sequential(Normalize(mean, std), body)``: input normalization is the
*first layer of the model*, so Gaussian noise is always added in [0, 1] pixel space and every sigma and
radius is in pixel units, whatever dataset statistics the body was trained with. The body keeps the layer
names of the field's reference code bases, so their checkpoints map onto it (see
:mod:`certkit.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from certkit.errors import CertkitError
from certkit.models.layers import Normalize

#: factory(num_classes, in_shape) -> body
Factory = Callable[[int, tuple[int, int, int]], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Factory
    description: str
    #: input shapes the architecture accepts; None = any
    family: str = "any"


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, description: str, family: str = "any") -> Callable[[Factory], Factory]:
    def wrap(fn: Factory) -> Factory:
        _REGISTRY[name] = ModelSpec(name, fn, description, family)
        return fn

    return wrap


def _load_all() -> None:
    import certkit.models.cifar_resnet  # noqa: F401
    import certkit.models.imagenet  # noqa: F401
    import certkit.models.lenet  # noqa: F401
    import certkit.models.wide_resnet  # noqa: F401
    import certkit.gloro.archs  # noqa: F401


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    _load_all()
    if name not in _REGISTRY:
        raise CertkitError(f"unknown architecture {name!r}; valid architectures: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(
    arch: str,
    num_classes: int,
    in_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """Build ``Sequential(Normalize(mean, std), body)``; ``mean``/``std`` None means identity normalization."""
    spec = model_spec(arch)
    c, h, w = (int(v) for v in in_shape)
    body = spec.factory(int(num_classes), (c, h, w))
    return nn.Sequential(Normalize(mean if mean is not None else [0.0] * c, std if std is not None else [1.0] * c), body)


__all__ = ["Normalize", "create_model", "list_models", "model_spec", "register_model"]
