"""Progress of long loops, for a person at a terminal and for a batch job alike.

On a terminal a tqdm bar redraws in place. Anywhere else (output redirected to a file, a SLURM job, CI) a
bar would either print nothing useful or fill the log with carriage returns, so instead one plain line goes
to the ``certkit`` logger every ``every`` seconds, and one at the end::

    certify r.tsv: 120/1,000 (12.0%), 3.21 img/s, ETA 0:04:34 | acc=0.833 acr=0.512

The interval defaults to 30 seconds and can be set with the environment variable
``CERTKIT_PROGRESS_SECONDS`` (``0`` logs every update).
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from certkit.errors import CertkitError

log = logging.getLogger("certkit")

DEFAULT_SECONDS = 30.0


def interval_from_env() -> float:
    """``CERTKIT_PROGRESS_SECONDS``, checked: a finite number >= 0."""
    raw = os.environ.get("CERTKIT_PROGRESS_SECONDS")
    if raw is None:
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise CertkitError(f"CERTKIT_PROGRESS_SECONDS must be a number of seconds >= 0 (got {raw!r})")
    return value


class Progress:
    """Counts ``done`` of ``total`` items; shows a bar on a terminal, else logs a line every ``every`` s.

    ``enabled=False`` (ranks other than 0) shows nothing. ``note`` passed to :meth:`update` is appended to
    the line (running accuracy and ACR for certification, the running loss for training).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        done: int = 0,
        unit: str = "img",
        enabled: bool = True,
        every: float | None = None,
        terminal: bool | None = None,
        final: bool = True,
    ) -> None:
        self.total, self.done, self.desc, self.unit = int(total), int(done), desc, unit
        self.enabled, self.final = enabled, final
        self.every = interval_from_env() if every is None else float(every)
        self._start_done = self.done
        self._start = self._last = time.monotonic()
        self._note: str | Callable[[], str] = ""
        self._logged: tuple[int, str] | None = None  # (done, note) of the last line logged: the final one once
        self._bar: Any = None
        if enabled and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, k: int = 1, note: str | Callable[[], str] = "") -> None:
        """Count ``k`` more done. ``note`` may be a function, called only when a line or the bar's postfix is
        drawn (at most once a second on a bar): training passes one that reads the running loss off the
        device, which would otherwise cost a synchronisation every batch."""
        self.done += k
        self._note = note or self._note
        if not self.enabled:
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(k)
            if note and (not callable(note) or now - self._last >= 1.0):
                self._last = now
                self._bar.set_postfix_str(self._note_text())
            return
        if now - self._last >= self.every:
            self._last = now
            self._log(now)

    def note(self, note: str) -> None:
        """Set the note that the next line (or the bar) shows, without logging a line: a resumed file's
        running score, before this session has done anything to report a rate of."""
        self._note = note
        if self._bar is not None:
            self._bar.set_postfix_str(note)

    def _state(self) -> tuple[int, str]:
        return self.done, self._note_text()

    def _log(self, now: float | None = None) -> None:
        self._logged = self._state()
        log.info(self.line(now))

    def _note_text(self) -> str:
        return self._note() if callable(self._note) else self._note

    def line(self, now: float | None = None) -> str:
        """The plain progress line: done/total, rate since this run started, ETA, and the last note."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = str(datetime.timedelta(seconds=round(left / rate))) if rate > 0 else "?"
        share = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done:,}/{self.total:,} ({share:.1f}%), {rate:.3g} {self.unit}/s, ETA {eta}"
        note = self._note_text()
        return f"{text} | {note}" if note else text

    def close(self) -> None:
        """Remove the bar, or log the final line (when anything was done and ``final`` is set, and the last
        line logged did not already say the same; training leaves it out, as its per-epoch line follows)."""
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.final and self.done > self._start_done and self._logged != self._state():
            self._log()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may have been replaced since)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_to_stderr(level: int = logging.INFO) -> None:
    """Send the ``certkit`` logger's records to stderr as ``certkit: message`` lines (what the CLI uses);
    idempotent, so calling it twice does not double every line."""
    if any(getattr(h, "_certkit", False) for h in log.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("certkit: %(message)s"))
    handler._certkit = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
