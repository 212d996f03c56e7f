"""``certkit reproduce``: protocols train, certify, resume at every level and compare paired with published files."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from certkit.cli import main
from certkit.data import load_dataset
from certkit.errors import CertkitError
from certkit.experiments import reproduce as rp
from certkit.results import read_results, summary_path
from helpers import make_idx_dataset, train_argv


def _write_published(folder: Path, labels: Sequence[int], seed: int = 1) -> Path:
    """A published-style result file (reference format: radius to 3 decimals) for indices 0..n-1 of a test set
    with these labels."""
    rng = np.random.default_rng(seed)
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for i, label in enumerate(labels):
        correct = int(rng.random() < 0.7)
        predict = label if correct else (label + 1) % 10
        lines.append(f"{i}\t{label}\t{predict}\t{rng.random() * 0.9:.3f}\t{correct}\t0:00:00.5")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cohen.tsv").write_text("\n".join(lines) + "\n")
    return folder / "cohen.tsv"


def _plan(tmp_path: Path, data: Path, methods: tuple[str, ...] = ("gaussian",)) -> rp.Plan:
    protocol = dataclasses.replace(
        rp.PROTOCOLS["fmnist-rs"], train_args=("--epochs", "1", "--batch-size", "16"), test_subset=0
    )
    return rp.Plan(
        protocol=protocol,
        out=tmp_path / "out",
        methods=methods,
        sigmas=(0.25,),
        n=200,
        skip=4,
        device="cpu",
        data_dir=str(data),
        certify_flags=("--batch", "200"),
    )


@pytest.mark.slow
def test_reproduce_trains_certifies_compares_paired_and_resumes(tmp_path: Path) -> None:
    data = make_idx_dataset(tmp_path / "data", n_train=48, n_test=20)
    published = tmp_path / "published"
    test_labels = [label for _, label in load_dataset("fashion-mnist", "test", str(data))]
    theirs_path = _write_published(published / "sigma_0.25", test_labels)
    plan = _plan(tmp_path, data)

    text, failures = rp.run(plan, published)
    assert not failures
    run = rp.run_dir(plan.out, "gaussian", 0.25)
    mine_path = rp.certify_path(plan.out, "gaussian", 0.25, 200, 4)
    assert rp.training_complete(run) and summary_path(mine_path).exists()
    assert "| gaussian | 0.25 | 5 |" in text
    table, plot = plan.out / "reproduction-fmnist-rs.md", plan.out / "reproduction-fmnist-rs.png"
    assert table.read_text() in text and plot.stat().st_size > 0

    # the difference is paired on the certified images (0, 4, 8, 12, 16) against the same published rows
    mine, theirs = read_results(mine_path), read_results(theirs_path)
    assert list(mine.idx) == [0, 4, 8, 12, 16]
    expected = np.mean(mine.correct * mine.radius - theirs.correct[mine.idx] * theirs.radius[mine.idx])
    row = rp.compare(plan, "gaussian", 0.25, published)
    assert row is not None and row.diff == pytest.approx(expected)
    assert row.published_acr == pytest.approx(np.mean(theirs.correct * theirs.radius))
    # certified accuracy is compared on the same images too
    same = theirs.correct[mine.idx].astype(bool), theirs.radius[mine.idx]
    assert [float(a) for a in row.published_accuracy] == pytest.approx(
        [np.mean(same[0] & (same[1] >= r)) for r in rp.RADII]
    )
    assert not row.partial

    # a second call trains nothing (the finished run is only checked against the protocol) and certifies
    # nothing again
    weights = (run / "model.safetensors").read_bytes()
    assert not rp.run(plan, published)[1]
    assert (run / "model.safetensors").read_bytes() == weights
    assert Path(f"{run}.log").read_text().count("$ ") == 2
    assert Path(f"{mine_path}.log").read_text().count("$ ") == 1

    # an interrupted certification (rows cut, no summary) is continued, not restarted
    lines = mine_path.read_text().splitlines(keepends=True)
    mine_path.write_text("".join(lines[:3]))
    summary_path(mine_path).unlink()
    rp.run(plan, published)
    assert list(read_results(mine_path).idx) == [0, 4, 8, 12, 16]
    assert read_results(mine_path).radius[:2].tolist() == mine.radius[:2].tolist()


def test_a_run_in_out_is_resumed_finished_or_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose model.json records fewer completed epochs than its config asks for is continued with
    --resume (what certkit train then does is tested in test_train); a finished one is resumed too, so that
    the trainer refuses one trained under other settings than the protocol's."""
    plan = _plan(tmp_path, tmp_path)
    run = rp.run_dir(plan.out, "gaussian", 0.25)
    run.mkdir(parents=True)
    (run / "train_state.safetensors").write_bytes(b"")
    calls: list[list[str]] = []
    monkeypatch.setattr(rp, "_certkit", lambda args, log: calls.append(list(args)) or 0)
    for completed in (1, 90):
        (run / "model.json").write_text(f'{{"epochs_completed": {completed}, "train": {{"epochs": 90}}}}')
        calls.clear()
        rp.train_step(plan, "gaussian", 0.25)
        assert len(calls) == 1 and calls[0][-1] == "--resume"


@pytest.mark.slow  # a certkit process
def test_a_finished_run_of_other_settings_is_not_taken_for_the_protocols(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_idx_dataset(tmp_path / "data", n_train=48, n_test=8)
    plan = _plan(tmp_path, data)
    run = rp.run_dir(plan.out, "gaussian", 0.25)
    assert main(train_argv(data, train_subset=16, test_subset=0, batch_size=16, out=run)) == 0
    failure = rp.train_step(plan, "gaussian", 0.25)
    assert failure is not None and failure.status == 2
    assert "run was started with --train-subset 16, not None" in failure.message, failure.message


def test_crt_waits_for_its_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(tmp_path, tmp_path, methods=("crt",))
    plan.protocol = rp.PROTOCOLS["fmnist-crt"]
    failure = rp.train_step(plan, "crt", 0.25)
    assert failure is not None and failure.status == 2 and "teacher" in failure.message
    assert "--methods selects smoothmix" in capsys.readouterr().out
    assert not rp.run_dir(plan.out, "crt", 0.25).exists()


def test_selection_flags_are_checked(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    rp.add_arguments(parser)
    out = ["--out", str(tmp_path / "out")]
    plan = rp.plan_from_args(parser.parse_args(["fmnist-rs", "--methods", "gaussian,smoothmix", "--sigmas", "0.25"]))
    assert plan.methods == ("gaussian", "smoothmix") and plan.sigmas == (0.25,)
    assert plan.n == 100_000 and plan.skip == 10
    with pytest.raises(CertkitError, match="crt"):
        rp.plan_from_args(parser.parse_args(["fmnist-rs", "--methods", "crt", *out]))
    with pytest.raises(CertkitError, match=r"0\.3"):
        rp.plan_from_args(parser.parse_args(["fmnist-rs", "--sigmas", "0.3", *out]))
    # sigmas are numbers: 1 is the protocol's 1.0
    assert rp.plan_from_args(parser.parse_args(["fmnist-rs", "--sigmas", "1,0.50", *out])).sigmas == (1.0, 0.5)
    with pytest.raises(CertkitError, match=r"--sigmas: one not in this protocol \(0\.25, 0\.5, 1\.0\)"):
        rp.plan_from_args(parser.parse_args(["fmnist-rs", "--sigmas", "one", *out]))


def reproduce(tmp_path: Path, *flags: str) -> list[str]:
    """``certkit reproduce fmnist-rs`` of gaussian at sigma 0.25 on a tiny dataset, into ``tmp_path/out``."""
    data = make_idx_dataset(tmp_path / "data", n_train=8, n_test=4)
    return [
        "reproduce",
        "fmnist-rs",
        "--out",
        str(tmp_path / "out"),
        "--methods",
        "gaussian",
        "--sigmas",
        "0.25",
        "--data-dir",
        str(data),
        "--device",
        "cpu",
        *flags,
    ]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certkit: error:"), lines
    return lines[0]


@pytest.mark.parametrize("status", [2, 1])
def test_a_failed_step_fails_the_call_with_its_own_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    """The step's process said why in its log; the call ends with that line and its status (2: the user's
    mistake; anything else: 1), after running the steps that remain."""

    def failing(args: list[str], log: Path) -> int:
        with open(log, "a") as f:
            f.write("certkit: error: an earlier attempt\n")  # of a previous call: not this step's reason
        with open(log, "a") as f:
            f.write(f"progress...\ncertkit: error: {args[0]} broke\n")
        return status

    monkeypatch.setattr(rp, "_certkit", failing)
    (tmp_path / "published").mkdir()  # given, so that the error line is the only line on stderr
    assert main(reproduce(tmp_path, "--published", str(tmp_path / "published"))) == status
    line = one_error_line(capsys)
    assert line.startswith("certkit: error: reproduce: training gaussian sigma=0.25 failed: train broke"), line
    assert "gaussian-0.25.log" in line


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--device", "meta"], ["--device meta"]),
        (["--data-dir", "/nonexistent"], ["/nonexistent", "missing"]),
        (["--certify-flags=--bogus 3"], ["--certify-flags '--bogus 3'", "unrecognized arguments: --bogus 3"]),
        (["--certify-flags=--n x"], ["--certify-flags", "--n", "expected an integer"]),
        (["--certify-flags=--N 5 --skip 2"], ["--certify-flags: --N and --skip set by reproduce"]),
        (["--certify-flags=--out elsewhere.tsv"], ["--out set by reproduce"]),
        # what is certified is the protocol's: another sigma, subset, shard or sampling would be tabled as it
        (
            ["--certify-flags=--sigma 0.5 --max 50 --batch 10"],
            ["--certify-flags: --sigma and --max would change what the protocol certifies", "--shared-noise"],
        ),
        (["--certify-flags=--adaptive"], ["--adaptive would change"]),
        (["--certify-flags=--shard 0/2"], ["--shard would change"]),
        # set to certify's own defaults, or abbreviated, they would still override the protocol's
        (["--certify-flags=--skip 1 --alp 0.001"], ["--alpha and --skip set by reproduce"]),
    ],
)
def test_settings_a_step_would_refuse_are_refused_before_the_first(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    words: list[str],
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(rp, "_certkit", lambda args, log: calls.append(list(args)) or 0)
    argv = reproduce(tmp_path, *flags)
    if "/nonexistent" in flags:
        argv = argv[: argv.index("--data-dir")] + argv[argv.index("--data-dir") + 2 :]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not calls


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--train-only", "--report-only"], ["--train-only trains and --report-only only reports"]),
        (["--report-only", "--certify-flags=--channels-last"], ["--certify-flags and --device: --report-only"]),
    ],
)
def test_flags_that_contradict_each_other_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], words: list[str]
) -> None:
    assert main(reproduce(tmp_path, *flags)) == 2
    line = one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_without_published_results_it_says_so_before_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(rp, "_certkit", lambda args, log: calls.append(list(args)) or 0)
    monkeypatch.setattr(rp, "training_complete", lambda run: True)
    assert main(reproduce(tmp_path)) == 0
    assert "certkit: warning: no --published folder" in capsys.readouterr().err and calls
    assert main(reproduce(tmp_path, "--train-only")) == 0  # nothing compared: nothing to warn about
    assert "no --published" not in capsys.readouterr().err
    assert main(["reproduce", "fmnist-rs", "--out", str(tmp_path / "none"), "--report-only"]) == 0
    assert not (tmp_path / "none").exists()  # a report of nothing writes nothing


def test_certify_flags_it_passes_on_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(rp, "_certkit", lambda args, log: calls.append(list(args)) or 0)
    monkeypatch.setattr(rp, "training_complete", lambda run: True)
    assert main(reproduce(tmp_path, "--certify-flags=--shared-noise 10 --channels-last --batch 200")) == 0
    passed_on = ["--shared-noise", "10", "--channels-last", "--batch", "200"]
    # right after the run, before reproduce's own settings, which therefore win
    assert calls[-1][0] == "certify" and calls[-1][2:7] == passed_on and "--n0" in calls[-1][7:]


@pytest.mark.parametrize("kind", ["file", "proc"])
def test_out_is_checked_like_other_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    out = tmp_path / "g.tsv" if kind == "file" else Path("/proc/certkit-reproduce")
    if kind == "file":
        out.write_text("x\n")
    assert main(["reproduce", "fmnist-rs", "--out", str(out), "--report-only"]) == 2
    assert f"--out {out}" in one_error_line(capsys)


def test_the_plot_has_a_certkit_curve_per_sigma(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import certkit.report

    plan = dataclasses.replace(_plan(tmp_path, tmp_path), sigmas=(0.25, 0.5))
    rows = [
        rp.Row("gaussian", sigma, 5, 0.5, 0.5, 0.5, 0.0, 0.0, np.zeros(7), np.zeros(7), None, False)
        for sigma in plan.sigmas
    ]
    drawn: dict[str, tuple[str, str]] = {}
    monkeypatch.setattr(certkit.report, "plot_curves", lambda named, path, title, styles: drawn.update(styles))
    rp.plot(rows, plan, tmp_path / "published", tmp_path / "p.png")
    assert [name for name in drawn if name.startswith("certkit")] == [
        "certkit gaussian σ=0.25",
        "certkit gaussian σ=0.5",
    ]
    # certkit's curve solid, the published one of the same method and sigma dashed in its colour
    assert drawn["certkit gaussian σ=0.5"] == ("C1", "-") and drawn["published cohen σ=0.5"] == ("C1", "--")


def test_a_crt_rows_cost_is_set_against_its_teachers() -> None:
    student = {"seconds": 100.0, "forward": 600.0, "backward": 600.0, "teacher_forward": 600.0, "steps": 5}
    teacher = {"arch": "lenet", "method": "smoothmix", "seconds": 1000.0}
    teacher["total"] = {"seconds": 1000.0, "forward": 9600.0, "backward": 9600.0, "steps": 40}
    line = rp.cost_ledger("crt", 0.25, {"total": student, "ancestors": [teacher]})
    assert line == (
        "crt sigma=0.25: 100 s, 1,800 image passes (teacher forwards included); its teacher lenet smoothmix "
        "1,000 s, 19,200 image passes: 10.0x less by the clock, 10.6x less by image passes"
    )  # 19,200 / 1,800 = 10.67 rounds down: the saving is never claimed larger than it was
    slower = {**student, "seconds": 1490.0}  # 1.49 times its teacher: rounded up, never to 1.4x
    assert "1.5x more by the clock" in str(rp.cost_ledger("crt", 0.25, {"total": slower, "ancestors": [teacher]}))
    # runs without a teacher have no ledger line
    assert rp.cost_ledger("gaussian", 0.25, {"total": student}) is None and rp.cost_ledger("crt", 0.25, {}) is None


def _certified(plan: rp.Plan, at: float, rows: Sequence[tuple[int, int, float]], **settings: object) -> Path:
    """certkit's result file where ``plan`` looks for gaussian's at sigma ``at``: (idx, label, radius) rows,
    all correct, with the plan's settings unless ``settings`` says otherwise."""
    from certkit.results import ResultWriter

    path = rp.certify_path(plan.out, "gaussian", at, plan.n, plan.skip)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = plan.protocol
    given = {"sigma": at, "n": plan.n, "n0": p.n0, "alpha": p.alpha, "skip": plan.skip, "max": -1}
    given |= {"dataset": p.dataset, "split": "test", **settings}
    with ResultWriter(path, "certify", given) as w:
        for idx, label, radius in rows:
            w.write_certify(idx, label, label, radius, 0.1)
    return path


def _published_rows(folder: Path, rows: Sequence[tuple[int, int, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"] + [f"{i}\t{y}\t{y}\t{r}\t1\t0:00:01" for i, y, r in rows]
    (folder / "cohen.tsv").write_text("\n".join(lines) + "\n")


def test_a_file_certified_at_other_settings_than_the_tables_is_refused(tmp_path: Path) -> None:
    plan = _plan(tmp_path, tmp_path)
    _published_rows(tmp_path / "published" / "sigma_0.25", [(0, 1, 0.5), (4, 2, 0.5)])
    _certified(plan, 0.25, [(0, 1, 0.4), (4, 2, 0.4)], sigma=0.5, n=1000)
    with pytest.raises(CertkitError, match=r"certified with sigma 0\.5, not 0\.25; n 1000, not 200 \(this table"):
        rp.compare(plan, "gaussian", 0.25, tmp_path / "published")
    rp.certify_path(plan.out, "gaussian", 0.25, plan.n, plan.skip).unlink()
    _certified(plan, 0.25, [(0, 1, 0.75), (4, 2, 0.25)])
    row = rp.compare(plan, "gaussian", 0.25, tmp_path / "published")
    assert row is not None and row.acr == Fraction(1, 2)


def test_every_figure_of_a_row_is_over_the_images_both_files_hold(tmp_path: Path) -> None:
    """Where the published file lacks images certkit certified, the row's images, ACR and certified accuracy
    are over the common ones, as its header says, not certkit's ACR over all beside a difference over some."""
    plan = _plan(tmp_path, tmp_path)
    _published_rows(tmp_path / "published" / "sigma_0.25", [(0, 1, 0.5), (4, 2, 0.5)])
    _certified(plan, 0.25, [(0, 1, 0.5), (4, 2, 0.5), (8, 3, 0.0), (12, 4, 0.0)])
    row = rp.compare(plan, "gaussian", 0.25, tmp_path / "published")
    assert row is not None and row.images == 2 and row.acr == Fraction(1, 2) and row.diff == 0.0
    assert row.accuracy[2] == 1  # r = 0.5 on images 0 and 4
    # two images, each its own noise: a standard error; its table line
    assert row.diff_se == 0.0 and "| gaussian (partial) | 0.25 | 2 | 0.500 | 0.500 / 0.500 | +0.000 ± 0.000 |" in (
        rp.table([row], plan)
    )


def test_the_table_says_what_it_cannot_compute_and_what_differs_from_the_published(tmp_path: Path) -> None:
    plan = dataclasses.replace(_plan(tmp_path, tmp_path), skip=1)
    _published_rows(tmp_path / "published" / "sigma_0.25", [(0, 1, 0.5)])
    _certified(plan, 0.25, [(0, 1, 0.25)])
    row = rp.compare(plan, "gaussian", 0.25, tmp_path / "published")
    assert row is not None
    text = rp.table([row], plan)
    assert "| -0.250 ± – |" in text  # one image: no standard error, not "nan"
    assert "n = 200 (the published files: n = 100,000), alpha = 0.001, every test image." in text
    assert [rp._every(k) for k in (2, 3, 10, 11, 12, 21, 22, 101, 113)] == [
        "every 2nd test image",
        "every 3rd test image",
        "every 10th test image",
        "every 11th test image",
        "every 12th test image",
        "every 21st test image",
        "every 22nd test image",
        "every 101st test image",
        "every 113th test image",
    ]


@pytest.mark.slow  # a real reproduce process and the training step it starts
def test_a_terminated_reproduce_stops_its_step_cleanly(tmp_path: Path) -> None:
    """SIGTERM reaches the reproduce process alone (a batch scheduler's kill, `timeout`): it stops the step
    it is running with SIGTERM too, so that no orphan trains on and the step's lock is removed; the step
    says how it would continue."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = make_idx_dataset(tmp_path / "data", n_train=400, n_test=1000)  # the protocol tests on 1,000
    out = tmp_path / "out"
    argv = ["reproduce", "fmnist-rs", "--out", str(out), "--methods", "gaussian", "--sigmas", "0.25"]
    argv += ["--data-dir", str(data), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "certkit", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = out / "gaussian-0.25" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists():  # the training step is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.decode().strip().endswith("continue where it stopped"), err
    log = (out / "gaussian-0.25.log").read_text()
    assert "certkit: terminated; rerun the command with --resume" in log, log[-500:]
    assert not list(out.glob("*.lock")) and not list(out.glob("*/*.lock"))
