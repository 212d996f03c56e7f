"""Extra records of the per-epoch training metrics: ``certkit train --log csv`` and ``--log tensorboard``.

``metrics.jsonl`` is always written; these are for the tools people already use to look at training.
``csv`` rewrites ``OUT/metrics.csv`` from the whole history after every epoch (atomically, like
``metrics.jsonl``, so a resumed run's file is whole and never has a line twice). ``tensorboard`` appends
one scalar per metric and epoch to event files in ``OUT`` through ``torch.utils.tensorboard``, which needs
the optional ``tensorboard`` package (``pip install 'certkit[tensorboard]'``). Epochs count from 1 in all
three, as on the console.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from certkit.errors import CertkitError
from certkit.fileio import atomic_write_text

FORMATS = ("csv", "tensorboard")
CSV = "metrics.csv"


class MetricLogs:
    """The writers named in ``formats`` for the run directory ``out``; :meth:`write` after every epoch."""

    def __init__(self, out: str | os.PathLike[str] | None, formats: Sequence[str] = ()) -> None:
        self.formats = tuple(dict.fromkeys(formats))
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise CertkitError(f"unknown --log {unknown[0]!r}; valid: {', '.join(FORMATS)}")
        if self.formats and out is None:
            raise CertkitError("--log needs a run directory (--out) to write to")
        self.out = Path(out) if out is not None else None
        self._board: Any = None
        if "tensorboard" in self.formats:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CertkitError(
                    "--log tensorboard needs the tensorboard package: pip install 'certkit[tensorboard]'"
                ) from None
            self._writer_class = SummaryWriter

    def write(self, history: Sequence[dict[str, Any]]) -> None:
        """Record the last epoch of ``history`` (and, for csv, rewrite the whole history)."""
        if not self.formats or not history:
            return
        assert self.out is not None
        if "csv" in self.formats:
            atomic_write_text(self.out / CSV, to_csv(history))
        if "tensorboard" in self.formats:
            if self._board is None:  # opened on first use, so a run that fails its checks leaves no event file
                self._board = self._writer_class(log_dir=str(self.out))
            record = history[-1]
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._board.add_scalar(key, value, global_step=int(record["epoch"]))
            self._board.flush()

    def continue_run(self, history: Sequence[dict[str, Any]]) -> list[str]:
        """On resume, keep up the records an earlier session of the run left in ``out``: a metrics.csv is
        rewritten with the history and from then on every epoch, as if ``csv`` had been given again (an old
        file would silently miss the new epochs), and TensorBoard gets the last saved epoch again. Returns what
        to tell the user: that the CSV is kept, or that TensorBoard files found there get no more epochs
        without ``--log tensorboard`` (its package may be missing)."""
        notes: list[str] = []
        if self.out is None:
            return notes
        if "csv" not in self.formats and (self.out / CSV).is_file():
            self.formats += ("csv",)
            notes.append(f"{self.out / CSV} is kept up to date, as the run wrote it before (--log csv)")
        if "tensorboard" not in self.formats and any(self.out.glob("events.out.tfevents.*")):
            notes.append(f"TensorBoard files in {self.out} get no more epochs without --log tensorboard")
        # the CSV rewritten whole, and TensorBoard given the last saved epoch once more: a kill between its save
        # and its scalars would have lost them, and the same values at the same step again change nothing
        self.write(history)
        return notes

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None


def to_csv(history: Sequence[dict[str, Any]]) -> str:
    """One row per epoch; columns: ``epoch`` first, then every other key in order of first appearance
    (a column an epoch lacks, such as a test metric of a run without a test split, is left empty)."""
    columns = list(dict.fromkeys(["epoch", *(k for record in history for k in record)]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()
