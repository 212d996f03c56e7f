"""Every training method by name: ``get_objective("smoothmix")``, ``list_objectives()``, ``build_objective``.

The registry sits above both homes of the objectives (:mod:`certkit.objectives` for the smoothing methods
and CRT, :mod:`certkit.gloro` for GloRo), so neither imports the other. A new method is one class with a
``name`` and its ``Params``, added to :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from certkit.errors import CertkitError
from certkit.gloro.model import GloroNet
from certkit.gloro.objective import Gloro
from certkit.objectives import CRT, Consistency, Gaussian, Macer, Objective, SmoothAdv, SmoothMix, Stability
from certkit.objectives.base import DEFAULT_FAMILY
from certkit.objectives.crt import GLORO_TEACHER

METHODS: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Gaussian, SmoothAdv, Macer, SmoothMix, Consistency, Stability, CRT, Gloro)
}


def get_objective(name: str) -> type[Objective]:
    if name not in METHODS:
        raise CertkitError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_objectives() -> list[str]:
    return sorted(METHODS)


def registry() -> dict[str, type[Objective]]:
    return dict(METHODS)


def build_objective(
    method: str | Objective,
    sigma: float | None = None,
    family: str = DEFAULT_FAMILY,
    hparams: Mapping[str, Any] | None = None,
    teacher: nn.Module | str | os.PathLike | None = None,
    teacher_model: nn.Module | None = None,
    num_classes: int | None = None,
    dataset: str | None = None,
    teacher_arch: str | None = None,
    teacher_normalization: str | None = None,
) -> Objective:
    """The objective ``method`` names, with the published defaults of ``family``/``sigma`` under ``hparams``.

    Only CRT takes a ``teacher``, ``teacher_model`` and, for a reference teacher file, ``teacher_arch`` and
    ``teacher_normalization`` (loaded, checked against ``num_classes`` and frozen by :class:`CRT`); an
    :class:`Objective` passes through unchanged, and then nothing else may be given.
    """
    teacher_given = any(t is not None for t in (teacher, teacher_model, teacher_arch, teacher_normalization))
    if isinstance(method, Objective):
        if hparams or teacher_given:
            raise CertkitError("pass hyperparameters and the teacher to the objective you built, not beside it")
        return method
    cls = get_objective(method)
    if cls is CRT:
        if isinstance(teacher, GloroNet):  # CRT refuses a teacher whose model.json says gloro; this one has none
            raise CertkitError(f"the teacher: {GLORO_TEACHER}")
        crt = CRT(
            sigma,
            teacher,
            teacher_model=teacher_model,
            teacher_arch=teacher_arch,
            teacher_normalization=teacher_normalization,
            num_classes=num_classes,
            dataset=dataset,
            family=family,
            **dict(hparams or {}),
        )
        if isinstance(teacher, nn.Module):
            warnings.warn(
                "the teacher is a module, without its model.json: the run records no teacher lineage or training "
                "cost and cannot check the teacher's sigma; pass the teacher's run directory instead (with "
                "teacher_model= for a module of your own) to record them",
                stacklevel=3,
            )
        return crt
    if teacher_given:
        raise CertkitError(f"--teacher and its options are only used by --method crt, not {method!r}")
    return cls(sigma, family=family, **dict(hparams or {}))


def describe_hyperparameters() -> str:
    """``certkit list hyperparameters``: every method's hyperparameters as ``train`` resolves them when no flag
    is given, per dataset family and sigma of its published table (the values model.json then records)."""
    lines = [
        "published defaults by dataset family (mnist: MNIST and Fashion-MNIST; cifar10: CIFAR-10, and ImageNet "
        "where it has no row of its own) and sigma (another sigma takes the nearest on a log scale); a flag "
        "overrides one, a --recipe may set several",
    ]
    for name in list_objectives():
        params = METHODS[name].Params
        if not params.field_specs():
            lines.append(f"{name}: no hyperparameters")
            continue
        lines.append(f"{name}:")
        # a method without a published table has one set of defaults, whatever the family and sigma
        untabled: dict[str, dict[Any, Any]] = {DEFAULT_FAMILY: {None: {}}}
        table: Mapping[str, Mapping[Any, Any]] = params.TABLE or untabled
        for family, rows in table.items():
            for sigma in rows:
                # resolved as train resolves them: values defined by others (SmoothMix's maxnorm_s) filled in
                values = dataclasses.asdict(params.resolve(name, family, sigma, {}))
                if not params.TABLE:
                    where = "every dataset and sigma"
                else:
                    where = family if sigma is None else f"{family}, sigma {sigma:g}"
                flags = " ".join(f"--{key.replace('_', '-')} {_shown(value)}" for key, value in values.items())
                lines.append(f"  {where}: {flags}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """A hyperparameter's value as its flag takes it."""
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)  # str, not a rounded format: the flag reads it back exactly
