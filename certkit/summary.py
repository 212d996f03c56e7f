"""The ``summary.json`` beside a result file: the report's metrics of a finished run.

It sits above both :mod:`certkit.results` (the file format: rows, sidecar, resume, merge) and
:mod:`certkit.report` (metrics of a results table), so the file layer never reaches up into the metrics.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from certkit import report
from certkit.fileio import atomic_write_json
from certkit.results import Results, normalise_settings, read_results, shared_noise_group, summary_path
from certkit.smoothing.statistics import max_radius


def with_exact_radii(res: Results, exact: Mapping[int, float]) -> Results:
    """``res`` with the radius of every row whose index is in ``exact`` replaced by that value."""
    if res.radius is None or not exact:
        return res
    radius = np.array([exact.get(int(i), r) for i, r in zip(res.idx, res.radius)], dtype=np.float64)
    return dataclasses.replace(res, radius=radius)


def write_summary(
    results_path: str | os.PathLike,
    settings: Mapping[str, Any] | None = None,
    radii: Sequence[float] | None = None,
    rho: float = 0.001,
    path: str | os.PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
    exact_radii: Mapping[int, float] | None = None,
) -> dict[str, Any]:
    """Write ``<file>.summary.json`` beside a result file and return its content.

    Holds N, accuracy, ACR, certified accuracy on the radius grid (with a lower bound holding with
    probability >= 1 - ``rho``, :func:`certkit.report.high_prob_accuracy`; None with a note when vacuous),
    abstain rate, cost (total and per-image time, mean samples if known) and the
    run's parameters (``settings``, else the sidecar's), and any ``extra`` entries. A radius above
    sigma*Phi^-1(alpha^(1/n)) is impossible and is flagged as ``radius_bound_violated``.

    ``exact_radii`` (index -> radius) are the radii a run proved before the file floored them to six
    significant digits; rows certified in this session are summarised from them, rows from an earlier
    session (a resumed run) from the file. Both are sound: the floor only ever lowers a radius.
    """
    res = with_exact_radii(read_results(results_path), exact_radii or {})
    params = normalise_settings(settings) if settings is not None else res.settings
    n_rows = len(res)
    undefined = float("nan")  # a mean over no row (a shard with no image): null in the file, never 0
    summary: dict[str, Any] = {
        "file": Path(results_path).name,
        "kind": res.kind,
        "N": n_rows,
        "parameters": params,
        "abstain_rate": report.abstain_rate(res) if n_rows else undefined,
        "total_seconds": float(res.time_seconds.sum()),
        "seconds_per_image": float(res.time_seconds.mean()) if n_rows else undefined,
    }
    alpha = params.get("alpha")
    if res.kind == "certify":
        grid = list(radii) if radii is not None else report.default_grid(res)
        accuracies = report.certified_accuracy(res, grid) if n_rows else np.full(len(grid), undefined)
        summary["acr"] = report.acr(res) if n_rows else undefined
        summary["accuracy"] = report.certified_accuracy(res, 0.0) if n_rows else undefined
        summary["certified_accuracy"] = {report.radius_label(r): float(a) for r, a in zip(grid, accuracies)}
        if alpha is not None and n_rows:
            # with shared noise the wrong certificates of a group may coincide: the bound then counts groups
            group = max(1, int(params.get("shared_noise") or 1))
            # the groups the rows fall in, counted: a shard's rows (every k-th of the plan) fill them in part
            groups = (
                len(np.unique(shared_noise_group(res.idx, int(params.get("skip") or 1), group)))
                if group > 1
                else n_rows
            )
            bounds = {
                report.radius_label(r): report.high_prob_accuracy(float(a), float(alpha), rho, n_rows, group, groups)
                for r, a in zip(grid, accuracies)
            }
            summary["rho"] = rho
            if None in bounds.values():
                summary["certified_accuracy_high_prob"] = None
                summary["high_prob_note"] = (
                    f"omitted: with {n_rows} rows (groups of {group}) the bound on wrong certificates at "
                    f"alpha = {alpha}, rho = {rho} is 100%, which says nothing"
                )
            else:
                summary["certified_accuracy_high_prob"] = bounds
            if group > 1:
                summary["high_prob_effective_n"] = groups  # independent noise groups, what the bound counts
        if alpha is not None and params.get("sigma") and params.get("n") and n_rows:
            bound = max_radius(float(params["sigma"]), int(params["n"]), float(alpha))
            # certkit floors its radii, so its own files (they have a settings sidecar) may exceed the bound
            # only by the bound's own float rounding; another tool's file may round to nearest at 3
            # significant digits (the reference's {:.3}), so allow it half a unit in the third digit
            slack = 1e-9 if res.settings else 5e-3
            summary["max_radius"] = bound
            assert res.radius is not None  # a certify file has radii
            summary["radius_bound_violated"] = bool(np.any(res.radius > bound * (1 + slack)))
    else:
        summary["accuracy"] = float(res.correct.mean()) if n_rows else undefined
    if res.samples is not None and n_rows:
        summary["mean_samples"] = float(res.samples.mean())
    summary.update(dict(extra or {}))
    out = Path(path) if path is not None else summary_path(results_path)
    atomic_write_json(out, _finite(summary))
    return summary


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: turn them into None so the summary stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
