"""Training objectives by name: ``get_objective("smoothmix")``, ``list_objectives()``.

Each method lives in its own module and registers itself with :func:`register_objective`.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from certkit.errors import CertkitError
from certkit.objectives.base import Objective, eval_mode, unwrap

_REGISTRY: dict[str, type[Objective]] = {}
T = TypeVar("T", bound=type[Objective])


def register_objective(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_objective(name: str) -> type[Objective]:
    _load_all()
    if name not in _REGISTRY:
        raise CertkitError(f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_objectives() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def registry() -> dict[str, type[Objective]]:
    _load_all()
    return dict(_REGISTRY)


def _load_all() -> None:
    # Importing the modules registers them; done lazily so `certkit.objectives.base` has no import cycle.
    import importlib
    import pkgutil

    import certkit.objectives as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"certkit.objectives.{info.name}")


__all__ = ["Objective", "eval_mode", "unwrap", "register_objective", "get_objective", "list_objectives", "registry"]
