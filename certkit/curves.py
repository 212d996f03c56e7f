"""Training curves from runs' ``metrics.jsonl``: ``certkit curves RUN [RUN ...] --plot curves.png``.

Every run writes one JSON line per completed epoch (the epoch, its learning rate, seconds, the objective's
loss and its parts, training accuracy and, when a test subset is evaluated, clean and noisy test
accuracy). This module reads those lines back and draws loss and accuracy against the epoch, numbered from
1 as the console prints them, for one run or several side by side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from certkit.errors import CertkitError
from certkit.figures import pyplot, save_figure
from certkit.fileio import check_output, parse_json, read_text

METRICS = "metrics.jsonl"
#: accuracy-like keys drawn on the accuracy panel, in this order, with their legend names
ACCURACIES = (("acc", "train"), ("test_clean_acc", "test clean"), ("test_noisy_acc", "test noisy"))


def read_metrics(run: str | os.PathLike) -> list[dict[str, float]]:
    """The epochs of a run (its folder or its ``metrics.jsonl``), epoch numbered from 1.

    Files written before the numbering was unified count from 0; their first line says so (epoch 0), and
    every epoch is shifted by one.
    """
    path = Path(run)
    path = path / METRICS if path.is_dir() else path
    if not path.exists():
        raise CertkitError(f"{run}: no {METRICS} (is it a certkit run folder?)")
    if path.suffix != ".jsonl":
        raise CertkitError(f"{run}: not a certkit run folder (nor its {METRICS})")
    epochs = []
    for number, line in enumerate(read_text(path, METRICS).splitlines(), start=1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path}:{number}")
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise CertkitError(f"{path}:{number}: expected an object with an integer 'epoch'")
        # what the plot draws must be numbers: matplotlib would draw strings silently, as categories
        for key in ("loss", *(key for key, _ in ACCURACIES)):
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CertkitError(f"{path}:{number}: {key!r} is {value!r}, not a number")
        epochs.append(record)
    if not epochs:
        raise CertkitError(f"{path}: no completed epoch yet")
    shift = 1 if epochs[0]["epoch"] == 0 else 0
    return [{**e, "epoch": e["epoch"] + shift} for e in epochs]


def plot_training_curves(
    runs: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Loss (left) and accuracies (right) against the epoch for every run, saved atomically in the format
    of ``path``'s suffix (.png, .pdf, .svg). Runs are told apart by colour, the accuracies by line style."""
    check_output(path, "--plot")
    plt = pyplot()
    if labels is not None and len(labels) != len(runs):
        raise CertkitError(f"--labels gives {len(labels)} names for {len(runs)} runs")
    names = list(labels) if labels is not None else [Path(r).name or str(r) for r in runs]
    histories = [read_metrics(r) for r in runs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    styles = ("-", "--", ":")
    for k, (name, history) in enumerate(zip(names, histories)):
        color = f"C{k % 10}"
        epochs = [e["epoch"] for e in history]
        point = len(epochs) == 1  # a one-epoch run is a point, which a line alone never draws: a marker each
        ax_loss.plot(epochs, [e.get("loss") for e in history], color=color, marker="o" if point else None, label=name)
        for (key, what), style, marker in zip(ACCURACIES, styles, ("o", "s", "^")):
            if any(key in e for e in history):
                values = [e.get(key) for e in history]
                ax_acc.plot(
                    epochs, values, style, color=color, marker=marker if point else None, label=f"{name}: {what}"
                )
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # runs that recorded no accuracy leave that panel empty
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
