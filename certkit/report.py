"""Metrics over result files: ACR, certified accuracy, abstain rate, tables and curves.

Definitions (Cohen et al. 2019; ACR as in MACER, Consistency, SmoothMix, CAT-RS and CRT):

* certified accuracy at r = (1/N) * #{rows with correct = 1 and radius >= r}, over *all* N rows, so an
  abstention counts as wrong; at r = 0 it is the smoothed classifier's accuracy;
* ACR = (1/N) * sum_i correct_i * radius_i (wrong and abstained rows contribute 0);
* abstain rate = fraction of rows with predict = -1.

Every function takes a :class:`certkit.results.Results` or a path to a result file::

    from certkit import report
    report.acr("cohen.tsv"), report.certified_accuracy("cohen.tsv", [0.0, 0.25, 0.5])
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Mapping, Sequence, Union, overload

import numpy as np

from certkit.errors import CertkitError
from certkit.fileio import atomic_write_bytes
from certkit.results import Results, read_results

ResultsLike = Union[Results, str, os.PathLike]


def load(results: ResultsLike) -> Results:
    """A :class:`Results` as is, or read from a path."""
    return results if isinstance(results, Results) else read_results(results)


def _radii_of(res: Results) -> np.ndarray:
    if res.radius is None:
        raise CertkitError(f"{res.path or 'results'}: a PREDICT file has no radii")
    return res.radius


def acr(results: ResultsLike) -> float:
    """Average certified radius over all rows: mean of correct * radius."""
    res = load(results)
    if len(res) == 0:
        return 0.0
    return float(np.mean(res.correct * _radii_of(res)))


@overload
def certified_accuracy(results: ResultsLike, radii: float) -> float: ...
@overload
def certified_accuracy(results: ResultsLike, radii: Sequence[float]) -> np.ndarray: ...
def certified_accuracy(results: ResultsLike, radii: float | Sequence[float]) -> float | np.ndarray:
    """Fraction of all rows certified correct at radius >= r, for each r in ``radii`` (or one float r).

    A PREDICT file answers only r = 0 (its accuracy).
    """
    res = load(results)
    scalar = np.ndim(radii) == 0
    grid = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    if len(res) == 0:
        out = np.zeros(len(grid))
    elif res.radius is None:
        if np.any(grid != 0):
            raise CertkitError(f"{res.path or 'results'}: a PREDICT file has no radii; only r = 0 is defined")
        out = np.full(len(grid), float(res.correct.mean()))
    else:
        correct = res.correct.astype(bool)
        out = np.array([np.mean(correct & (res.radius >= r)) for r in grid])
    return float(out[0]) if scalar else out


def abstain_rate(results: ResultsLike) -> float:
    res = load(results)
    return float(np.mean(res.predict == -1)) if len(res) else 0.0


def high_prob_accuracy(emp: float, alpha: float, rho: float, n: float) -> float:
    """Cohen et al.'s lower bound, holding with probability >= 1 - rho, on the true certified accuracy.

    Each row's certificate is wrong with probability <= alpha, so the empirical accuracy overstates the
    truth by at most alpha plus a Bernstein deviation term:
    emp - alpha - sqrt(alpha (1 - alpha) ln(1/rho) / N) - ln(1/rho) / (3N).
    The deviation term needs independent rows; for rows certified on shared noise in groups of G, pass
    N / G (the groups are independent, each contributing a wrong count in [0, G]).
    """
    if n <= 0:
        raise CertkitError("high_prob_accuracy needs N >= 1 rows")
    log_term = math.log(1.0 / rho)
    return emp - alpha - math.sqrt(alpha * (1.0 - alpha) * log_term / n) - log_term / (3.0 * n)


#: most radii in a table's default grid and on a plotted curve: a file's largest radius sets the grid's
#: end, and a grid step that would exceed these counts is widened instead of allocating without bound
MAX_TABLE_RADII = 64
MAX_PLOT_POINTS = 10_000


def _grid_step(largest: float, step: float, most: int) -> float:
    """``step``, or the smallest whole multiple of it that covers [0, largest] in at most ``most`` points."""
    return step * max(1, math.ceil(largest / step / (most - 1)))


def default_grid(results: ResultsLike | Sequence[ResultsLike], step: float = 0.25) -> list[float]:
    """0, step, 2*step, ... up to the largest radius present in the file(s), at most MAX_TABLE_RADII
    radii (the step is widened for files with larger radii)."""
    items = [results] if isinstance(results, (Results, str, os.PathLike)) else list(results)
    largest = max([_largest_radius(load(item)) for item in items] or [0.0])
    step = _grid_step(largest, step, MAX_TABLE_RADII)
    count = int(math.floor(largest / step + 1e-9))
    return [round(i * step, 10) for i in range(count + 1)]


def _largest_radius(res: Results) -> float:
    return float(res.radius.max()) if res.radius is not None and len(res) else 0.0


def mean_samples(results: ResultsLike) -> float | None:
    """Mean noisy samples per input (n0 + estimation samples drawn) of an adaptive run; None when the file
    has no ``samples`` column (a fixed-n run spends n0 + n on every input)."""
    res = load(results)
    if res.samples is None or len(res) == 0:
        return None
    return float(res.samples.mean())


def markdown_table(named_results: Mapping[str, ResultsLike], radii: Sequence[float] | None = None) -> str:
    """A Markdown table, one row per file: N, ACR, certified accuracy on the grid, abstain rate.

    When any file has a ``samples`` column (adaptive certification), a ``samples/input`` column after ACR
    gives its mean samples per input ("-" for the files without one).
    """
    loaded = {name: load(r) for name, r in named_results.items()}
    grid = list(radii) if radii is not None else default_grid(list(loaded.values()))
    with_samples = any(res.samples is not None for res in loaded.values())
    head = ["name", "N", "ACR"] + (["samples/input"] if with_samples else [])
    head += [f"r={r:.2f}" for r in grid] + ["abstain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in loaded.items():
        has_radius = res.radius is not None
        cells = [name.replace("|", "\\|"), str(len(res)), f"{acr(res):.3f}" if has_radius else "-"]
        if with_samples:
            samples = mean_samples(res)
            cells.append(f"{samples:.0f}" if samples is not None else "-")
        for r in grid:
            cells.append(f"{certified_accuracy(res, r):.3f}" if has_radius or r == 0 else "-")
        cells.append(f"{abstain_rate(res):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(
    named_results: Mapping[str, ResultsLike], path: str | os.PathLike, step: float = 0.01, title: str | None = None
) -> Path:
    """Certified accuracy against radius (grid step ``step``, widened to keep at most MAX_PLOT_POINTS points)
    for every file on one plot, saved atomically.

    The format follows the suffix of ``path`` (``.png``, ``.pdf``, ``.svg``).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    loaded = {name: load(r) for name, r in named_results.items()}
    largest = max([_largest_radius(res) for res in loaded.values()] or [0.0])
    step = _grid_step(largest, step, MAX_PLOT_POINTS)
    grid = np.arange(0.0, largest + step, step)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in loaded.items():
        if res.radius is None:
            continue
        ax.plot(grid, certified_accuracy(res, grid), label=f"{name} (ACR {acr(res):.3f})")
    ax.set_xlabel("radius (L2)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    buf = io.BytesIO()
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise CertkitError(f"{path}: cannot plot to a .{fmt} file; use .png, .pdf or .svg")
        fig.savefig(buf, format=fmt, dpi=150, bbox_inches="tight")
    finally:
        plt.close(fig)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise CertkitError(f"{path}: cannot write the plot ({e.strerror or e})") from None
    return path


def file_labels(files: Sequence[str | os.PathLike]) -> list[str]:
    """Short, distinct names for result files: the file stem, with as many parent folders as it takes to
    tell files apart (``sigma_0.25/cohen`` and ``sigma_0.5/cohen``); the same path twice gets ``#2``."""
    paths = [Path(f) for f in files]
    parts = [p.with_suffix("").parts if p.suffix == ".tsv" else p.parts for p in paths]
    labels = []
    for mine in parts:
        depth = 1
        while depth < len(mine) and any(
            other[-depth:] == mine[-depth:] and other != mine for other in parts
        ):
            depth += 1
        labels.append("/".join(mine[-depth:]))
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def report_files(
    files: Sequence[str | os.PathLike], radii: Sequence[float] | None = None, plot: str | os.PathLike | None = None
) -> str:
    """What ``certkit report`` prints: one Markdown table row per result file (certkit's or any code base's
    in the standard format) with N, ACR, mean samples per input for adaptive runs, certified accuracy at
    ``radii`` (default 0, 0.25, ... up to the largest radius present) and abstain rate.

    With ``plot``, certified accuracy against radius of every file goes on one image at that path, and the
    returned text ends with a line naming it. A file that is not a result file raises
    :class:`CertkitError` naming it.
    """
    if not files:
        raise CertkitError("report needs at least one result file")
    if radii is not None:
        radii = [float(r) for r in radii]
        bad = [r for r in radii if not (math.isfinite(r) and r >= 0)]
        if not radii or bad:
            raise CertkitError(f"radii must be finite and >= 0 (got {bad or 'none'})")
    named = {label: read_results(f) for label, f in zip(file_labels(files), files)}
    text = markdown_table(named, radii)
    predict_only = [name for name, res in named.items() if res.radius is None]
    if predict_only:
        text += f"\nPREDICT files (accuracy only, no radii): {', '.join(predict_only)}\n"
    if plot is not None:
        if len(predict_only) == len(named):
            raise CertkitError("--plot needs at least one CERTIFY result file (PREDICT files have no radii)")
        path = plot_curves(named, plot)
        text += f"\nplot: {path}\n"
    return text.rstrip("\n")
