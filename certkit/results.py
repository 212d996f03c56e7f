"""Result files in the field's standard TSV format: writing (with resume), reading, merging.

Format (Cohen et al.'s ``certify.py``/``predict.py``, used by every later code base):

* CERTIFY header ``idx label predict radius correct time``; PREDICT header ``idx label predict correct time``,
  tab-separated; one row per image in index order.
* ``radius`` is *floored* to six significant digits (``0.799644``, ``1.0``, ``0.0`` on abstain). The
  reference prints ``{:.3}``, rounded to nearest, which can publish more than was proved (0.799644 as
  ``0.8``); a floor never does, and six digits make its cost invisible. Files of other tools are read as
  they are.
* ``time`` is ``str(datetime.timedelta(seconds=t))`` (``0:00:00.694666``); readers also accept plain
  seconds, as in Cohen's own CIFAR-10 files.
* certkit may add columns *after* those (``samples`` for adaptive runs), so other tools still read the file.

The header is written first and every row is flushed as it is written, so a file cut short by a crash is a
valid prefix and can be resumed. The run's settings live in a JSON sidecar ``<file>.json`` written
atomically; resuming or merging refuses files whose settings differ.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import numpy as np

from certkit.errors import CertkitError
from certkit.fileio import PidLock, atomic_write_json, atomic_write_text, check_output, read_json, require_regular

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
#: optional columns certkit knows how to read back
EXTRA_COLUMNS = ("samples",)
SIDECAR_FORMAT = "certkit-results/1"


def columns_for(kind: str) -> tuple[str, ...]:
    if kind == "certify":
        return CERTIFY_COLUMNS
    if kind == "predict":
        return PREDICT_COLUMNS
    raise CertkitError(f"result kind must be 'certify' or 'predict' (got {kind!r})")


def sidecar_path(path: str | os.PathLike) -> Path:
    """Settings of a result file: ``<file>.json`` next to it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def summary_path(path: str | os.PathLike) -> Path:
    """Metrics of a result file: ``<file without .tsv>.summary.json`` next to it."""
    path = Path(path)
    stem = path.name[: -len(".tsv")] if path.name.endswith(".tsv") else path.name
    return path.with_name(stem + ".summary.json")


#: significant digits of a published radius
RADIUS_DIGITS = 6


def floor_significant(value: float, digits: int = RADIUS_DIGITS) -> float:
    """``value`` rounded *down* to ``digits`` significant digits (0 for non-positive or NaN, inf stays).

    The floor is taken on the float's exact decimal expansion, so the decimal result d is <= value; the
    float nearest to d is then <= value too (rounding to nearest is monotone and value is a float), which
    is what makes ``float(format_radius(r)) <= r`` hold for every r.
    """
    if not value > 0:
        return 0.0
    if math.isinf(value):
        return value
    exact = Decimal(value)
    return float(exact.quantize(Decimal(1).scaleb(exact.adjusted() - digits + 1), rounding=ROUND_FLOOR))


def format_radius(r: float) -> str:
    """A radius as published: floored to six significant digits, in Python's shortest form (``1.0``, not ``1``)."""
    return repr(floor_significant(float(r)))


def format_time(seconds: float) -> str:
    return str(datetime.timedelta(seconds=float(seconds)))


def parse_time(text: str) -> float:
    """Seconds from ``[D day[s], ]H:MM:SS[.ffffff]`` or from plain seconds (``15.4``)."""
    text = text.strip()
    if ":" not in text:
        return float(text)
    days = 0.0
    if "day" in text:
        day_part, text = text.split(",", 1)
        days = float(day_part.split()[0])
    h, m, s = text.strip().split(":")
    return days * 86400.0 + int(h) * 3600.0 + int(m) * 60.0 + float(s)


def normalise_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists), so comparisons are like for like."""
    try:
        return json.loads(json.dumps(dict(settings), sort_keys=True))
    except (TypeError, ValueError) as e:
        raise CertkitError(f"result settings must be JSON-serialisable: {e}") from None


#: Settings that older certkit versions did not record, each with the recorded settings that still vouch for
#: the rows without it. A file that lacks such a key resumes when those match, and its sidecar then gains the
#: key, so later resumes check it in full. (``dataset_sha256``: the test set's name, split and size.
#: ``shard``: files merged by older versions lack it; nothing else need vouch, because a row's content does
#: not depend on the shard and resuming checks every row against the new run's plan.)
_RECORDED_LATER: dict[str, tuple[str, ...]] = {"dataset_sha256": ("dataset", "split", "dataset_size"), "shard": ()}


def _differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    skip = set(ignore)
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k, "<missing>") != b.get(k, "<missing>"))


def _is_own_sidecar(side: Path) -> bool:
    try:
        meta = json.loads(side.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == SIDECAR_FORMAT


def _is_own_summary(summary: Path, results_name: str) -> bool:
    try:
        meta = json.loads(summary.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("file") == results_name and meta.get("kind") in ("certify", "predict")


def refuse_foreign_companions(path: str | os.PathLike) -> None:
    """Refuse to write result file ``path`` when its settings file or summary path holds a file that is not
    a certkit settings file or summary of that name: ``--out runs/a/model`` would replace the run's own
    ``model.json``, ``--out notes`` a user's ``notes.json``. Whatever certkit wrote there itself is
    replaced (or resumed) as usual, ``--overwrite`` included; another file is the user's, never overwritten."""
    path = Path(path)
    side, summary = sidecar_path(path), summary_path(path)
    for companion, own, what in (
        (side, _is_own_sidecar, "settings file"),
        (summary, lambda p: _is_own_summary(p, path.name), "summary"),
    ):
        require_regular(companion, what)  # a directory or FIFO there is refused as such
        if companion.exists() and not own(companion):
            raise CertkitError(
                f"{path}: its {what} would be {companion}, which exists and is not certkit's {what} of "
                f"{path.name}; remove it or choose another output file"
            )


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of result file ``path`` (``{"format", "kind", "columns", "settings"}``)."""
    side = sidecar_path(path)
    if not side.exists():
        raise CertkitError(f"{path}: no settings file {side.name} beside it")
    meta = read_json(side, "settings file")
    if (
        not isinstance(meta, dict)
        or meta.get("format") != SIDECAR_FORMAT
        or meta.get("kind") not in ("certify", "predict")
        or not isinstance(meta.get("columns"), list)
        or not all(isinstance(c, str) for c in meta["columns"])
        or not isinstance(meta.get("settings"), dict)
    ):
        raise CertkitError(f"{side}: not a certkit settings file (format, kind, columns and settings expected)")
    return meta


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def write_sidecar(path: str | os.PathLike, kind: str, columns: Sequence[str], settings: Mapping[str, Any]) -> None:
    """Write the settings file beside result file ``path`` (the layout :func:`read_sidecar` reads), atomically."""
    side = {"format": SIDECAR_FORMAT, "kind": kind, "columns": list(columns), "settings": dict(settings)}
    atomic_write_json(sidecar_path(path), side)


#: settings whose key is not the flag that sets them, as a refused resume names them
_SETTING_NAMES = {
    "noise_block": "noise_block (set by a --batch below 100)",
    "noise_streams": "noise_streams (how each input's noise is seeded, changed 2026-11-29: certify a file of an "
    "older certkit again)",
    "speed_options": "speed_options (--amp, --channels-last, --compile)",
}


class ResultWriter:
    """Append-only writer of one result file, one flushed row per image, resumable.

    A new file gets its sidecar (atomically) and then its header. An existing file is resumed when
    ``resume`` is true: its sidecar's settings must equal ``settings`` (otherwise :class:`CertkitError`
    names the keys that differ), any trailing partial line left by a crash is cut off, and
    :attr:`done_indices` holds the indices already written so the caller can skip them. With
    ``resume=False`` an existing file is replaced and its summary removed. The file must be a regular file (or not
    exist yet), and
    ``<file>.lock`` (:class:`~certkit.fileio.PidLock`) keeps a second process from writing it until
    :meth:`close`.

    Use as a context manager::

        with ResultWriter(path, "certify", settings) as out:
            if idx not in out.done_indices:
                out.write_certify(idx, label, prediction, radius, seconds)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: str = "certify",
        settings: Mapping[str, Any] | None = None,
        resume: bool = True,
        extra_columns: Sequence[str] = (),
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.columns = columns_for(kind) + tuple(extra_columns)
        self.settings = normalise_settings(settings or {})
        self.done_indices: set[int] = set()
        #: the rows a resumed file already holds, each by column name (what a running score starts from)
        self.kept_rows: list[dict[str, str]] = []
        self._deferred = False
        header = "\t".join(self.columns) + "\n"
        require_regular(self.path, "result file")
        refuse_foreign_companions(self.path)  # the settings file and summary: regular files, certkit's own
        self._lock = PidLock(self.path).acquire()
        try:
            if resume and self.path.exists() and self._resumable(header):
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - the writer owns it; close() closes it
            else:
                summary_path(self.path).unlink(missing_ok=True)  # a replaced file's summary no longer holds
                write_sidecar(self.path, kind, self.columns, self.settings)
                self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - as above
                self._file.write(header)
                self._flush()
        except BaseException:
            self._lock.release()
            raise

    def _resumable(self, header: str) -> bool:
        """Check an existing file can be continued: every complete row valid and inside the plan. Only an
        unterminated last line (a crash mid-write) is cut; any other damage is refused. False = start afresh."""
        data = self.path.read_bytes()
        if not data or (header.encode().startswith(data) and not data.endswith(b"\n")):
            return False  # killed before the header was complete
        if not data.startswith(header.encode()):
            raise CertkitError(
                f"{self.path} exists and is not a {self.kind} result file with columns {' '.join(self.columns)}; "
                "choose another output or remove it"
            )
        meta = read_sidecar(self.path)
        if meta.get("kind") != self.kind or list(meta.get("columns", [])) != list(self.columns):
            raise CertkitError(f"{self.path} was written as a different kind of result file; cannot resume it")
        differing = _differing_keys(meta["settings"], self.settings)
        recorded_later = [
            k
            for k in differing
            if k in _RECORDED_LATER
            and k not in meta["settings"]
            and all(v in meta["settings"] for v in _RECORDED_LATER[k])
        ]
        differing = [k for k in differing if k not in recorded_later]
        if differing and differing != ["max"]:
            # max alone may change (checked below), so it is no reason here
            named = [_SETTING_NAMES.get(k, k) for k in differing if k != "max"]
            raise CertkitError(
                f"cannot resume {self.path}: settings differ in {', '.join(named)} "
                "(use the same settings, or another output file)"
            )
        complete = data[: data.rfind(b"\n") + 1]
        table = _load_table(self.path, keep_partial=False)
        done = {int(fields[0]) for _, fields in table.rows}
        if differing:
            self._check_new_max(done)  # before the plan check, whose message would not name --max
        plan = _Plan.of(self.settings, self.path)
        if plan is not None:
            plan.check(table, self.path)
        if differing or recorded_later:  # only once the rows are known to fit: a refused resume leaves the sidecar
            self._record_settings(meta)
        if len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
                f.flush()
                os.fsync(f.fileno())
        self.done_indices = done
        self.kept_rows = [dict(zip(self.columns, fields)) for _, fields in table.rows]
        return True

    def _check_new_max(self, done: set[int]) -> None:
        """Accept a new ``--max`` when the rows already written are all inside the new plan.

        Indices are certified in plan order and a plan with a larger ``max`` (same skip, same shard) starts
        with every index of the smaller one, so the file stays a prefix of the new plan and growing a run
        (first 500 images, later all of them) needs no recomputation. A smaller ``max`` that would leave rows
        outside the plan is refused.
        """
        new_max = self.settings.get("max")
        if not isinstance(new_max, int) or (new_max >= 0 and any(i >= new_max for i in done)):
            raise CertkitError(
                f"cannot resume {self.path}: it holds rows up to index {max(done, default=-1)}, beyond --max {new_max} "
                "(use a larger --max, or another output file)"
            )

    def _record_settings(self, meta: dict[str, Any]) -> None:
        """Record the current settings (a new ``max``, keys an older version did not record) in the sidecar."""
        atomic_write_json(sidecar_path(self.path), dict(meta, settings=self.settings))
        summary_path(self.path).unlink(missing_ok=True)  # it described the smaller run; rewritten when complete

    def _flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def _write_row(self, fields: Sequence[str], extra: Mapping[str, Any]) -> None:
        missing = [c for c in self.columns[len(fields) :] if c not in extra]
        if missing:
            raise ValueError(f"missing values for extra columns {missing}")
        row = list(fields) + [str(extra[c]) for c in self.columns[len(fields) :]]
        self._file.write("\t".join(row) + "\n")
        if not self._deferred:
            self._flush()

    @contextlib.contextmanager
    def rows_together(self) -> Iterator[None]:
        """Rows written inside share one flush + fsync at the end of the block.

        For certifiers whose rows take microseconds (GloRo's one forward pass per batch), where an fsync
        per row would cost more than the certification. A crash inside the block leaves a valid prefix,
        possibly with a partial last line, which resuming cuts off as usual.
        """
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False
            self._flush()

    def write_certify(self, idx: int, label: int, prediction: int, radius: float, seconds: float, **extra: Any) -> None:
        """One CERTIFY row; ``correct`` is derived (abstain, -1, is never correct)."""
        if self.kind != "certify":
            raise ValueError("write_certify on a predict writer")
        correct = int(prediction == label)
        fields = [
            str(int(idx)),
            str(int(label)),
            str(int(prediction)),
            format_radius(radius),
            str(correct),
            format_time(seconds),
        ]
        self._write_row(fields, extra)
        self.done_indices.add(int(idx))

    def write_predict(self, idx: int, label: int, prediction: int, seconds: float, **extra: Any) -> None:
        """One PREDICT row."""
        if self.kind != "predict":
            raise ValueError("write_predict on a certify writer")
        correct = int(prediction == label)
        fields = [str(int(idx)), str(int(label)), str(int(prediction)), str(correct), format_time(seconds)]
        self._write_row(fields, extra)
        self.done_indices.add(int(idx))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._lock.release()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    """The rows of one result file as arrays (full precision as printed; abstain is predict = -1).

    ``radius`` is None for PREDICT files; ``samples`` (adaptive certification), ``certified_eps`` (GloRo:
    1 when certified at its epsilon) and ``clean_predict`` (older GloRo files: the prediction before the
    check at epsilon) are None unless the file has that column.
    """

    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    radius: np.ndarray | None
    correct: np.ndarray
    time_seconds: np.ndarray
    kind: str = "certify"
    samples: np.ndarray | None = None
    clean_predict: np.ndarray | None = None
    certified_eps: np.ndarray | None = None
    path: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.idx)


def read_results(path: str | os.PathLike) -> Results:
    """Read a CERTIFY or PREDICT TSV (certkit's or any code base's that uses the standard format).

    A last line without its newline is kept only if it is a complete, valid row (a file being written may
    end mid-row). Every other row must be valid (see :func:`_check_row`) and every index must appear once;
    anything else raises :class:`CertkitError` naming the file and line.
    """
    table = _load_table(path)
    rows = [fields for _, fields in table.rows]
    column = {name: i for i, name in enumerate(table.header)}

    def ints(name: str) -> np.ndarray:
        return np.array([int(r[column[name]]) for r in rows], dtype=np.int64)

    result = Results(
        idx=ints("idx"),
        label=ints("label"),
        predict=ints("predict"),
        radius=np.array([float(r[column["radius"]]) for r in rows]) if table.kind == "certify" else None,
        correct=ints("correct"),
        time_seconds=np.array([parse_time(r[column["time"]]) for r in rows], dtype=np.float64),
        kind=table.kind,
        samples=ints("samples") if "samples" in column else None,
        clean_predict=ints("clean_predict") if "clean_predict" in column else None,
        certified_eps=ints("certified_eps") if "certified_eps" in column else None,
        path=str(path),
    )
    try:
        result.settings = read_sidecar(path)["settings"]
    except CertkitError:
        result.settings = {}  # a file from another code base has no sidecar; that is fine for reading
    return result


#: largest radius a row may hold: far above any certificate (sigma * 6.5 at the largest sample counts)
#: and small enough that a radius grid up to it stays a bounded number of points (see :mod:`certkit.report`)
MAX_RADIUS = 1e6
#: largest index a row may hold (an int64 with room to spare)
MAX_INDEX = 2**53
_INT = re.compile(r"-?[0-9]+")


@dataclass
class _Table:
    """A result file's header, kind and valid rows as (line number, fields)."""

    header: tuple[str, ...]
    kind: str
    rows: list[tuple[int, list[str]]]
    #: the unterminated last line when it is not a complete row (a crash mid-write); not in ``rows``
    partial: str


def _load_table(path: str | os.PathLike, keep_partial: bool = True) -> _Table:
    """Read and validate a result file. ``keep_partial=False`` (resume) never takes an unterminated last
    line as a row, even a complete-looking one: only a newline marks a row as written."""
    path = Path(path)
    require_regular(path, "result file")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CertkitError(f"{path}: no such result file") from None
    except IsADirectoryError:
        raise CertkitError(f"{path}: is a directory, not a result file") from None
    except UnicodeDecodeError:
        raise CertkitError(f"{path}: not a result file (not UTF-8 text)") from None
    except OSError as e:
        raise CertkitError(f"{path}: cannot read it ({e.strerror or e})") from None
    lines = text.split("\n")
    partial = lines.pop() if lines else ""  # "" when the file ends with a newline
    header = tuple(lines[0].rstrip("\r").split("\t")) if lines else tuple(partial.split("\t"))
    if header[: len(CERTIFY_COLUMNS)] == CERTIFY_COLUMNS:
        kind = "certify"
    elif header[: len(PREDICT_COLUMNS)] == PREDICT_COLUMNS:
        kind = "predict"
    else:
        raise CertkitError(
            f"{path}: not a result file (expected header 'idx label predict radius correct time' "
            "or 'idx label predict correct time')"
        )
    column = {name: i for i, name in enumerate(header)}
    rows: list[tuple[int, list[str]]] = []
    first_line: dict[int, int] = {}
    numbered = [(number, line.rstrip("\r")) for number, line in enumerate(lines[1:], start=2)]
    if partial and lines and keep_partial:
        last = partial.split("\t")
        if len(last) == len(header) and _check_row(last, column, kind) is None:
            numbered.append((len(lines) + 1, partial))
            partial = ""
    for number, line in numbered:
        fields = line.split("\t")
        problem = (
            f"expected {len(header)} columns, found {len(fields)}"
            if len(fields) != len(header)
            else _check_row(fields, column, kind)
        )
        if problem is None and int(fields[0]) in first_line:
            problem = f"index {int(fields[0])} appears again (first on line {first_line[int(fields[0])]})"
        if problem is not None:
            raise CertkitError(f"{path}:{number}: {problem}")
        first_line[int(fields[0])] = number
        rows.append((number, fields))
    return _Table(header, kind, rows, partial if lines else "")


def _check_row(fields: Sequence[str], column: Mapping[str, int], kind: str) -> str | None:
    """What is wrong with one row of the right width, or None: idx an int >= 0, label >= 0, predict >= -1
    (abstain), correct 0 or 1 and equal to predict == label, radius finite in [0, MAX_RADIUS] (0 for an
    abstention), time a duration, extra counts ints."""

    def integer(name: str, low: int) -> bool:
        text = fields[column[name]]
        return bool(_INT.fullmatch(text)) and low <= int(text) <= MAX_INDEX

    for name, low in (("idx", 0), ("label", 0), ("predict", -1)):
        if not integer(name, low):
            return f"{name} must be an integer >= {low} (got {fields[column[name]]!r})"
    if fields[column["correct"]] not in ("0", "1"):
        return f"correct must be 0 or 1 (got {fields[column['correct']]!r})"
    # correct is derived in every format (prediction == label; an abstention is never correct): a row that
    # says otherwise would count a wrong or abstained image as certified
    label, predict = int(fields[column["label"]]), int(fields[column["predict"]])
    if fields[column["correct"]] != str(int(predict == label)):
        return f"correct must be {int(predict == label)} for predict {predict} and label {label}"
    if "certified_eps" in column and fields[column["certified_eps"]] not in ("0", "1"):
        return f"certified_eps must be 0 or 1 (got {fields[column['certified_eps']]!r})"
    for name in ("samples", "clean_predict"):
        if name in column and not integer(name, -1):
            return f"{name} must be an integer (got {fields[column[name]]!r})"
    try:
        seconds = parse_time(fields[column["time"]])
        radius = float(fields[column["radius"]]) if kind == "certify" else 0.0
    except (ValueError, OverflowError):
        return f"bad time or radius in {fields!r}"
    if not (math.isfinite(seconds) and seconds >= 0):
        return f"time must be a finite duration >= 0 (got {fields[column['time']]!r})"
    if not (math.isfinite(radius) and 0 <= radius <= MAX_RADIUS):
        return f"radius must be finite, in [0, {MAX_RADIUS:g}] (got {fields[column['radius']]!r})"
    if predict == -1 and radius != 0:
        return f"an abstention (predict -1) certifies no radius (got {fields[column['radius']]!r})"
    return None


@dataclass(frozen=True)
class _Plan:
    """The indices a run planned (see :func:`planned_indices`), tested by arithmetic, so a sidecar that
    claims a huge dataset costs nothing: position p of the unsharded list holds index p * skip."""

    stop: int
    skip: int
    part: int = 0
    parts: int = 1

    @classmethod
    def of(cls, settings: Mapping[str, Any], source: str | os.PathLike) -> _Plan | None:
        """The plan the settings record, None when they record none (a library run without a dataset)."""
        part, parts = _shard_of(settings, source) or (0, 1)
        if "dataset_size" not in settings:
            return None
        size, skip, max_idx = settings["dataset_size"], settings.get("skip", 1), settings.get("max", -1)
        if not all(_bounded_int(v) for v in (size, skip, max_idx)) or size < 0 or skip < 1:
            raise CertkitError(f"{sidecar_path(source)}: malformed plan settings (dataset_size, skip, max, shard)")
        return cls(size if max_idx < 0 else min(max_idx, size), skip, part, parts)

    def __contains__(self, i: int) -> bool:
        return 0 <= i < self.stop and i % self.skip == 0 and (i // self.skip) % self.parts == self.part

    def positions(self) -> range:
        return range(self.part, -(-self.stop // self.skip), self.parts)

    def check(self, table: _Table, path: str | os.PathLike) -> None:
        """Refuse the first row whose index is outside this plan."""
        for number, fields in table.rows:
            if int(fields[0]) not in self:
                raise CertkitError(
                    f"{path}:{number}: index {fields[0]} is not in the run's plan "
                    "(dataset_size, skip, max, shard in its settings file)"
                )


def _bounded_int(value: Any) -> bool:
    """An int (not a bool) whose size an index may have: a settings file cannot make a plan's arithmetic
    overflow or a merge allocate a list of its length."""
    return isinstance(value, int) and not isinstance(value, bool) and -1 <= value <= MAX_INDEX


def _shard_of(settings: Mapping[str, Any], source: str | os.PathLike) -> tuple[int, int] | None:
    """The ``[i, k]`` shard the settings record (0 <= i < k), None for an unsharded run."""
    shard = settings.get("shard")
    if shard is None:
        return None
    if not (isinstance(shard, list) and len(shard) == 2 and all(_bounded_int(v) for v in shard)) or not (
        0 <= shard[0] < shard[1]
    ):
        raise CertkitError(f"{sidecar_path(source)}: malformed shard {shard!r} (expected [i, k], 0 <= i < k)")
    return shard[0], shard[1]


# ----------------------------------------------------------------------------------------------------------
# Planned indices, merging, summaries
# ----------------------------------------------------------------------------------------------------------


def planned_indices(
    dataset_size: int, skip: int = 1, max_idx: int = -1, shard: Sequence[int] | None = None
) -> list[int]:
    """Indices a run visits: 0, skip, 2*skip, ... below ``max_idx`` (-1 = all), as the reference.

    With ``shard = (i, k)`` only positions p (in that list) with p % k == i: shards interleave, so each gets
    a fair share of easy and hard images and every shard finishes at about the same time.
    """
    # the bounds a settings file may record (_bounded_int): what is refused on resume is refused here first
    if not 1 <= skip <= MAX_INDEX:
        raise CertkitError(f"skip must be an integer from 1 to {MAX_INDEX} (got {skip})")
    if max_idx != -1 and not 1 <= max_idx <= MAX_INDEX:
        raise CertkitError(
            f"max must be -1 (all) or an index from 1 to {MAX_INDEX}, the first one not planned (got {max_idx})"
        )
    stop = dataset_size if max_idx < 0 else min(max_idx, dataset_size)
    indices = list(range(0, stop, skip))
    if shard is not None:
        i, k = int(shard[0]), int(shard[1])
        if not (1 <= k <= MAX_INDEX and 0 <= i < k):
            raise CertkitError(f"shard must be i/k with 0 <= i < k <= {MAX_INDEX} (got {i}/{k})")
        indices = indices[i::k]
    return indices


def shared_noise_group(idx: Any, skip: int, group: int) -> Any:
    """The shared-noise group of planned dataset index ``idx`` (an int or an array of them): its position in
    the unsharded plan over the group size ``group``, so that a group is the same whatever the shard, resume
    point or batch (the key the certifier seeds a group's stream with, and what a comparison of its rows
    counts as one cluster)."""
    return idx // skip // group


def resume_into_shards(
    out_path: str | os.PathLike,
    shard_paths: Sequence[str | os.PathLike],
    kind: str,
    settings: Mapping[str, Any],
    extra_columns: Sequence[str] = (),
) -> None:
    """Resume the result file ``out_path`` as a run split K ways (a torchrun certification, whose rank r
    writes ``shard_paths[r]`` and rank 0 merges them back into ``out_path``): ``out_path`` is opened as the
    unsharded run with ``settings`` would open it (the same checks, refusals and repairs), and its rows go to
    the shard files whose plan holds them, each with the sidecar it would have as shard r of K, so that only
    the missing rows are computed. A shard file that exists already (left by an interrupted split run) is
    left as it is: its own resume checks it."""
    parts = len(shard_paths)
    with ResultWriter(out_path, kind, settings, resume=True, extra_columns=extra_columns) as whole:
        skip = int(whole.settings.get("skip") or 1)
        table = _load_table(out_path, keep_partial=False)
        for part, path in enumerate(shard_paths):
            if Path(path).exists():
                continue
            rows = [fields for _, fields in table.rows if (int(fields[0]) // skip) % parts == part]
            write_sidecar(path, kind, whole.columns, normalise_settings(dict(settings, shard=[part, parts])))
            atomic_write_text(path, "\t".join(whole.columns) + "\n" + "".join("\t".join(f) + "\n" for f in rows))


def merge_results(
    shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, overwrite: bool = True
) -> Path:
    """Join shard files into one result file in index order, with one merged sidecar: the shards' settings
    with ``shard`` null, as the unsharded run records them, so the merged file resumes and grows as that run's.

    Refuses an output that is one of the shards, shards whose settings differ (other than ``shard``), rows
    outside a shard's plan, overlapping indices, an incomplete set of shards (i/k for every i < k) and,
    when the settings say which indices were planned, any missing row. Only valid, complete rows are copied.
    An existing ``out_path`` is replaced (its summary removed) only with ``overwrite``; its settings file and
    summary path must not hold files certkit did not write (:func:`refuse_foreign_companions`).
    """
    if not shard_paths:
        raise CertkitError("merge needs at least one shard file")
    out_path = check_output(out_path, "merge --out")  # before Path(), which reads "" as "."
    for path in shard_paths:
        if out_path.exists() and Path(path).exists() and os.path.samefile(out_path, path):
            raise CertkitError(f"merge --out {out_path} is one of its input shards; choose another output file")
    if not overwrite and out_path.exists():
        raise CertkitError(f"merge --out {out_path} exists; pass --overwrite to replace it, or choose another file")
    for path in shard_paths:
        if not Path(path).exists():
            raise CertkitError(f"{path}: no such result file")
    refuse_foreign_companions(out_path)
    metas = [read_sidecar(p) for p in shard_paths]
    tables = [_load_table(p, keep_partial=False) for p in shard_paths]  # a cut last line is not a row
    first = metas[0]
    for path, meta, table in zip(shard_paths, metas, tables):
        if (meta["kind"], tuple(meta["columns"])) != (table.kind, table.header):
            raise CertkitError(
                f"{path}: its header ({' '.join(table.header)}) is not the {meta['kind']} columns its settings "
                f"file names ({' '.join(meta['columns'])})"
            )
    for path, meta in zip(shard_paths[1:], metas[1:]):
        if meta["kind"] != first["kind"] or meta["columns"] != first["columns"]:
            raise CertkitError(f"cannot merge {path} with {shard_paths[0]}: different kinds of result file")
        differing = _differing_keys(first["settings"], meta["settings"], ignore=("shard",))
        if differing:
            raise CertkitError(f"cannot merge {path} with {shard_paths[0]}: settings differ in {', '.join(differing)}")
    shards = [_shard_of(m["settings"], p) for m, p in zip(metas, shard_paths)]
    sharded = [s for s in shards if s is not None]
    if sharded:
        if len(sharded) != len(shards):
            raise CertkitError("cannot merge sharded and unsharded result files")
        counts = {k for _, k in sharded}
        if len(counts) != 1:
            raise CertkitError(f"cannot merge shards of different shard counts {sorted(counts)}")
        k = counts.pop()
        have = sorted(i for i, _ in sharded)
        if len(have) != k or any(i != j for j, i in enumerate(have)):
            present = set(have)
            missing = [str(j) for j in itertools.islice((j for j in range(k) if j not in present), 10)]
            listed = ", ".join(missing + ["..."] * (len(missing) == 10)) or "none"
            raise CertkitError(f"shards must be 0..{k - 1} of {k}, each once (got {have}; missing {listed})")
    seen: dict[int, str] = {}
    for path, meta, table in zip(shard_paths, metas, tables):
        plan = _Plan.of(meta["settings"], path)
        if plan is not None:
            plan.check(table, path)
        for _, fields in table.rows:
            i = int(fields[0])
            if i in seen:
                raise CertkitError(f"index {i} appears in both {seen[i]} and {path}")
            seen[i] = str(path)
    settings = dict(first["settings"])
    if "shard" in settings:
        settings["shard"] = None
    plan = _Plan.of(settings, shard_paths[0])
    if plan is not None:
        positions = plan.positions()  # every row seen is in the plan, so a shorter count means a gap
        if len(positions) > len(seen):
            gap = next(p * plan.skip for p in positions if p * plan.skip not in seen)
            raise CertkitError(
                f"{len(positions) - len(seen)} planned indices are missing from the shards (first: {gap}); "
                "finish every shard first"
            )
    # rows: each file's valid rows verbatim (no re-formatting), ordered by index
    rows = sorted((int(fields[0]), "\t".join(fields)) for table in tables for _, fields in table.rows)
    header = "\t".join(first["columns"]) + "\n"
    summary_path(out_path).unlink(missing_ok=True)  # a replaced file's summary no longer holds
    write_sidecar(out_path, first["kind"], first["columns"], settings)
    atomic_write_text(out_path, header + "".join(line + "\n" for _, line in rows))
    return out_path
