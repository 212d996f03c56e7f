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

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import overload

import numpy as np

from certkit.errors import CertkitError
from certkit.figures import pyplot, save_figure
from certkit.fileio import check_output
from certkit.results import Results, read_results, shared_noise_group
from certkit.smoothing.statistics import max_radius

ResultsLike = Results | str | os.PathLike


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


@dataclass(frozen=True)
class Paired:
    """Two result files on the images both certified: ``rows_a[k]`` and ``rows_b[k]`` are the same image."""

    a: Results
    b: Results
    rows_a: np.ndarray
    rows_b: np.ndarray

    def certified(self) -> tuple[np.ndarray, np.ndarray]:
        """correct x radius of each common image, in ``a`` and in ``b``."""
        a = self.a.correct[self.rows_a].astype(bool) * _radii_of(self.a)[self.rows_a]
        b = self.b.correct[self.rows_b].astype(bool) * _radii_of(self.b)[self.rows_b]
        return a, b

    def acr_difference(self) -> tuple[float, float]:
        """ACR of ``a`` minus ACR of ``b`` over the common images, and the standard error of that mean of
        per-image differences (NaN where undefined: no image, or one noise group).

        Images certified on shared noise (a file's ``shared_noise`` G: G consecutive planned images vote on
        one noise stream) have correlated errors, so the error is the cluster-robust one over the groups
        that either file shared; with independent rows every image is its own cluster and it is the usual
        sd / sqrt(n). It is small when the same image is about as hard for both models."""
        first, second = self.certified()
        d = first - second
        if not len(d):
            return float("nan"), float("nan")
        clusters = _union_of_partitions(_noise_groups(self.a, self.rows_a), _noise_groups(self.b, self.rows_b))
        sums = np.bincount(clusters, weights=d - d.mean())
        c = len(sums)
        se = math.sqrt(c / (c - 1) * float(np.sum(sums**2))) / len(d) if c > 1 else float("nan")
        return float(np.mean(d)), se


def _noise_groups(res: Results, rows: np.ndarray) -> np.ndarray:
    """The shared-noise group each of ``rows`` was certified in (as the certifier keys it: planned position
    over G), or the row's own image where the file shared no noise."""
    idx = res.idx[rows].astype(np.int64)
    group = int(res.settings.get("shared_noise") or 1)
    return shared_noise_group(idx, int(res.settings.get("skip") or 1), group) if group > 1 else idx


def _union_of_partitions(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Cluster numbers 0..c-1 of the finest partition coarser than both labelings: rows that share a label
    in either are in one cluster."""
    parent = list(range(len(first)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for labels in (first, second):
        seen: dict[int, int] = {}
        for i, label in enumerate(labels.tolist()):
            parent[root(i)] = root(seen.setdefault(label, i))
    return np.unique([root(i) for i in range(len(first))], return_inverse=True)[1]


def paired(a: ResultsLike, b: ResultsLike) -> Paired:
    """``a`` and ``b`` restricted to the dataset indices both contain, in ``a``'s order; two files that give
    one index different labels are not of the same images, which is an error."""
    first, second = load(a), load(b)
    pos = {int(i): k for k, i in enumerate(second.idx)}
    rows_a = np.array([k for k, i in enumerate(first.idx) if int(i) in pos], dtype=np.int64)
    rows_b = np.array([pos[int(first.idx[k])] for k in rows_a], dtype=np.int64)
    differ = np.flatnonzero(first.label[rows_a] != second.label[rows_b])
    if len(differ):
        k = int(differ[0])
        raise CertkitError(
            f"{first.path or 'results'} and {second.path or 'results'} give image {int(first.idx[rows_a[k]])} "
            f"labels {int(first.label[rows_a[k]])} and {int(second.label[rows_b[k]])} ({len(differ)} such "
            "images): they are not certifications of the same images"
        )
    return Paired(first, second, rows_a, rows_b)


@overload
def certified_accuracy(results: ResultsLike, radii: float) -> float: ...
@overload
def certified_accuracy(results: ResultsLike, radii: Sequence[float] | np.ndarray) -> np.ndarray: ...
def certified_accuracy(results: ResultsLike, radii: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
    """Fraction of all rows certified correct at radius >= r, for each r in ``radii`` (or one float r).

    A PREDICT file answers only r = 0 (its accuracy).
    """
    res = load(results)
    scalar = np.ndim(radii) == 0
    grid = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    out = np.array([np.mean(_certified_rows(res, r)) if len(res) else 0.0 for r in grid])
    return float(out[0]) if scalar else out


def _certified_rows(res: Results, r: float) -> np.ndarray:
    """Which rows are certified correct at radius >= r; a PREDICT file answers only r = 0 (its correct rows)."""
    correct = res.correct.astype(bool)
    if res.radius is not None:
        return correct & (res.radius >= r)
    if r != 0:
        raise CertkitError(f"{res.path or 'results'}: a PREDICT file has no radii; only r = 0 is defined")
    return correct


def abstain_rate(results: ResultsLike) -> float:
    res = load(results)
    return float(np.mean(res.predict == -1)) if len(res) else 0.0


def false_certificate_bound(alpha: float, rho: float, n: int, group: int = 1, groups: int | None = None) -> float:
    """An upper bound, holding with probability >= 1 - rho, on the fraction of the n rows whose certificate is
    wrong, when each is wrong with probability <= alpha (at most 1/2).

    Independent rows (``group`` 1): the wrong count is stochastically below Binomial(n, alpha), so its exact
    (1 - rho) quantile k gives k / n; this is tighter than any deviation inequality. Rows certified on
    shared noise in groups of at most ``group`` rows, ``groups`` of them (default ceil(n / group), their
    fewest; a shard's or a resumed file's rows may fill their groups only in part): group g's wrong count
    divided by ``group`` lies in [0, 1] with mean mu_g, the means sum to at most alpha n / group, and the
    groups are independent. Each variance is at most mu_g (1 - mu_g), an increasing, concave function below
    1/2, so the sum of the variances is at most V = m mu (1 - mu) with m = ``groups`` and mu = alpha n /
    (group m), and Bernstein's inequality bounds the fraction by
    alpha + (group / n) (sqrt(2 V ln(1/rho)) + 2 ln(1/rho) / 3).
    """
    if n < 1:
        raise CertkitError("a high-probability bound needs N >= 1 rows")
    if not 0 < rho < 1 or not 0 <= alpha <= 0.5:
        raise CertkitError(f"a high-probability bound needs 0 < rho < 1 and 0 <= alpha <= 1/2 (got {rho}, {alpha})")
    if group == 1:
        from scipy.stats import binom

        k = int(binom.ppf(1.0 - rho, n, alpha))
        while k < n and binom.sf(k, n, alpha) > rho:  # ppf's 1 - rho is itself rounded; make sure
            k += 1
        return k / n
    fewest = math.ceil(n / group)
    m = fewest if groups is None else groups
    if not fewest <= m <= n:
        raise CertkitError(f"{n} rows in groups of at most {group} form {fewest} to {n} groups, not {m}")
    mean = alpha * n / (group * m)
    log_term = math.log(1.0 / rho)
    return alpha + group / n * (math.sqrt(2.0 * m * mean * (1.0 - mean) * log_term) + 2.0 * log_term / 3.0)


def high_prob_accuracy(
    emp: float, alpha: float, rho: float, n: int, group: int = 1, groups: int | None = None
) -> float | None:
    """A lower bound on the true certified accuracy holding with probability >= 1 - rho (Cohen et al. 2019,
    with a sound deviation term): ``emp`` minus :func:`false_certificate_bound`, clipped at 0.

    The empirical certified accuracy counts every wrong certificate as right, so the truth is at least
    ``emp`` minus the fraction of wrong certificates. Returns None when that fraction's bound is >= 1, where
    the bound says nothing for any accuracy (only for tiny N).
    """
    deduction = false_certificate_bound(alpha, rho, n, group, groups)
    return None if deduction >= 1.0 else max(0.0, emp - deduction)


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
    count = math.floor(largest / step + 1e-9)
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


def floor_figure(value: Fraction | float, places: int = 3) -> str:
    """``value`` written with ``places`` decimals, rounded *down* on its exact value: a certified figure
    printed to nearest could claim more than was proved (2 of 3 certified would read 0.667). Give a ratio of
    counts as a :class:`~fractions.Fraction` (:func:`exact_accuracy`, :func:`exact_acr`): the float 0.29 is
    0.28999..., whose floor would understate 29 of 100 as 0.289."""
    scaled = math.floor(Fraction(value) * 10**places)
    sign, digits = ("-" if scaled < 0 else ""), str(abs(scaled)).rjust(places + 1, "0")
    return f"{sign}{digits[:-places] or '0'}.{digits[-places:]}" if places else f"{scaled}"


def floor_ratio(numerator: Fraction | float, denominator: Fraction | float, places: int = 2) -> str:
    """``numerator / denominator`` rounded down on its exact value, "–" where it is undefined (a denominator
    that is not positive, a value that is not finite): a ratio that carries a claim (a speedup, a cost
    saved, the share of ACR a cheaper model keeps) printed to nearest could claim more than was measured."""
    if not (math.isfinite(numerator) and math.isfinite(denominator) and denominator > 0):
        return "–"
    return floor_figure(Fraction(numerator) / Fraction(denominator), places)


def count_ratio(value: float, total: int | None = None) -> Fraction:
    """A count ratio k/N that was stored as a float (an accuracy in a run's metrics, GloRo's VRA in its
    summary), recovered exactly, so that :func:`floor_figure` rounds the count down and not the float's
    error: 848/1000 stored as 0.84799999... would otherwise print 84.7%. With ``total`` (N) known, k is the
    nearest count; else the fraction of denominator at most 10^6 nearest to ``value``."""
    if total:
        return Fraction(round(value * total), total)
    return Fraction(value).limit_denominator(10**6)


def exact_mean(values: np.ndarray) -> Fraction:
    """The mean of ``values`` (floats or booleans) as an exact fraction (0 for none), for :func:`floor_figure`:
    a float mean can round above the mean of the values."""
    return sum(map(Fraction, values.tolist()), Fraction(0)) / max(len(values), 1)


def exact_acr(results: ResultsLike) -> Fraction:
    """:func:`acr` as an exact fraction of the file's radii."""
    res = load(results)
    return exact_mean(res.correct * _radii_of(res)) if len(res) else Fraction(0)


def exact_accuracy(results: ResultsLike, r: float) -> Fraction:
    """:func:`certified_accuracy` at one radius as a fraction of counts."""
    res = load(results)
    return exact_mean(_certified_rows(res, r)) if len(res) else Fraction(0)


def radius_label(r: float) -> str:
    """``r`` written so that it reads back as exactly ``r``: ``{r:g}`` (as the summary's keys) where that is
    exact, else the shortest decimal that round-trips. A column's figures are computed at ``r`` itself, so a
    rounded label would claim them at another radius: 0.126 headed ``0.13`` would claim more than was proved.
    """
    r = float(r)  # a float32 grid value is the float64 it widens to, the radius the column is computed at
    short = f"{r:g}"
    return short if float(short) == r else repr(r)


def _table(
    named_results: Mapping[str, ResultsLike], radii: Sequence[float] | None
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the report table: N, ACR, mean samples per input when any file is adaptive,
    certified accuracy on the grid, abstain rate ("-" where a file has no such figure, and for every figure
    of a file without rows: a mean over no image is undefined, not 0)."""
    loaded = {name: load(r) for name, r in named_results.items()}
    grid = list(radii) if radii is not None else default_grid(list(loaded.values()))
    with_samples = any(res.samples is not None for res in loaded.values())
    head = ["name", "N", "ACR"] + (["samples/input"] if with_samples else [])
    head += [f"r={radius_label(r)}" for r in grid] + ["abstain"]
    rows = []
    for name, res in loaded.items():
        if not len(res):
            rows.append([name, "0"] + ["-"] * (len(head) - 2))
            continue
        has_radius = res.radius is not None
        cells = [name, str(len(res)), floor_figure(exact_acr(res)) if has_radius else "-"]
        if with_samples:
            samples = mean_samples(res)
            cells.append(f"{samples:.0f}" if samples is not None else "-")
        for r in grid:
            cells.append(floor_figure(exact_accuracy(res, r)) if has_radius or r == 0 else "-")
        cells.append(f"{abstain_rate(res):.3f}")
        rows.append(cells)
    return head, rows


def markdown_table(named_results: Mapping[str, ResultsLike], radii: Sequence[float] | None = None) -> str:
    """The report table in Markdown, one row per file (see :func:`report_files`)."""
    head, rows = _table(named_results, radii)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([row[0].replace("|", "\\|"), *row[1:]]) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"}


def latex_table(named_results: Mapping[str, ResultsLike], radii: Sequence[float] | None = None) -> str:
    """The same table as a LaTeX ``tabular`` (booktabs rules), ready to paste into a paper."""
    head, rows = _table(named_results, radii)

    def tex(cell: str) -> str:
        return "".join(_LATEX_SPECIAL.get(c, c) for c in cell)

    lines = [
        "\\begin{tabular}{l" + "r" * (len(head) - 1) + "}",
        "\\toprule",
        " & ".join(tex(h) for h in head) + " \\\\",
        "\\midrule",
        *(" & ".join(tex(c) for c in row) + " \\\\" for row in rows),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Curve:
    """What one file contributes to a plot: its name (the key it came under), its certified-accuracy
    curve, the largest radius its settings allow (``sigma * PhiInv(alpha^(1/n))``, where its curve must fall
    to 0; None when the file does not say its sigma, n and alpha) and a legend label that carries those
    settings."""

    name: str
    label: str
    radii: np.ndarray
    accuracy: np.ndarray
    max_radius: float | None


def curves(named_results: Mapping[str, ResultsLike], step: float = 0.01) -> list[Curve]:
    """The curves of every CERTIFY file on one shared radius grid (PREDICT files have none)."""
    loaded = {name: load(r) for name, r in named_results.items()}
    certify = {name: res for name, res in loaded.items() if res.radius is not None}
    largest = max([_largest_radius(res) for res in certify.values()] or [0.0])
    settings = {name: res.settings for name, res in certify.items()}
    bounds = {
        name: max_radius(float(s["sigma"]), int(s["n"]), float(s["alpha"]))
        if all(s.get(k) for k in ("sigma", "n", "alpha"))
        else None
        for name, s in settings.items()
    }
    largest = max([largest] + [b for b in bounds.values() if b is not None])
    step = _grid_step(largest, step, MAX_PLOT_POINTS)
    grid = np.arange(0.0, largest + 2 * step, step)
    out = []
    for name, res in certify.items():
        s = settings[name]
        about = [f"ACR {floor_figure(exact_acr(res))}"]
        about += [
            f"{sym}={s[k]:,}" if k == "n" else f"{sym}={s[k]:g}"
            for k, sym in (("sigma", "σ"), ("n", "n"), ("alpha", "α"))
            if s.get(k)
        ]
        about.append(f"N={len(res):,}")
        label = f"{name} ({', '.join(about)})"
        out.append(Curve(name, label, grid, certified_accuracy(res, grid), bounds[name]))
    return out


#: one per curve in turn; dotted is left out, as it marks the sampling limits
LINE_STYLES: tuple[str | tuple[int, tuple[int, ...]], ...] = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)))
#: a curve's colour and line style, as matplotlib takes them
Style = tuple[str, str | tuple[int, tuple[int, ...]]]


def plot_curves(
    named_results: Mapping[str, ResultsLike],
    path: str | os.PathLike,
    step: float = 0.01,
    title: str | None = None,
    styles: Mapping[str, Style] | None = None,
) -> Path:
    """Certified accuracy against radius for every file on one plot, saved atomically; the format follows
    the suffix of ``path`` (``.png``, ``.pdf``, ``.svg``).

    Every curve has its own colour *and* line style (or the one ``styles`` gives its name), so identical
    curves stay visible, and a dotted vertical mark of its colour at the largest radius its n allows: a
    curve that drops to 0 there has hit the sampling limit, not the model's. The legend goes below the
    axes, where it hides no curve.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = curves(named_results, step)
    for k, curve in enumerate(drawn):
        color, style = (styles or {}).get(curve.name, (f"C{k % 10}", LINE_STYLES[k % len(LINE_STYLES)]))
        ax.plot(curve.radii, curve.accuracy, color=color, ls=style, label=curve.label, lw=1.6)
        if curve.max_radius is not None:
            ax.axvline(curve.max_radius, color=color, ls=":", lw=1.0, alpha=0.8)
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    marked = any(curve.max_radius is not None for curve in drawn)
    ax.legend(
        fontsize="small",
        title="dotted: largest radius n allows" if marked else None,
        title_fontsize="small",
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
    )
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def file_labels(files: Sequence[str | os.PathLike]) -> list[str]:
    """Short, distinct names for result files: the file stem, with as many parent folders as it takes to
    tell files apart (``sigma_0.25/cohen`` and ``sigma_0.5/cohen``); the same path twice gets ``#2``."""
    paths = [Path(f) for f in files]
    parts = [p.with_suffix("").parts if p.suffix == ".tsv" else p.parts for p in paths]
    labels = []
    for mine in parts:
        depth = 1
        while depth < len(mine) and any(other[-depth:] == mine[-depth:] and other != mine for other in parts):
            depth += 1
        labels.append("/".join(mine[-depth:]))
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def report_files(
    files: Sequence[str | os.PathLike],
    radii: Sequence[float] | None = None,
    plot: str | os.PathLike | None = None,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    latex: bool = False,
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
    if plot is not None:
        check_output(plot, "--plot")
    if radii is not None:
        radii = [float(r) for r in radii]
        bad = [r for r in radii if not (math.isfinite(r) and r >= 0)]
        if not radii or bad:
            raise CertkitError(f"radii must be finite and >= 0 (got {bad or 'none'})")
    if labels is not None and len(labels) != len(files):
        raise CertkitError(f"--labels gives {len(labels)} names for {len(files)} files")
    names = list(labels) if labels is not None else file_labels(files)
    if len(set(names)) != len(names):
        raise CertkitError(f"--labels must be distinct (got {', '.join(names)})")
    named = {label: read_results(f) for label, f in zip(names, files)}
    text = (latex_table if latex else markdown_table)(named, radii)
    predict_only = [name for name, res in named.items() if res.radius is None]
    if predict_only:
        text += f"\nPREDICT files (accuracy only, no radii): {', '.join(predict_only)}\n"
    if plot is not None:
        if len(predict_only) == len(named):
            raise CertkitError("--plot needs at least one CERTIFY result file (PREDICT files have no radii)")
        path = plot_curves(named, plot, title=title)
        text += f"\nplot: {path}\n"
    return text.rstrip("\n")
