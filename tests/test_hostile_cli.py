"""Hostile and careless command lines (issue 18, the CLI part; the file formats are in test_hostile_files.py).

One table of cases. Each must end in exit status 2 with exactly one stderr line starting
``certkit: error:``, holding the expected words and no traceback or internal name, and leave every file
under the test's folder and the trained run as it was. Most run in-process through ``certkit.cli.main``;
the cases that used to ask the allocator for gigabytes run as a real process whose peak resident memory
(``getrusage(RUSAGE_CHILDREN)`` in a wrapper process of their own) must stay below :data:`PEAK_BOUND`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from certkit import __version__
from certkit.cli import main
from helpers import train_argv

PEAK_BOUND = 1536 << 20  # bytes; torch, a LeNet and Fashion-MNIST need well under this
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

#: ``python -c`` wrapper: run one certkit process and print that child's peak resident memory in bytes
MEASURE = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run([sys.executable, '-m', 'certkit', *sys.argv[1:]], capture_output=True, text=True)\n"
    "sys.stderr.write(p.stderr)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "sys.exit(p.returncode)\n"
)


def run_dir_argv(data_dir: str | Path, out: str | Path, subset: str = "256") -> list[str]:
    """The command that trains ``run_dir``."""
    return train_argv(data_dir, train_subset=subset, test_subset=0, batch_size=64, out=out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    """A resumable LeNet run: one short epoch on a Fashion-MNIST subset."""
    out = tmp_path_factory.mktemp("hostile-cli") / "run"
    assert main(run_dir_argv(fmnist_root, out)) == 0
    return out


# --- what a case prepares in its folder (returns the paths its argv names) -----------------------------
Setup = Callable[[Path, Path], dict[str, str]]


def crafted_meta(change: Callable[[dict], None]) -> Setup:
    """A copy of the run whose model.json ``change`` edits (the weights and their hash stay valid)."""

    def setup(tmp: Path, run: Path) -> dict[str, str]:
        copy = tmp / "crafted"
        copy.mkdir()
        for f in run.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        meta = json.loads((copy / "model.json").read_text())
        change(meta)
        (copy / "model.json").write_text(json.dumps(meta))
        return {"CRAFTED": str(copy)}

    return setup


def reference_file(content: object) -> Setup:
    def setup(tmp: Path, run: Path) -> dict[str, str]:
        path = tmp / "ref.pth.tar"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        return {"REF": str(path)}

    return setup


def made(*names: str, directory: bool = False) -> Setup:
    """Files (or directories) at ``names`` under the case's folder."""

    def setup(tmp: Path, run: Path) -> dict[str, str]:
        for name in names:
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir() if directory else path.write_text("x\n")
        return {}

    return setup


def in_run(name: str) -> Setup:
    """``RUNFILE``: the path of ``name`` inside the trained run (an output that would overwrite it)."""

    def setup(tmp: Path, run: Path) -> dict[str, str]:
        return {"RUNFILE": str(run / name)}

    return setup


def named_by_meta(name: str) -> Setup:
    """``RUNMETA``: the run named by its model.json; ``RUNFILE``: ``name`` inside the run."""

    def setup(tmp: Path, run: Path) -> dict[str, str]:
        return {"RUNMETA": str(run / "model.json"), "RUNFILE": str(run / name)}

    return setup


def custom_arch_module(tmp: Path, run: Path) -> dict[str, str]:
    """A ``--arch pkg:factory`` whose factory fails in a way no check foresees (the catch-all's case)."""
    (tmp / "hostile_arch.py").write_text("def broken():\n    return {}['no such key']\n")
    return {}


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("pickle payload ran",))


CERTIFY = ["certify", "RUN", "--max", "2", "--out", "TMP/c.tsv"]
TRAIN = train_argv("FMNIST", train_subset=64, test_subset=0)


def resume(*extra: str, subset: str = "256") -> list[str]:
    """The command that trained ``run_dir``, resumed, with ``extra`` flags."""
    return [*run_dir_argv("FMNIST", "RUN", subset), "--resume", *extra]


# id: (argv, words the one line must hold, setup or None, run as a measured process)
CASES: dict[str, tuple[list[str], list[str], Setup | None, bool]] = {
    # sample counts, alpha, sigma, seed, batch: bounded before anything is allocated
    "n-huge": ([*CERTIFY, "--n", str(10**12)], ["--n ", "1,000,000,000"], None, True),
    "n0-huge": ([*CERTIFY, "--n0", str(10**12)], ["--n0 ", "1,000,000,000"], None, True),
    "sigma-huge": ([*CERTIFY, "--sigma", "1e300"], ["--sigma", "(0, 100]"], None, True),
    "n-past-int64": ([*CERTIFY, "--n", str(2**70)], ["--n "], None, False),
    "n-negative": ([*CERTIFY, "--n", "-5"], ["--n "], None, False),
    "alpha-denormal": ([*CERTIFY, "--alpha", "1e-320"], ["--alpha", "2.23e-308"], None, False),
    "alpha-nan": ([*CERTIFY, "--alpha", "nan"], ["--alpha"], None, False),
    "alpha-near-one": ([*CERTIFY, "--alpha", "0.999999999999", "--n", str(10**9)], ["--alpha", "0.5]"], None, False),
    "sigma-inf": ([*CERTIFY, "--sigma", "inf"], ["--sigma"], None, False),
    "sigma-nan": ([*CERTIFY, "--sigma", "nan"], ["--sigma"], None, False),
    "batch-huge": ([*CERTIFY, "--batch", str(10**10)], ["--batch", "1,000,000"], None, False),
    "certify-seed-negative": ([*CERTIFY, "--seed", "-1"], ["--seed", "0..2^63-1"], None, False),
    "certify-seed-huge": ([*CERTIFY, "--seed", str(2**64)], ["--seed"], None, False),
    "predict-n-huge": (["predict", *CERTIFY[1:], "--n", str(10**12)], ["--n "], None, False),
    # devices that do not exist here
    "device-meta": ([*CERTIFY, "--device", "meta"], ["--device meta"], None, False),
    "device-mps": ([*CERTIFY, "--device", "mps"], ["--device mps"], None, False),
    "device-cuda-beyond": ([*CERTIFY, "--device", "cuda:99"], ["--device cuda:99"], None, False),
    "device-nonsense": ([*CERTIFY, "--device", "gpu7"], ["--device gpu7"], None, False),
    "train-device-meta": ([*TRAIN, "--device", "meta", "--out", "TMP/t"], ["--device meta"], None, False),
    # optimizer settings torch would reject late
    "momentum-negative": ([*TRAIN, "--momentum", "-0.5", "--out", "TMP/t"], ["--momentum", ">= 0"], None, False),
    "weight-decay-negative": ([*TRAIN, "--weight-decay", "-1", "--out", "TMP/t"], ["--weight-decay"], None, False),
    "lr-inf": ([*TRAIN, "--lr", "inf", "--out", "TMP/t"], ["--lr", "finite"], None, False),
    "train-seed-negative": ([*TRAIN, "--seed", "-1", "--out", "TMP/t"], ["--seed", "0..2^63-1"], None, False),
    # wrong combinations that used to reach conv2d
    "resnet50-on-fashion-mnist": (
        [*TRAIN, "--arch", "resnet50", "--out", "TMP/t"],
        ["does not fit images"],
        None,
        False,
    ),
    "fmnist-model-on-cifar": ([*CERTIFY, "--dataset", "cifar10"], ["cifar10"], None, False),
    # argparse: one line starting certkit: error:, no internal names
    "n-not-a-number": ([*CERTIFY, "--n", "abc"], ["--n", "expected an integer"], None, False),
    "flag-value-starting-with-dash": (
        ["report", "TMP/r.tsv", "--radii", "-1,0.5"],
        ["argument --radii: expected one argument", "--radii=-1,0.5"],
        None,
        False,
    ),
    "skip-not-a-number": ([*CERTIFY, "--skip", "x"], ["--skip", "expected an integer from 1 to"], None, False),
    "skip-zero": ([*CERTIFY, "--skip", "0"], ["--skip", "from 1 to"], None, False),
    # what a settings file may not record (an index above 2**53, --max below -1) is refused before the first
    # run, not by its resume; --max 0 would plan no image
    "skip-past-2-53": ([*CERTIFY, "--skip", str(2**53 + 1)], ["--skip", str(2**53)], None, False),
    "max-below-minus-one": ([*CERTIFY[:2], "--max", "-2", *CERTIFY[4:]], ["--max", "-1 (all images)"], None, False),
    "max-zero": ([*CERTIFY[:2], "--max", "0", *CERTIFY[4:]], ["--max", "the first one not certified"], None, False),
    "max-past-2-53": ([*CERTIFY[:2], "--max", "9" * 20, *CERTIFY[4:]], ["--max", str(2**53)], None, False),
    "shard-count-past-2-53": ([*CERTIFY, "--shard", f"0/{10**20}"], ["--shard", str(2**53)], None, False),
    "certify-sidecar-is-a-users-json": (
        [*CERTIFY[:-1], "TMP/notes"],
        ["notes.json", "not certkit's settings file"],
        made("notes.json"),
        False,
    ),
    "train-subset-past-the-split": (
        [*TRAIN, "--train-subset", "100000000", "--out", "TMP/t"],
        ["--train-subset 100000000", "the train split has only 60,000 images"],
        None,
        False,
    ),
    "train-subset-word": ([*TRAIN, "--train-subset", "many", "--out", "TMP/t"], ["--train-subset"], None, False),
    "test-subset-negative": (
        [*TRAIN, "--test-subset", "-5", "--out", "TMP/t"],
        ["--test-subset", "expected an integer >= 0 (got -5)"],
        None,
        False,
    ),
    "milestones-words": (
        [*TRAIN, "--milestones", "a,b", "--out", "TMP/t"],
        ["--milestones", "comma-separated"],
        None,
        False,
    ),
    "hyperparameter-word": ([*TRAIN, "--num-noise-vec", "x", "--out", "TMP/t"], ["--num-noise-vec"], None, False),
    "unknown-flag": ([*TRAIN, "--bogus", "--out", "TMP/t"], ["--bogus"], None, False),
    # a warning (certifying at another sigma) must not add a line to the error that follows
    "warning-then-error": ([*CERTIFY, "--sigma", "0.5", "--n", "5"], ["CERTIFY needs n >= "], None, False),
    # crafted model.json
    "meta-classes-huge": (
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["model.json", "num_classes"],
        crafted_meta(lambda m: m.update(num_classes=10**12)),
        True,
    ),
    "meta-in-shape-huge": (
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["model.json", "in_shape"],
        crafted_meta(lambda m: m.update(in_shape=[3, 10**6, 10**6])),
        True,
    ),
    "meta-classes-string": (
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["model.json", "num_classes"],
        crafted_meta(lambda m: m.update(num_classes="10")),
        False,
    ),
    "meta-in-shape-2": (
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["model.json", "in_shape"],
        crafted_meta(lambda m: m.update(in_shape=[28, 28])),
        False,
    ),
    "meta-sigma-string": (
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["model.json", "sigma"],
        crafted_meta(lambda m: m.update(sigma="0.25")),
        False,
    ),
    "meta-sigma-huge": (  # a positive number passes the checkpoint's checks; the sampler refuses it
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["sigma", "(0, 100]", "got 1000"],
        crafted_meta(lambda m: m.update(sigma=1000)),
        False,
    ),
    "meta-std-zero": (
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["model.json", "std"],
        crafted_meta(lambda m: m["normalization"].update(std=[0.0])),
        False,
    ),
    "meta-weights-string": (
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["model.json", "'weights'"],
        crafted_meta(lambda m: m.update(weights="model.safetensors")),
        False,
    ),
    "meta-no-sha256": (
        [*CERTIFY[:1], "CRAFTED", *CERTIFY[2:]],
        ["model.json", "sha256", "re-save"],
        crafted_meta(lambda m: m["weights"].pop("sha256")),
        False,
    ),
    # reference checkpoints
    "reference-state-dict-list": (
        [*CERTIFY[:1], "REF", "--dataset", "fashion-mnist", *CERTIFY[2:]],
        ["ref.pth.tar", "state_dict"],
        reference_file({"state_dict": [torch.zeros(2)]}),
        False,
    ),
    "reference-int-keys": (
        [*CERTIFY[:1], "REF", "--dataset", "fashion-mnist", *CERTIFY[2:]],
        ["ref.pth.tar", "strings"],
        reference_file({"state_dict": {0: torch.zeros(2)}}),
        False,
    ),
    "reference-pickle-payload": (
        [*CERTIFY[:1], "REF", "--dataset", "fashion-mnist", *CERTIFY[2:]],
        ["ref.pth.tar", "refused"],
        reference_file(pickle.dumps({"state_dict": _Payload()})),
        False,
    ),
    # output paths, checked before any work
    "certify-out-empty": ([*CERTIFY[:-1], ""], ["--out is empty"], None, False),
    "certify-out-directory": ([*CERTIFY[:-1], "TMP/d"], ["TMP/d", "directory"], made("d", directory=True), False),
    "certify-out-no-folder": ([*CERTIFY[:-1], "TMP/no/c.tsv"], ["does not exist"], None, False),
    "certify-out-proc": ([*CERTIFY[:-1], "/proc/certkit.tsv"], ["/proc"], None, False),
    "certify-out-sys": ([*CERTIFY[:-1], "/sys/certkit.tsv"], ["/sys"], None, False),
    "certify-sidecar-directory": (CERTIFY, ["c.tsv.json", "directory"], made("c.tsv.json", directory=True), False),
    "train-out-file": ([*TRAIN, "--out", "TMP/f"], ["TMP/f", "not a directory"], made("f"), False),
    "train-out-empty": ([*TRAIN, "--out", ""], ["--out is empty"], None, False),
    "train-out-proc": ([*TRAIN, "--out", "/proc/certkit-run"], ["/proc"], None, False),
    "train-model-json-directory": (
        [*TRAIN, "--out", "TMP/t"],
        ["model.json", "directory"],
        made("t/model.json", directory=True),
        False,
    ),
    "demo-out-file": (["demo", "--out", "TMP/f"], ["TMP/f", "not a directory"], made("f"), False),
    "demo-out-sys": (["demo", "--out", "/sys/certkit-demo"], ["/sys"], None, False),
    "demo-device-meta": (["demo", "--out", "TMP/demo", "--device", "meta"], ["--device meta"], None, False),
    "merge-out-directory": (
        ["merge", "TMP/a.tsv", "--out", "TMP/d"],
        ["TMP/d", "directory"],
        made("d", directory=True),
        False,
    ),
    "merge-out-empty": (["merge", "TMP/a.tsv", "--out", ""], ["--out is empty"], None, False),
    "export-out-directory": (
        ["export", "RUN", "--format", "reference", "--out", "TMP/d"],
        ["TMP/d", "directory"],
        made("d", directory=True),
        False,
    ),
    # outputs that are the files the command reads its model from
    "export-out-run-weights": (
        ["export", "RUN", "--format", "reference", "--out", "RUNFILE"],
        ["--out", "model.safetensors", "would overwrite the run it reads"],
        in_run("model.safetensors"),
        False,
    ),
    "certify-overwrite-run-meta": (
        [*CERTIFY[:-1], "RUNFILE", "--overwrite"],
        ["--out", "model.json", "would overwrite the run it reads"],
        in_run("model.json"),
        False,
    ),
    "certify-sidecar-is-run-meta": (
        [*CERTIFY[:-1], "RUNFILE", "--overwrite"],
        ["writing", "model.json", "would overwrite the run it reads"],
        in_run("model"),
        False,
    ),
    "certify-run-named-by-its-meta-overwrite-weights": (
        ["certify", "RUNMETA", "--max", "2", "--out", "RUNFILE", "--overwrite"],
        ["--out", "model.safetensors", "would overwrite the run it reads"],
        named_by_meta("model.safetensors"),
        False,
    ),
    "certify-overwrite-reference-itself": (
        [*CERTIFY[:1], "REF", "--dataset", "fashion-mnist", *CERTIFY[2:-1], "REF", "--overwrite"],
        ["ref.pth.tar", "would overwrite the run it reads"],
        reference_file({"state_dict": {}}),
        False,
    ),
    # flags that do not apply to the certifier
    "epsilon-for-smoothing": ([*CERTIFY, "--epsilon", "0.3"], ["--epsilon", "GloRo", "--sigma"], None, False),
    "export-out-no-folder": (
        ["export", "RUN", "--format", "reference", "--out", "TMP/no/x.pth"],
        ["does not exist"],
        None,
        False,
    ),
    "report-plot-directory": (
        ["report", "TMP/a.tsv", "--plot", "TMP/d"],
        ["--plot", "directory"],
        made("d", directory=True),
        False,
    ),
    "report-plot-proc": (["report", "TMP/a.tsv", "--plot", "/proc/curves.png"], ["/proc"], None, False),
    "curves-plot-directory": (
        ["curves", "RUN", "--plot", "TMP/d"],
        ["--plot", "directory"],
        made("d", directory=True),
        False,
    ),
    # resume: no run, or a run that differs in what defines its result
    "resume-no-run": (
        [*TRAIN, "--out", "TMP/empty", "--resume"],
        ["holds no run"],
        made("empty", directory=True),
        False,
    ),
    "resume-other-lr-momentum": (resume("--lr", "0.5", "--momentum", "0"), ["--lr 0.01", "0.5"], None, False),
    "resume-other-momentum": (resume("--momentum", "0"), ["--momentum 0.9", "not 0.0"], None, False),
    "resume-other-lr-gamma": (resume("--lr-gamma", "0.5"), ["--lr-gamma 0.1", "0.5"], None, False),
    "resume-other-subset": (resume(subset="128"), ["--train-subset 256", "128"], None, False),
    "resume-other-arch": (resume("--arch", "resnet20"), ["--arch 'lenet'", "resnet20"], None, False),
    "resume-other-method": (resume("--method", "smoothmix"), ["--method 'gaussian'", "smoothmix"], None, False),
    "resume-other-dataset": (resume("--dataset", "mnist"), ["--dataset 'fashion-mnist'", "mnist"], None, False),
}


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots``, with a hash of each file's bytes."""
    seen: dict[str, str] = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return seen


def prepare(name: str, tmp: Path, run: Path, fmnist: Path) -> list[str]:
    argv, _, setup, _ = CASES[name]
    subs = {"RUN": str(run), "FMNIST": str(fmnist), **(setup(tmp, run) if setup else {})}
    return [subs.get(a, a.replace("TMP", str(tmp))) for a in argv]


def assert_one_line_refusal(code: int, err: str, words: list[str], tmp: Path) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    line = lines[0]
    assert line.startswith("certkit: error:") and "Traceback" not in err, line
    assert not any(internal in line for internal in ("<lambda>", "_positive_int", "weights_only=False")), line
    assert all(w.replace("TMP", str(tmp)) in line for w in words), line
    return line


@pytest.mark.parametrize(
    "name",
    # a measured case runs two processes (the wrapper and certkit): the slow tier
    [pytest.param(name, marks=pytest.mark.slow) if case[3] else name for name, case in CASES.items()],
)
def test_hostile_command_line_is_refused_in_one_line(
    name: str, run_dir: Path, fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = prepare(name, tmp_path, run_dir, fmnist_root)
    words, measured = CASES[name][1], CASES[name][3]
    before = snapshot(tmp_path, run_dir)
    if measured:
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE, *argv], env=ENV, capture_output=True, text=True, timeout=300
        )
        assert_one_line_refusal(proc.returncode, proc.stderr, words, tmp_path)
        peak = int(proc.stdout.strip().splitlines()[-1])
        assert peak < PEAK_BOUND, f"peak resident memory {peak >> 20} MiB"
    else:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusals
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        assert_one_line_refusal(code, err, words, tmp_path)
        assert "pickle payload ran" not in out
    assert snapshot(tmp_path, run_dir) == before


def test_a_failing_factory_is_one_line_naming_it_and_debug_works_after_the_subcommand(
    run_dir: Path,
    fmnist_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A failure inside your own --arch factory is yours: exit 1, one line naming the factory, no traceback
    and no request to report it to certkit; ``--debug``, before or after the subcommand, shows it."""
    custom_arch_module(tmp_path, run_dir)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = [*TRAIN, "--arch", "hostile_arch:broken", "--out", str(tmp_path / "t")]
    argv = [str(fmnist_root) if a == "FMNIST" else a for a in argv]
    before = snapshot(tmp_path)
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith("certkit: error: your factory --arch hostile_arch:broken raised KeyError")
    assert "--debug" in lines[0] and "report it" not in lines[0]
    assert snapshot(tmp_path) == before
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(KeyError):
            main(debug)


def test_an_unexpected_failure_is_one_line_naming_the_version_and_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failure no check foresaw inside certkit (a bug): exit 1, one line asking for a report, naming the
    version; with ``--debug`` the exception itself comes out."""
    from certkit import cli

    def broken(args: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_list", broken)
    assert main(["list"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certkit: error: unexpected ZeroDivisionError: a bug")
    assert f"certkit {__version__}" in lines[0] and "--debug" in lines[0] and "report it" in lines[0]
    with pytest.raises(ZeroDivisionError):
        main(["list", "--debug"])


@pytest.mark.slow  # a subprocess
def test_the_catch_all_through_a_real_process(fmnist_root: Path, tmp_path: Path) -> None:
    custom_arch_module(tmp_path, tmp_path)
    argv = [*TRAIN, "--arch", "hostile_arch:broken", "--out", str(tmp_path / "t")]
    argv = [str(fmnist_root) if a == "FMNIST" else a for a in argv]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "certkit", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "--debug" in lines[0], proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "certkit", "--debug", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "KeyError" in debug.stderr


def test_resume_with_the_same_settings_still_continues(run_dir: Path, fmnist_root: Path, tmp_path: Path) -> None:
    """The refusals above are about differences only: the unchanged command resumes (and trains no epoch
    more than asked)."""
    copy = tmp_path / "run"
    copy.mkdir()
    for f in run_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    argv = [str(fmnist_root) if a == "FMNIST" else str(copy) if a == "RUN" else a for a in resume()]
    assert main(argv) == 0
    assert json.loads((copy / "model.json").read_text())["epochs_completed"] == 1
