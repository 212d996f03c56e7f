"""Reproduce a published table at its own protocol, resumably: ``certkit reproduce fmnist-rs``.

A protocol names what the field published — dataset, architecture, training recipe, methods, noise levels,
certification settings — and where the published result files are. The driver trains each (method, sigma)
run, certifies it, and compares it row by row with the published file of the same method and sigma.

Every level resumes: a run interrupted mid-training continues from its last completed epoch
(``certkit train --resume``), and a certification continues after its last written row (re-running
``certkit certify`` with the same ``--out``). Each step runs as its own ``certkit`` process, so a crash or
a kill loses at most the epoch or row in flight, and one failed run does not stop the others; the call
then ends with the first failure's own error line and a non-zero status (2 when every failure was a
mistake for the user to fix). What the steps would refuse late (the device, the dataset's files, a
mistyped ``--certify-flags``) is refused before the first step starts.

Output layout under ``--out``::

    <method>-<sigma>/                  the training run (model.safetensors, model.json, metrics.jsonl)
    <method>-<sigma>/certify-n<N>-skip<K>.tsv   its certification (+ .json sidecar, .summary.json)
    reproduction-<protocol>.md         the comparison table (per protocol: fmnist-crt shares fmnist-rs's folder)
    reproduction-<protocol>.png        certkit's curves (solid) over the published ones (dashed)

The comparison is paired: certkit's certified subset (every ``skip``-th test image) is compared with the
published rows of the same images, so the difference's standard error reflects only how the two models
differ on those images, not which images were drawn.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from certkit.errors import CertkitError
from certkit.fileio import atomic_write_text, check_output

if TYPE_CHECKING:
    import numpy as np

    from certkit.results import Results

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
T = TypeVar("T")


@dataclass(frozen=True)
class Protocol:
    """One published experiment: what to train, how to certify, and the published files to compare with.

    ``published`` maps a certkit method name to the file stem of the published result of that method
    (``<published_dir>/sigma_<sigma>/<stem>.tsv``); a method compared against another method's published
    file (CRT students against SmoothMix) maps to that method's stem.
    """

    name: str
    description: str
    dataset: str
    arch: str
    methods: tuple[str, ...]
    sigmas: tuple[float, ...]
    published: dict[str, str]
    train_args: tuple[str, ...] = ()
    teacher_method: str | None = None
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    certify_skip: int = 10
    test_subset: int = 1000


# The Fashion-MNIST protocol of the published files (alinlab/smoothing-catrs data/fmnist, one LeNet per
# method and sigma): 60,000 training images, 90 epochs, SGD lr 0.01 x0.1 every 30 epochs, batch 256 — which is
# certkit's recipe for the MNIST family, so no training flag needs to be spelt out — and CERTIFY with
# n0 = 100, n = 100,000, alpha = 0.001 on the test set. Method hyperparameters take certkit's published
# defaults for (mnist family, sigma), the values of the same papers' command lines.
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            name="fmnist-rs",
            description="Fashion-MNIST LeNet, each randomized-smoothing training method at sigma 0.25/0.5/1.0",
            dataset="fashion-mnist",
            arch="lenet",
            methods=("gaussian", "smoothadv", "macer", "consistency", "smoothmix", "stability"),
            sigmas=(0.25, 0.5, 1.0),
            published={
                "gaussian": "cohen",
                "smoothadv": "salman",
                "macer": "macer",
                "consistency": "consistency",
                "smoothmix": "smoothmix",
                "stability": "stab",
            },
        ),
        Protocol(
            name="fmnist-crt",
            description="Fashion-MNIST: a SmoothMix LeNet teacher (the fmnist-rs run), then a CRT LeNet student "
            "per sigma, compared with the published SmoothMix LeNet",
            dataset="fashion-mnist",
            arch="lenet",
            methods=("smoothmix", "crt"),
            sigmas=(0.25, 0.5, 1.0),
            published={"smoothmix": "smoothmix", "crt": "smoothmix"},
            teacher_method="smoothmix",
        ),
    )
}


def sigma_tag(sigma: float) -> str:
    """``0.25`` -> ``"0.25"``, ``1.0`` -> ``"1.0"``: the same spelling as the published folders."""
    return repr(float(sigma))


def run_dir(out: Path, method: str, sigma: float) -> Path:
    return out / f"{method}-{sigma_tag(sigma)}"


def certify_path(out: Path, method: str, sigma: float, n: int, skip: int) -> Path:
    return run_dir(out, method, sigma) / f"certify-n{n}-skip{skip}.tsv"


def training_complete(run: Path) -> bool:
    """A run is complete when it has completed as many epochs as its recorded training config asks for."""
    meta = _run_meta(run)
    epochs = meta.get("train", {}).get("epochs")
    return epochs is not None and int(meta.get("epochs_completed", 0)) >= int(epochs)


def _run_meta(run: Path) -> dict:
    """The run's model.json, or {} before its first epoch is saved; a damaged one (the user's own output, which
    a crash or an edit may have left so) is named in one line."""
    from certkit.fileio import read_json

    path = run / "model.json"
    if not path.exists():
        return {}
    meta = read_json(path, "run metadata")
    train = meta.get("train", {}) if isinstance(meta, dict) else None
    cost = meta.get("cost", {}) if isinstance(meta, dict) else None
    total = cost.get("total", {}) if isinstance(cost, dict) else None
    if not (
        isinstance(train, dict)
        and isinstance(train.get("epochs", 0), int)
        and isinstance(meta.get("epochs_completed", 0), int)
        and isinstance(total, dict)
        and isinstance(total.get("seconds", 0), (int, float))
    ):
        raise CertkitError(f"{path}: not a run's metadata (its 'epochs_completed', 'train' or 'cost' is malformed)")
    return meta


@dataclass
class Plan:
    """The resolved selection of one ``reproduce`` call."""

    protocol: Protocol
    out: Path
    methods: tuple[str, ...]
    sigmas: tuple[float, ...]
    n: int
    skip: int
    device: str
    data_dir: str | None
    certify_flags: tuple[str, ...]
    train_only: bool = False
    report_only: bool = False


#: how long an interrupted step may take to stop cleanly before it is killed
STEP_STOP_SECONDS = 60


def _certkit(args: Sequence[str], log: Path) -> int:
    """Run one ``certkit`` step as its own process, its output appended to ``log`` (progress stays visible
    there for a batch job); returns the exit status. Interrupted (Ctrl-C, or SIGTERM, which reaches this
    process alone), it stops the step with SIGTERM, so that the step ends as it would on its own: its lock
    removed and every finished epoch or row kept for the next call to continue."""
    cmd = [sys.executable, "-m", "certkit", *args]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        step = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        try:
            return step.wait()
        except KeyboardInterrupt:
            step.terminate()
            try:
                step.wait(timeout=STEP_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                step.kill()
                step.wait()
            raise


def _say(message: str) -> None:
    print(f"reproduce: {message}", flush=True)


@dataclass(frozen=True)
class Failure:
    """A step that did not finish: 2 as its status when the fix is the user's (the step's own process
    said so with exit status 2), else 1; the message is one line naming the step and why."""

    status: int
    message: str


def _failed(status: int, message: str) -> Failure:
    """The failure, said as it happens (the steps after it still run)."""
    _say(message)
    return Failure(2 if status == 2 else 1, message)


def _step(args: Sequence[str], log: Path, what: str) -> Failure | None:
    """Run one step's ``certkit`` process; when it fails, the failure with the process's own error line
    (the last ``certkit: error:`` line it added to ``log``)."""
    start = log.stat().st_size if log.exists() else 0
    status = _certkit(args, log)
    if status == 0:
        return None
    with open(log, "rb") as f:
        f.seek(start)
        errors = [line for line in f.read().decode(errors="replace").splitlines() if line.startswith("certkit: error:")]
    why = errors[-1].removeprefix("certkit: error: ") if errors else f"exit status {status}"
    return _failed(status, f"{what} failed: {why} (log: {log})")


def train_step(plan: Plan, method: str, sigma: float) -> Failure | None:
    """Train the run of ``method`` at ``sigma``, or resume the one in OUT; None once it is complete.

    A finished run is resumed too: ``train --resume`` refuses a run trained under settings other than the
    protocol's (a subset, another recipe, ...), which would otherwise be reported as the protocol's, and
    trains no epoch more when they match.
    """
    run = run_dir(plan.out, method, sigma)
    args = [
        "train",
        "--dataset",
        plan.protocol.dataset,
        "--arch",
        plan.protocol.arch,
        "--method",
        method,
        "--sigma",
        str(sigma),
        "--out",
        str(run),
        "--device",
        plan.device,
        "--test-subset",
        str(plan.protocol.test_subset),
        *plan.protocol.train_args,
    ]
    if plan.data_dir:
        args += ["--data-dir", plan.data_dir]
    if method == "crt":
        teacher_method = plan.protocol.teacher_method or "smoothmix"
        teacher = run_dir(plan.out, teacher_method, sigma)
        if not training_complete(teacher):
            return _failed(
                2,
                f"training crt sigma={sigma}: its teacher {teacher} is not trained (the {teacher_method} run, "
                f"trained first when --methods selects {teacher_method} too)",
            )
        args += ["--teacher", str(teacher)]
    if (run / "train_state.safetensors").exists():
        args.append("--resume")
    doing = "checking the finished" if training_complete(run) else "training"
    _say(f"{doing} {method} sigma={sigma} -> {run} (log: {run}.log)")
    run.parent.mkdir(parents=True, exist_ok=True)
    what = f"training {method} sigma={sigma}"
    failure = _step(args, Path(f"{run}.log"), what)
    if failure is None and not training_complete(run):
        return _failed(1, f"{what} ended before its last epoch (log: {run}.log)")
    return failure


def certify_step(plan: Plan, method: str, sigma: float) -> Failure | None:
    """Certify (or continue certifying) the run of ``method`` at ``sigma``; None when it is done."""
    run = run_dir(plan.out, method, sigma)
    out = certify_path(plan.out, method, sigma, plan.n, plan.skip)
    from certkit.results import summary_path

    if summary_path(out).exists():
        return None
    p = plan.protocol
    # the user's flags first: argparse keeps a flag's last value, so reproduce's own settings always win
    args = [
        "certify",
        str(run),
        *plan.certify_flags,
        "--n0",
        str(p.n0),
        "--N",
        str(plan.n),
        "--alpha",
        str(p.alpha),
        "--skip",
        str(plan.skip),
        "--device",
        plan.device,
        "--out",
        str(out),
    ]
    if plan.data_dir:
        args += ["--data-dir", plan.data_dir]
    _say(f"certifying {method} sigma={sigma} -> {out}")
    return _step(args, Path(f"{out}.log"), f"certifying {method} sigma={sigma}")


@dataclass
class Row:
    """One line of the comparison table; ACRs and certified accuracies as exact fractions of the files' rows,
    which the table rounds down."""

    method: str
    sigma: float
    images: int
    acr: Fraction
    published_acr: Fraction
    published_acr_same_images: Fraction
    diff: float
    diff_se: float
    accuracy: list[Fraction]
    published_accuracy: list[Fraction]
    train_seconds: float | None
    partial: bool
    ledger: str | None = None


def compare(plan: Plan, method: str, sigma: float, published_dir: Path) -> Row | None:
    """certkit's certification of (method, sigma) against the published file, paired on the same images.

    Every figure of the row is over the images both files certified (the published full-test-set ACR is
    shown beside them); the difference's standard error is :meth:`certkit.report.Paired.acr_difference`'s.
    A file certified at other settings than the plan's (see :func:`check_certification`) is refused, not
    tabled under the plan's header.
    """
    from certkit.report import exact_acr, exact_mean, paired
    from certkit.results import read_results, summary_path

    mine_path = certify_path(plan.out, method, sigma, plan.n, plan.skip)
    stem = plan.protocol.published.get(method)
    theirs_path = published_dir / f"sigma_{sigma_tag(sigma)}" / f"{stem}.tsv"
    if not mine_path.exists() or stem is None or not theirs_path.exists():
        return None
    mine, theirs = read_results(mine_path), read_results(theirs_path)
    if len(mine) == 0 or mine.radius is None or theirs.radius is None:
        return None
    check_certification(mine, plan, sigma)
    pair = paired(mine, theirs)
    if not len(pair.rows_a):
        return None
    a, b = pair.certified()
    diff, se = pair.acr_difference()
    meta = _run_meta(run_dir(plan.out, method, sigma))
    seconds = meta.get("cost", {}).get("total", {}).get("seconds")
    return Row(
        method=method,
        sigma=sigma,
        images=len(a),
        acr=exact_mean(a),
        published_acr=exact_acr(theirs),
        published_acr_same_images=exact_mean(b),
        diff=diff,
        diff_se=se,
        accuracy=_accuracies(mine, pair.rows_a),
        published_accuracy=_accuracies(theirs, pair.rows_b),
        train_seconds=float(seconds) if seconds is not None else None,
        partial=not summary_path(mine_path).exists(),
        ledger=cost_ledger(method, sigma, meta.get("cost", {})),
    )


def _accuracies(res: Results, rows: np.ndarray) -> list[Fraction]:
    """Certified accuracy at each radius of ``RADII`` over ``rows`` of ``res``, as exact fractions."""
    from certkit.report import exact_mean

    assert res.radius is not None  # compare() takes CERTIFY files only
    correct, radius = res.correct[rows].astype(bool), res.radius[rows]
    return [exact_mean(correct & (radius >= r)) for r in RADII]


def check_certification(res: Results, plan: Plan, sigma: float) -> None:
    """Refuse a result file whose settings sidecar says it is not the certification the table's header
    describes (another sigma, n, n0, alpha, subset, dataset or split, one shard, adaptive sampling):
    tabled under the plan's header, its figures would claim another experiment's settings."""
    p = plan.protocol
    expected: dict[str, object] = {
        "sigma": sigma,
        "n": plan.n,
        "n0": p.n0,
        "alpha": p.alpha,
        "skip": plan.skip,
        "max": -1,
        "dataset": p.dataset,
        "split": "test",
        "shard": None,
        "adaptive": None,
    }
    got = res.settings
    differ = [f"{key} {got.get(key)!r}, not {want!r}" for key, want in expected.items() if got.get(key) != want]
    if differ:
        raise CertkitError(
            f"{res.path}: certified with {'; '.join(differ)} (this table's settings); certify it again "
            "(remove the file, or reproduce with another --out)"
        )


def cost_ledger(method: str, sigma: float, cost: dict) -> str | None:
    """For a run trained from a teacher (CRT), its training cost against the teacher's, by the clock and by
    image passes (which, unlike seconds, do not depend on what else the machine ran); None for other runs."""
    from certkit.experiments.crt_demo import image_passes

    student = cost.get("total")
    if not cost.get("ancestors") or not student:
        return None
    seconds, passes = float(student.get("seconds", 0.0)), image_passes(student)
    parts = []
    for teacher in cost["ancestors"]:
        total = teacher.get("total", {})
        t_seconds, t_passes = float(total.get("seconds", teacher.get("seconds", 0.0))), image_passes(total)
        parts.append(
            f"its teacher {teacher.get('arch', '?')} {teacher.get('method', '?')} {t_seconds:,.0f} s, "
            f"{t_passes:,} image passes: {_times(seconds, t_seconds)} by the clock, "
            f"{_times(passes, t_passes)} by image passes"
        )
    return f"{method} sigma={sigma:g}: {seconds:,.0f} s, {passes:,} image passes (teacher forwards included); " + (
        "; ".join(parts)
    )


def _times(student: float, teacher: float) -> str:
    """How many times less the student cost than its teacher, rounded down, or how many times more, rounded
    up: either way the student's cost is never printed better than it was measured."""
    from certkit.report import floor_ratio

    if student <= 0 or teacher <= 0:
        return "–"
    if teacher >= student:
        return f"{floor_ratio(teacher, student, 1)}x less"
    return f"{math.ceil(Fraction(student) / Fraction(teacher) * 10) / 10:.1f}x more"


def _every(skip: int) -> str:
    """``every 10th test image``, ``every 2nd``, ``every 3rd``; ``every test image`` for 1."""
    if skip == 1:
        return "every test image"
    suffix = "th" if skip % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(skip % 10, "th")
    return f"every {skip}{suffix} test image"


def table(rows: Sequence[Row], plan: Plan) -> str:
    """The comparison as Markdown: ACR, published ACR (full test set and same images), paired difference
    with its standard error (to nearest: a statistic, not a certified figure), and certified accuracy
    certkit / published at each radius of ``RADII``, the certified figures rounded down
    (:func:`certkit.report.floor_figure`)."""
    from certkit.report import floor_figure

    published_n = f" (the published files: n = {plan.protocol.n:,})" if plan.n != plan.protocol.n else ""
    head = (
        "| method | sigma | images | ACR | published ACR (all / same images) | difference ± SE | "
        + " | ".join(f"r={r:g}" for r in RADII)
        + " | train s |"
    )
    lines = [
        f"Protocol `{plan.protocol.name}`: {plan.protocol.description}. CERTIFY n0 = {plan.protocol.n0}, "
        f"n = {plan.n:,}{published_n}, alpha = {plan.protocol.alpha}, {_every(plan.skip)}. "
        "Certified accuracy in % as certkit / published, both on the same images.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        acc = " | ".join(
            f"{floor_figure(100 * x, 1)} / {floor_figure(100 * y, 1)}" for x, y in zip(r.accuracy, r.published_accuracy)
        )
        secs = f"{r.train_seconds:.0f}" if r.train_seconds is not None else "–"
        mark = " (partial)" if r.partial else ""
        lines.append(
            f"| {r.method}{mark} | {r.sigma:g} | {r.images} | {floor_figure(r.acr)} | "
            f"{floor_figure(r.published_acr)} / {floor_figure(r.published_acr_same_images)} | "
            f"{r.diff:+.3f} ± {_statistic(r.diff_se)} | {acc} | {secs} |"
        )
    ledgers = [r.ledger for r in rows if r.ledger]
    if ledgers:
        lines += ["", "Training cost against the teacher:", ""] + [f"- {line}" for line in ledgers]
    return "\n".join(lines) + "\n"


def _statistic(value: float) -> str:
    """A standard error to three decimals; "–" where it is undefined (one image, or one noise group)."""
    return f"{value:.3f}" if math.isfinite(value) else "–"


def plot(rows: Sequence[Row], plan: Plan, published_dir: Path, path: Path) -> None:
    """certkit's curves (solid) over the published ones of the same method and sigma (dashed, the same
    colour)."""
    from certkit.report import Style, plot_curves

    named: dict[str, Path] = {}
    styles: dict[str, Style] = {}
    for k, r in enumerate(rows):
        stem = plan.protocol.published[r.method]
        mine, theirs = f"certkit {r.method} σ={r.sigma:g}", f"published {stem} σ={r.sigma:g}"
        named[mine] = certify_path(plan.out, r.method, r.sigma, plan.n, plan.skip)
        named[theirs] = published_dir / f"sigma_{sigma_tag(r.sigma)}" / f"{stem}.tsv"
        styles[mine], styles[theirs] = (f"C{k % 10}", "-"), (f"C{k % 10}", "--")
    plot_curves(named, path, title=f"{plan.protocol.name}: certkit vs published", styles=styles)


def run(plan: Plan, published_dir: Path | None) -> tuple[str, list[Failure]]:
    """Train and certify everything in ``plan`` that is not done yet, then write the table of what is
    certified; returns the table (or why there is none) and the steps that failed."""
    failures: list[Failure] = []
    if not plan.report_only:  # a report reads what is there and writes only beside a finished certification
        plan.out.mkdir(parents=True, exist_ok=True)
        for sigma in plan.sigmas:
            for method in plan.methods:
                failure = train_step(plan, method, sigma)
                if failure is None and not plan.train_only:
                    failure = certify_step(plan, method, sigma)
                failures += [failure] if failure else []
    return report(plan, published_dir), failures


def report(plan: Plan, published_dir: Path | None) -> str:
    """Write the comparison table and plot of what is certified; returns the table (or why there is none)."""
    if published_dir is None:
        return "no published results folder given (--published); nothing to compare with\n"
    rows = [
        row
        for sigma in plan.sigmas
        for method in plan.methods
        if (row := compare(plan, method, sigma, published_dir)) is not None
    ]
    if not rows:
        return "no certification finished yet; nothing to compare\n"
    text = table(rows, plan)
    table_path, plot_path = (plan.out / f"reproduction-{plan.protocol.name}.{ext}" for ext in ("md", "png"))
    atomic_write_text(table_path, text)
    plot(rows, plan, published_dir, plot_path)
    return text + f"\ntable: {table_path}\nplot: {plot_path}\n"


def _choose(given: str | None, allowed: Sequence[T], what: str, parse: Callable[[str], T]) -> tuple[T, ...]:
    """The comma-separated values of ``--<what>``, each ``parse``d (so ``1`` is sigma ``1.0``), all of them
    among ``allowed``; all of ``allowed`` when none are given."""
    if not given:
        return tuple(allowed)
    chosen: list[T] = []
    unknown: list[str] = []
    for word in (v.strip() for v in given.split(",") if v.strip()):
        try:
            value = parse(word)
        except ValueError:  # not a value of that kind at all
            unknown.append(word)
            continue
        if value in allowed:
            chosen.append(value)
        else:
            unknown.append(word)
    if unknown or not chosen:
        raise CertkitError(
            f"--{what}: {', '.join(unknown) or 'none given'} not in this protocol ({', '.join(map(str, allowed))})"
        )
    return tuple(chosen)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``certkit reproduce`` flags."""
    p.add_argument(
        "protocol", choices=sorted(PROTOCOLS), help="; ".join(f"{k}: {v.description}" for k, v in PROTOCOLS.items())
    )
    p.add_argument(
        "--out", default="reproduce-out", help="folder for runs, certifications, table and plot (resumes what is there)"
    )
    p.add_argument("--methods", default=None, help="comma-separated subset of the protocol's methods (default: all)")
    p.add_argument("--sigmas", default=None, help="comma-separated subset of the protocol's sigmas (default: all)")
    p.add_argument(
        "--certify-skip", type=int, default=None, help="certify every K-th test image (default: 10, i.e. 1,000 images)"
    )
    p.add_argument(
        "--N", "--n", dest="n", type=int, default=None, help="estimation samples (default: the protocol's 100,000)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--data-dir", default=None, help="dataset folder (default: $CERTKIT_DATA, then the dataset's default)"
    )
    p.add_argument(
        "--published",
        default=None,
        help="folder of the published result files (<dir>/sigma_<s>/<method>.tsv); without it the runs are "
        "trained and certified but compared with nothing",
    )
    p.add_argument(
        "--certify-flags",
        default="",
        help="extra flags for certkit certify, written with '=', "
        "e.g. --certify-flags='--shared-noise 10 --channels-last'; not those reproduce sets itself (--n0, --N, "
        "--alpha, --skip, --device, --data-dir, --out)",
    )
    p.add_argument("--train-only", action="store_true", help="train (and resume) only; certify later")
    p.add_argument("--report-only", action="store_true", help="only compare what is already certified")


def plan_from_args(args: argparse.Namespace) -> Plan:
    protocol = PROTOCOLS[args.protocol]
    skip = protocol.certify_skip if args.certify_skip is None else args.certify_skip
    n = protocol.n if args.n is None else args.n
    if skip < 1 or n < 1:
        raise CertkitError(f"--certify-skip and --N must be >= 1 (got {skip} and {n})")
    return Plan(
        protocol=protocol,
        out=check_output(args.out, "--out", directory=True),
        methods=_choose(args.methods, protocol.methods, "methods", str),
        sigmas=_choose(args.sigmas, protocol.sigmas, "sigmas", float),
        n=n,
        skip=skip,
        device=args.device,
        data_dir=args.data_dir,
        certify_flags=tuple(args.certify_flags.split()),
        train_only=args.train_only,
        report_only=args.report_only,
    )


#: a value no certify flag is given by hand (an integer, so that --n0, --N and --skip parse it too)
_UNSET = "987654321"
#: the certify flags each step sets from reproduce's own settings, by their namespace name
_CERTIFY_SETTINGS = {
    "n0": "--n0",
    "n": "--N",
    "alpha": "--alpha",
    "skip": "--skip",
    "device": "--device",
    "data_dir": "--data-dir",
    "out": "--out",
}

#: the certify flags a reproduction may pass on: how fast it runs and which noise it draws (each speed option
#: is checked against the fp32 network's votes), never what it certifies
_CERTIFY_FREE = ("batch", "seed", "amp", "channels_last", "compile", "rng", "shared_noise", "debug")


def check_settings(plan: Plan, certify_namespace: Callable[[Sequence[str]], argparse.Namespace]) -> None:
    """Refuse before the first step what a step's process would refuse only when it starts, some after
    hours of training: the device, the dataset's files, and ``--certify-flags`` that certify does not take or
    that would override what reproduce sets (the protocol's n0 and alpha, --N, --certify-skip, the output)
    or change what the protocol certifies (its sigma, images, dataset, sampling).
    ``certify_namespace`` parses flags as ``certkit certify`` would (the CLI's, passed in: the CLI imports
    this module, not the other way round)."""
    from certkit.data import load_dataset
    from certkit.train import select_device

    select_device(plan.device)
    for split in ("train", "test"):
        load_dataset(plan.protocol.dataset, split, plan.data_dir)
    # whether a flag was given at all, in argparse's own reading (abbreviations included): values no one
    # types go first, and whatever the user's flags change among them they set
    unset = [tok for flag in _CERTIFY_SETTINGS.values() for tok in (flag, _UNSET)]
    try:
        given = certify_namespace([*unset, *plan.certify_flags])
    except CertkitError as e:
        raise CertkitError(f"--certify-flags {' '.join(plan.certify_flags)!r}: {e}") from None
    unset_values = certify_namespace(unset)
    overridden = [
        flag for dest, flag in _CERTIFY_SETTINGS.items() if getattr(given, dest) != getattr(unset_values, dest)
    ]
    if overridden:
        raise CertkitError(
            f"--certify-flags: {' and '.join(overridden)} set by reproduce itself (the protocol's n0 and alpha; "
            "--N, --certify-skip, --device, --data-dir and --out of reproduce)"
        )
    fixed = [
        "--" + dest.replace("_", "-")
        for dest, value in vars(given).items()
        if dest not in _CERTIFY_SETTINGS and dest not in _CERTIFY_FREE and value != getattr(unset_values, dest)
    ]
    if fixed:
        raise CertkitError(
            f"--certify-flags: {' and '.join(fixed)} would change what the protocol certifies; it takes only "
            + " ".join("--" + dest.replace("_", "-") for dest in _CERTIFY_FREE)
        )


def main(args: argparse.Namespace, certify_namespace: Callable[[Sequence[str]], argparse.Namespace]) -> int:
    """``certkit reproduce``; returns the exit status: 0 when every step finished, else that of the failures
    (see :class:`Failure`), after the table of what did and the first failure's line on stderr.
    ``certify_namespace``: see :func:`check_settings`."""
    if args.train_only and args.report_only:
        raise CertkitError("--train-only trains and --report-only only reports: give one of them")
    if args.report_only and (args.certify_flags or args.device != "auto"):
        given = [f for f, v in (("--certify-flags", args.certify_flags), ("--device", args.device != "auto")) if v]
        them = "them" if len(given) > 1 else "it"
        raise CertkitError(f"{' and '.join(given)}: --report-only trains and certifies nothing; drop {them}")
    plan = plan_from_args(args)
    published = Path(args.published) if args.published else None
    if published is not None and not published.is_dir():
        raise CertkitError(f"--published {published}: not a folder")
    if not plan.report_only:
        check_settings(plan, certify_namespace)
        if published is None and not plan.train_only:  # said now: the steps' output goes to their logs for hours
            print(
                "certkit: warning: no --published folder: the runs are trained and certified, and the table "
                "compares them with nothing",
                file=sys.stderr,
                flush=True,
            )
    text, failures = run(plan, published)
    print(text, end="")
    if not failures:
        return 0
    more = f" ({len(failures) - 1} more failed steps above)" if len(failures) > 1 else ""
    print(f"certkit: error: reproduce: {failures[0].message}{more}", file=sys.stderr)
    return 2 if all(failure.status == 2 for failure in failures) else 1


if __name__ == "__main__":  # python -m certkit.experiments.reproduce ...: the CLI's command, as it is
    import runpy

    sys.argv = ["certkit", "reproduce", *sys.argv[1:]]
    runpy.run_module("certkit", run_name="__main__")
