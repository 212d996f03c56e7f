"""Deterministic one-pass certification of a GloRo net over a dataset, in the smoothing TSV format.

What ``certkit certify RUN`` runs for a GloRo checkpoint (or with ``--method gloro``). Per input, with
the frozen *guaranteed* Lipschitz bound ``K_sub`` (``shared/reference/gloro.md`` §4):

* ``j`` = the first argmax of the logits, evaluated in float64, and ``K_ji = K_sub·‖w_j − w_i‖``;
* the float64 rounding is bounded from the hidden activations (:meth:`GloroNet.exact_forward`): the errors of
  logit ``k`` at the input and at any point ``r`` away add up to at most ``both_k + growth_k·r``. So every
  margin ``d_i = y_j − y_i`` is lowered by the allowance ``both_j + both_i`` plus the floor
  ``1e-9·(1 + max|y|)``, and its constant is ``K'_ji = K_ji + growth_j + growth_i``
  (:meth:`GloroNet.certify_logits`);
* certified radius ``min_{i≠j} d_i / K'_ji`` of the lowered margins; certified at ε iff every
  ``d_i > ε·K'_ji`` (ties never are).

Rows: ``idx label predict radius correct time certified_eps``. ``predict`` is ``j`` and ``radius`` its true
margin radius (0 when no positive margin survives the rounding allowance), so certified accuracy against the
radius, read off the file as for a smoothing run, starts at clean accuracy and is a GloRo curve that can be
drawn honestly beside a smoothing curve. ``certified_eps`` holds the decision at ε (1: certified, 0: ⊥,
rejected): VRA is the share of rows with ``correct`` and ``certified_eps`` both 1. ``radius`` is floored by
the writer like every certkit radius (:func:`certkit.results.format_radius`), and capped at the diameter of
``[0, 1]^d`` (an infinite radius, from identical head rows, is no more useful and is not valid TSV).
``time`` is each input's share of its batch's forward pass. Rows are flushed to disk once per batch.
Files written before this layout have ``predict`` -1 and radius 0 below ε and a ``clean_predict`` column;
:func:`file_metrics` reads both.

Everything row-independent is shared with the smoothing runner (:func:`certkit.smoothing.runner.run_planned`):
settings sidecar, resume (refused if ε, the bound or the weights differ), ``--skip/--max/--shard`` and the
``summary.json``, which here also holds clean accuracy, VRA, rejection rate, ε and the bound.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from certkit.errors import CertkitError
from certkit.gloro.model import BOTTOM, GloroNet, check_epsilon
from certkit.progress import interval_from_env
from certkit.report import floor_figure
from certkit.results import ResultWriter, planned_indices, read_results, refuse_foreign_companions
from certkit.smoothing.runner import Dataset, plan_settings, run_planned
from certkit.summary import write_summary

#: extra TSV column after the standard six: 1 when the row is certified at epsilon, else 0
EPS_COLUMN = "certified_eps"


def checked_constant(net: GloroNet) -> tuple[float, dict[str, Any]]:
    """The certification ``K_sub``: the frozen one, verified against the weights, or frozen now.

    A checkpoint's ``lipschitz_frozen`` buffer is only trusted if it is at least the guaranteed bound
    recomputed from the weights it came with; a smaller one (a tampered or foreign state dict) is refused.
    """
    began = time.perf_counter()
    if net.is_frozen:
        raw = net.verify_frozen()
        info = {
            "lipschitz_bound": net.certification_constant(),
            "lipschitz_guaranteed": raw,
            "source": "checkpoint (verified)",
        }
    else:
        info = net.freeze()
        info.pop("layers", None)
        info["source"] = "frozen now"
    info["seconds"] = time.perf_counter() - began
    return float(net.lipschitz_frozen), info


def certify_gloro_dataset(
    net: GloroNet,
    dataset: Dataset,
    *,
    out: str | Path,
    epsilon: float | None = None,
    batch_size: int = 1000,
    skip: int = 1,
    max_idx: int = -1,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    settings_extra: dict[str, Any] | None = None,
    resume: bool = True,
) -> dict[str, Any] | None:
    """Certify every planned index of ``dataset`` in one forward pass per batch; returns the summary.

    ``epsilon`` (None: the net's own) decides which points are rejected. The summary (None if the run
    ended incomplete) is the smoothing summary's layout (ACR, certified accuracy by radius) plus, under
    ``summary["gloro"]``, ``clean_accuracy``, ``vra``, ``rejection_rate``, ``epsilon``, the bound
    (``lipschitz``) and ``certify_seconds`` (forward passes of this session only, bound verification
    excluded).
    """
    if not isinstance(net, GloroNet):
        raise CertkitError(
            f"GloRo certification needs a GloroNet, not a {type(net).__name__} (is this a gloro checkpoint?)"
        )
    eps = check_epsilon(net.eval_epsilon if epsilon is None else epsilon)
    if batch_size < 1:
        raise CertkitError(f"batch size must be >= 1 (got {batch_size})")
    net.eval()
    k_sub, bound_info = checked_constant(net)
    device = net.lipschitz_frozen.device
    interval_from_env()  # a bad CERTKIT_PROGRESS_SECONDS is refused here, not once the result file is open
    refuse_foreign_companions(out)
    indices = planned_indices(len(dataset), skip, max_idx, shard)
    if indices:  # every batch is checked again (GloroNet.exact_logits); this one fails before any file
        shape = tuple(dataset[indices[0]][0].shape)
        if shape != net.in_shape:
            raise CertkitError(f"the dataset's images have shape {shape}; this GloRo net's bound is for {net.in_shape}")
    settings: dict[str, Any] = {
        "mode": "certify",
        "method": "gloro",
        "epsilon": eps,
        "lipschitz_bound": k_sub,
        **plan_settings(net, dataset, skip, max_idx, shard),
    }
    settings.update(dict(settings_extra or {}))
    tally = [0, 0, 0]  # rows, correct, certified-and-correct in the file (for the progress bar)

    def count(correct: bool, certified: bool) -> str:
        tally[0] += 1
        tally[1] += correct
        tally[2] += certified and correct
        return f"acc={floor_figure(Fraction(tally[1], tally[0]))} vra={floor_figure(Fraction(tally[2], tally[0]))}"

    def kept(rows: list[dict[str, str]]) -> str:  # a resumed file's rows, first
        note = ""
        for row in rows:
            note = count(row["correct"] == "1", row[EPS_COLUMN] == "1")
        return note

    @torch.no_grad()
    def process(writer: ResultWriter, group: list[int], xs: Tensor, labels: list[int]) -> str:
        began = time.perf_counter()
        decision, radius_t, pred_t = net.certify(xs.to(device), eps)
        pred, radius, certified = pred_t.tolist(), radius_t.tolist(), (decision != BOTTOM).tolist()
        elapsed = time.perf_counter() - began
        cap = math.sqrt(xs[0].numel())
        note = ""
        with writer.rows_together():  # one fsync per batch: a row costs microseconds here
            for idx, label, j, r, ok in zip(group, labels, pred, radius, certified):
                writer.write_certify(
                    idx, label, j, min(max(r, 0.0), cap), elapsed / len(group), **{EPS_COLUMN: int(ok)}
                )
                note = count(j == label, ok)
        return note

    complete = run_planned(
        out,
        "certify",
        settings,
        dataset,
        indices,
        batch_size,
        process,
        resume=resume,
        progress=progress,
        extra_columns=(EPS_COLUMN,),
        kept=kept,
    )
    if not complete:
        return None
    metrics: dict[str, Any] = file_metrics(out)
    # every row's share of its batch's forward pass, a resumed file's earlier rows included
    metrics.update(epsilon=eps, lipschitz=bound_info, certify_seconds=float(read_results(out).time_seconds.sum()))
    return write_summary(out, settings, radii=_grid(eps), extra={"gloro": metrics})


def _grid(eps: float) -> list[float]:
    """Radii of the summary's certified-accuracy table: 0, the quarter steps up to 2, and ε itself."""
    return sorted({0.0, *(0.25 * i for i in range(1, 9)), eps})


def file_metrics(path: str | Path) -> dict[str, float]:
    """Clean accuracy, VRA and rejection rate over every row of a GloRo result file (resumed rows too)."""
    res = read_results(path)
    if res.certified_eps is not None:
        clean, certified = res.predict == res.label, res.certified_eps == 1
        vra = clean & certified
    elif res.clean_predict is not None:  # the older layout: predict -1 below epsilon
        clean, certified, vra = res.clean_predict == res.label, res.predict != BOTTOM, res.correct == 1
    else:
        raise CertkitError(f"{path}: not a GloRo result file (no {EPS_COLUMN} column)")
    n = len(res)

    def share(count: int) -> float:  # of no row: undefined (null in the summary file), never 0
        return count / n if n else float("nan")

    return {
        "N": n,
        "clean_accuracy": share(int(clean.sum())),
        "vra": share(int(vra.sum())),
        "rejection_rate": share(int((~certified).sum())),
    }
