"""The model registry: architectures by name, and the wrappers a checkpoint can name.

Architecture modules register a body factory with :func:`register_model`; :func:`create_model` builds
``Sequential(Normalize(mean, std), body)``. A *wrapper* is a module built around such a model that carries
state of its own (GloRo's certifying network); its module registers a rebuild function under a key with
:func:`register_wrapper`, a checkpoint records that key as ``wrapper`` in ``model.json``, and
:mod:`certkit.checkpoint` rebuilds through the key without knowing the wrapper. This module imports no
model module: :mod:`certkit.models` loads them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from certkit.errors import CertkitError
from certkit.models.layers import Normalize

#: factory(num_classes, in_shape) -> body
Factory = Callable[[int, tuple[int, int, int]], nn.Module]
#: rebuild(model, meta) -> the wrapped model, its own buffers ready to receive the saved state
Rebuild = Callable[[Any, dict[str, Any]], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Factory
    description: str
    #: input shapes the architecture accepts; "any" = any
    family: str = "any"


_MODELS: dict[str, ModelSpec] = {}
_WRAPPERS: dict[str, Rebuild] = {}


def register_model(name: str, description: str, family: str = "any") -> Callable[[Factory], Factory]:
    def wrap(fn: Factory) -> Factory:
        _MODELS[name] = ModelSpec(name, fn, description, family)
        return fn

    return wrap


def register_wrapper(key: str, rebuild: Rebuild) -> None:
    _WRAPPERS[key] = rebuild


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise CertkitError(f"unknown architecture {name!r}; valid architectures: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def wrapper(key: str) -> Rebuild:
    if key not in _WRAPPERS:
        raise CertkitError(f"unknown model wrapper {key!r}; known: {', '.join(sorted(_WRAPPERS))}")
    return _WRAPPERS[key]


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
    return nn.Sequential(
        Normalize(mean if mean is not None else [0.0] * c, std if std is not None else [1.0] * c), body
    )
