"""The command line end to end: train → certify → predict → report → merge, and one-line errors for bad input.

Commands run in-process through ``certkit.cli.main`` (the console script calls the same function), so the
exit status and the exact stderr text are what a user sees.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from certkit.cli import main
from certkit.results import read_results
from helpers import train_argv


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of one command (argparse's own errors exit through SystemExit)."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    """A LeNet trained for one short epoch on a Fashion-MNIST subset (enough to have a real checkpoint)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = train_argv(
        fmnist_root, arch="lenet", train_subset=512, test_subset=100, batch_size=64, lr=0.05, sigma=0.25, out=out
    )
    code = main(argv)
    assert code == 0
    return out


def test_train_writes_a_complete_run(trained: Path) -> None:
    meta = json.loads((trained / "model.json").read_text())
    assert meta["arch"] == "lenet" and meta["method"] == "gaussian" and meta["sigma"] == 0.25
    assert meta["dataset"] == "fashion-mnist" and meta["num_classes"] == 10
    assert meta["cost"]["total"]["forward"] > 0 and meta["cost"]["total"]["seconds"] > 0
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "test_noisy_acc" in json.loads(lines[0])


def test_certify_predict_report_merge(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = tmp_path / "r.tsv"
    code, out, err = run(capsys, "certify", str(trained), "--n0", "20", "--n", "200", "--max", "12", "--out", str(tsv))
    assert code == 0, err
    res = read_results(tsv)
    assert list(res.idx) == list(range(12))
    assert tsv.read_text().splitlines()[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    assert ((res.predict == -1) <= (res.radius == 0)).all()  # abstain rows carry radius 0

    # a different sigma than the training one is allowed and said on stderr
    code, _, err = run(
        capsys, "certify", str(trained), "--sigma", "0.5", "--n", "100", "--max", "2", "--out", str(tmp_path / "s.tsv")
    )
    assert code == 0 and "sigma=0.5" in err and "trained at sigma=0.25" in err

    ptsv = tmp_path / "p.tsv"
    code, _, err = run(capsys, "predict", str(trained), "--n", "100", "--max", "5", "--out", str(ptsv))
    assert code == 0, err
    assert ptsv.read_text().splitlines()[0].split("\t") == ["idx", "label", "predict", "correct", "time"]

    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard{i}.tsv")
        code, _, err = run(
            capsys,
            "certify",
            str(trained),
            "--n0",
            "20",
            "--n",
            "200",
            "--max",
            "12",
            "--shard",
            f"{i}/2",
            "--out",
            str(shards[-1]),
        )
        assert code == 0, err
    merged = tmp_path / "merged.tsv"
    code, _, err = run(capsys, "merge", *map(str, shards), "--out", str(merged))
    assert code == 0, err
    m = read_results(merged)
    for col in ("idx", "label", "predict", "radius", "correct"):
        np.testing.assert_array_equal(getattr(m, col), getattr(res, col))

    png = tmp_path / "curves.png"
    code, out, err = run(capsys, "report", str(tsv), str(merged), "--plot", str(png))
    assert code == 0, err
    from certkit.report import acr, floor_figure

    assert "ACR" in out and "| r |" in out and "| merged |" in out and floor_figure(acr(tsv)) in out
    assert png.stat().st_size > 0


def test_certify_resumes_and_refuses_other_settings(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = tmp_path / "r.tsv"
    base = ["certify", str(trained), "--n0", "20", "--n", "200", "--max", "8", "--out", str(tsv)]
    assert run(capsys, *base)[0] == 0
    full = read_results(tsv)
    # cut the file as a kill would: three rows lost and half of the next one written
    lines = tsv.read_text().splitlines(keepends=True)
    tsv.write_text("".join(lines[:-4]) + lines[-4][:5])
    assert run(capsys, *base)[0] == 0  # continues after the last complete row
    resumed = read_results(tsv)
    for col in ("idx", "label", "predict", "radius", "correct"):
        np.testing.assert_array_equal(getattr(resumed, col), getattr(full, col))
    before = tsv.read_bytes()
    code, _, err = run(capsys, *base, "--n", "300")
    assert code == 2 and "settings differ in n" in err and len(err.strip().splitlines()) == 1
    assert tsv.read_bytes() == before
    # a larger --max may come with the refused change: it is no reason and not named; a --batch below 100
    # changes the noise blocks, named with the flag that did it
    code, _, err = run(capsys, *base, "--n", "300", "--max", "9", "--batch", "50")
    assert code == 2 and "settings differ in n, noise_block (set by a --batch below 100) (" in err
    assert tsv.read_bytes() == before


def test_certify_grows_with_a_larger_max_and_refuses_a_smaller_one(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [str(trained), "--n0", "20", "--n", "200"]
    whole = tmp_path / "whole.tsv"
    assert run(capsys, "certify", *args, "--max", "10", "--out", str(whole))[0] == 0
    grown = tmp_path / "grown.tsv"
    assert run(capsys, "certify", *args, "--max", "4", "--out", str(grown))[0] == 0
    assert (tmp_path / "grown.summary.json").exists()
    assert run(capsys, "certify", *args, "--max", "10", "--out", str(grown))[0] == 0
    a, b = read_results(whole), read_results(grown)
    for col in ("idx", "label", "predict", "radius", "correct"):
        np.testing.assert_array_equal(getattr(b, col), getattr(a, col))
    assert json.loads((tmp_path / "grown.summary.json").read_text())["N"] == 10
    before = grown.read_bytes()
    code, _, err = run(capsys, "certify", *args, "--max", "6", "--out", str(grown))
    assert code == 2 and "beyond --max 6" in err and len(err.strip().splitlines()) == 1
    assert grown.read_bytes() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["certify", "RUN", "--sigma", "0"], "--sigma must be a number in (0, 100]"),
        (["certify", "RUN", "--sigma", "-0.5"], "--sigma must be a number in (0, 100]"),
        (["certify", "RUN", "--alpha", "1.5"], "--alpha must be a number in (0, 0.5]"),
        (["certify", "RUN", "--alpha", "0"], "--alpha must be a number in (0, 0.5]"),
        (["certify", "RUN", "--n0", "0"], "--n0 must be an integer in 1..1,000,000,000"),
        (["certify", "RUN", "--n", "0"], "--n must be an integer in 1..1,000,000,000"),
        (["certify", "RUN", "--n", "5"], "CERTIFY needs n >= 10"),
        (["predict", "RUN", "--n", "3"], "PREDICT needs n >= "),
        (["certify", "no/such/run"], "not a certkit run"),
        (["train", "--dataset", "foo"], "valid datasets: fashion-mnist, mnist, cifar10, imagenet"),
        (["train", "--arch", "foo"], "valid architectures: "),
        (["train", "--method", "foo"], "valid methods: "),
        (["train", "--sigma", "0"], "--sigma must be a number in (0, 100]"),
        (["train", "--dataset", "mnist", "--data-dir", "/no/such/dir"], "train-images-idx3-ubyte.gz: missing"),
        (["train", "--method", "crt"], "needs --teacher"),
        (["train", "--method", "crt", "--teacher", "no/such/run"], "not a certkit run"),
        (["train", "--epochs", "0"], "must be >= 1"),
        (["train", "--lr-gamma", "nan"], "--lr-gamma must be a finite number >= 0"),  # not MACER's --gamma
        (["certify", "RUN", "--shard", "3/2"], "0 <= i < k"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    argv: list[str], message: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [str(trained) if a == "RUN" else a for a in argv] + ["--out", str(out)]
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "command, message",
    [
        (["report", "a.tsv", "b.tsv"], "--labels gives 3 names for 2 files"),
        (["curves", "a", "b", "--plot", "OUT/c.png"], "--labels gives 3 names for 2 runs"),
    ],
)
def test_labels_of_another_count_are_one_line(
    command: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The count is checked before any file is read, so the files need not exist."""
    argv = [a.replace("OUT", str(tmp_path)) for a in command]
    code, out, err = run(capsys, *argv, "--labels", "x,y,z")
    assert (code, out, err) == (2, "", f"certkit: error: {message}\n")


@pytest.mark.slow  # three CLI runs, each with its vote-agreement check
def test_certify_with_shared_noise(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = tmp_path / "shared.tsv"
    args = ["certify", str(trained), "--n0", "20", "--n", "200", "--max", "10", "--shared-noise", "5"]
    code, _, err = run(capsys, *args, "--out", str(tsv))
    assert code == 0, err
    res = read_results(tsv)
    assert list(res.idx) == list(range(10)) and res.settings["shared_noise"] == 5
    summary = json.loads((tmp_path / "shared.summary.json").read_text())
    assert summary["high_prob_effective_n"] == 2 and summary["speed_check"]["options"] == {"stem_split": True}
    # two shards under the same setting hold the same rows
    code, _, err = run(capsys, *args, "--shard", "1/2", "--out", str(tmp_path / "half.tsv"))
    assert code == 0, err
    np.testing.assert_array_equal(read_results(tmp_path / "half.tsv").radius, res.radius[1::2])
    # its five rows (1, 3, 5, 7, 9) fall in two noise groups, not one: the bound counts two
    assert json.loads((tmp_path / "half.summary.json").read_text())["high_prob_effective_n"] == 2
    code, _, err = run(capsys, *args[:-1], "1", "--out", str(tmp_path / "one.tsv"))
    assert code == 2 and "at least 2" in err


def test_certify_with_counter_based_noise(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["certify", str(trained), "--n0", "20", "--n", "200", "--max", "4"]
    code, _, err = run(capsys, *args, "--rng", "philox", "--out", str(tmp_path / "p.tsv"))
    assert code == 0, err
    res = read_results(tmp_path / "p.tsv")
    assert list(res.idx) == list(range(4)) and res.settings["rng"] == "philox"
    # the same file cannot be continued with the other generator
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "p.tsv"))
    assert code == 2 and "rng" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_take_the_mode_the_umask_gives(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], umask: int
) -> None:
    """Sidecars, summaries and plots (written atomically through a private temporary file) get 0666 less the
    umask, like the TSV that open() writes: a labmate in the group can read what a run wrote."""
    import os

    old = os.umask(umask)
    try:
        tsv = tmp_path / "r.tsv"
        assert run(capsys, "certify", str(trained), "--n0", "20", "--n", "100", "--max", "2", "--out", str(tsv))[0] == 0
        assert run(capsys, "report", str(tsv), "--plot", str(tmp_path / "c.png"))[0] == 0
    finally:
        os.umask(old)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["c.png", "r.summary.json", "r.tsv", "r.tsv.json"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        n: oct(0o666 & ~umask) for n in written
    }


def test_a_leading_double_dash_is_what_torchrun_needs_and_is_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--", "list")
    assert code == 0 and "datasets:" in out


def test_a_reader_that_leaves_early_is_no_error(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`certkit report ... | head`: the pipe closes before the table is written; that is not a failure to report."""
    import subprocess
    import sys

    tsv = tmp_path / "r.tsv"
    assert run(capsys, "certify", str(trained), "--n0", "20", "--n", "200", "--max", "2", "--out", str(tsv))[0] == 0
    radii = ",".join(f"{i / 10000:.4f}" for i in range(12000))  # a header of 130 kB: more than a pipe holds
    cmd = [sys.executable, "-m", "certkit", "report", str(tsv), "--radii", radii]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 1
    assert proc.stderr is not None and proc.stderr.read() == b""


def test_a_broken_pipe_elsewhere_is_reported(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Only a closed standard output ends quietly; a broken pipe of something else (a user's factory) is
    reported like any unexpected failure, and main() leaves its caller's standard output as it was."""
    import certkit.cli as cli

    def broken(args: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_list", broken)
    code, _, err = run(capsys, "list")
    assert code == 1 and "certkit: error: unexpected BrokenPipeError" in err
    print("still captured")
    assert capsys.readouterr().out == "still captured\n"


def test_list_hyperparameters_prints_what_train_resolves(capsys: pytest.CaptureFixture[str]) -> None:
    """Each line's flags, read back by ``train``'s own parser, are the method's defaults for that family
    and sigma: the listing is the table train uses, in a form the flags take exactly (255/256 is not 0.996)."""
    from certkit.cli import build_parser
    from certkit.methods import get_objective

    code, out, _ = run(capsys, "list", "hyperparameters")
    assert code == 0 and "smoothmix:" in out and "gaussian: no hyperparameters" in out
    checked = 0
    method = ""
    for line in out.splitlines()[1:]:
        if not line.startswith("  "):
            method = line.split(":")[0]
            continue
        where, flags = line.strip().split(": ", 1)
        family, _, sigma = where.partition(", sigma ")
        if where == "every dataset and sigma":  # a method without a published table
            family = "cifar10"
        args = build_parser().parse_args(["train", "--out", "x", "--method", method, *flags.split()])
        given = {k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")}
        params = get_objective(method).Params
        resolved = params.resolve(method, family, float(sigma) if sigma else None, {})
        assert given == dataclasses.asdict(resolved), line
        checked += 1
    assert checked >= 30
