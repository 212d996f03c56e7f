"""Everyday workflows (issue 16): a fast --help/--version, help texts without glitches, certify --overwrite,
training progress and per-epoch lines in batch jobs, --log csv/tensorboard, and one epoch numbering."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from certkit import checkpoint
from certkit.cli import main
from certkit.data import load_dataset
from certkit.models import create_model
from certkit.objectives import Gaussian
from certkit.results import read_results, read_sidecar
from certkit.train import STATE, TrainConfig, Trainer
from helpers import train_argv
from test_cli import run  # exit status, stdout and stderr of one in-process command

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_do_not_import_torch(flag: str) -> None:
    """-X importtime lists every module the process imports, on stderr."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "certkit", flag],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0 and "certkit" in done.stdout
    modules = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "certkit.cli" in modules  # the listing is real
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    def help_of(command: str) -> str:
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        return out

    train = help_of("train")
    assert "50%/75%" in train and "%%" not in train
    assert "--lr-gamma LR_GAMMA" in train and "--gamma GAMMA" in train  # the LR decay is not MACER's gamma
    certify = " ".join(help_of("certify").split())
    assert "(default: None)" not in certify and "(default: the one the checkpoint names)" in certify
    shared = certify[certify.index("--shared-noise G groups") : certify.index("--shard SHARD i/k")]
    assert shared.count("default") == 1 and shared.endswith("0: off (default: 0) ")
    assert "--overwrite replace an existing --out" in certify
    demo = " ".join(help_of("demo").split())
    assert "--device DEVICE auto (cuda when present, else cpu)" in demo


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    out = tmp_path_factory.mktemp("wf") / "run"
    assert main(train_argv(fmnist_root, train_subset=256, test_subset=0, batch_size=64, out=out)) == 0
    return out


def test_certify_overwrite_replaces_instead_of_resuming(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tsv = tmp_path / "r.tsv"
    base = ["certify", str(run_dir), "--n0", "10", "--n", "50", "--max", "3", "--out", str(tsv)]
    assert run(capsys, *base)[0] == 0
    code, _, err = run(capsys, *base[:-2], "--n", "80", "--out", str(tsv))
    assert code == 2 and "settings differ in n" in err  # without --overwrite: refused, as before
    assert run(capsys, *base, "--n", "80", "--overwrite")[0] == 0
    assert read_sidecar(tsv)["settings"]["n"] == 80 and read_results(tsv).idx.tolist() == [0, 1, 2]


def test_compile_on_cpu_hides_the_cuda_runtime_note(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's C++ toolchain lookup logs this warning on machines with a CUDA toolkit but no GPU; a faithful
    stand-in for the slow real compile logs it the same way."""

    def compile_like_torch(model: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/usr'")
        return model

    monkeypatch.setattr(torch, "compile", compile_like_torch)
    monkeypatch.setattr(logging.getLogger("torch.utils.cpp_extension"), "level", logging.NOTSET)
    code, _, err = run(
        capsys,
        "certify",
        str(run_dir),
        "--n0",
        "10",
        "--n",
        "50",
        "--max",
        "1",
        "--compile",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "c.tsv"),
    )
    assert code == 0 and "No CUDA runtime" not in err


def test_training_logs_progress_and_counts_epochs_from_one(
    fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTKIT_PROGRESS_SECONDS", "0")  # a line at every batch
    out = tmp_path / "run"
    argv = train_argv(fmnist_root, epochs=2, train_subset=192, test_subset=50, batch_size=64, log="csv", out=out)
    code, stdout, err = run(capsys, *argv)
    assert code == 0 and stdout.startswith("trained lenet with gaussian")
    lines = err.splitlines()  # stderr is not a terminal here: plain lines, no bar
    batch_lines = [line for line in lines if line.startswith("certkit: epoch 2/2: ")]
    assert [line.split(": ")[2].split(" ")[0] for line in batch_lines] == ["1/3", "2/3", "3/3"]
    assert all(" batch/s, ETA " in line and "| loss=" in line for line in batch_lines)
    assert sum(line.startswith("certkit: epoch 1/2  loss ") for line in lines) == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [e["epoch"] for e in json.loads((out / "model.json").read_text())["cost"]["epochs"]] == [1, 2]
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[0] == "epoch" and "test_clean_acc" in csv_lines[0].split(",")
    assert [row.split(",")[0] for row in csv_lines[1:]] == ["1", "2"]
    assert float(csv_lines[2].split(",")[csv_lines[0].split(",").index("loss")]) == pytest.approx(records[1]["loss"])
    # resumed for a third epoch without --log csv: the file the run wrote is kept up to date, and it says so
    again = train_argv(fmnist_root, "--resume", epochs=3, train_subset=192, test_subset=50, batch_size=64, out=out)
    code, _, err = run(capsys, *again)
    assert code == 0 and "metrics.csv is kept up to date" in err
    assert [row.split(",")[0] for row in (out / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_resume_renumbers_a_run_that_counted_from_zero(fmnist_root: Path, tmp_path: Path) -> None:
    data = load_dataset("fashion-mnist", "train", str(fmnist_root)).subset(128)

    def trainer(epochs: int) -> Trainer:
        torch.manual_seed(0)
        model = create_model("lenet", 10, (1, 28, 28), [0.0], [1.0])
        cfg = TrainConfig(epochs=epochs, batch_size=64)
        meta = {"arch": "lenet", "normalization": {"mean": [0.0], "std": [1.0]}}
        return Trainer(
            model, Gaussian(0.25), data, None, cfg, out_dir=tmp_path, meta=meta, device="cpu", progress=False
        )

    trainer(1).run()
    # rewrite the resume state as a run from before the numbering was unified: epochs counted from 0
    raw = (tmp_path / STATE).read_bytes()
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    with safe_open(str(tmp_path / STATE), framework="pt") as f:
        info = json.loads(f.metadata()["certkit_resume"])
    for record in info["history"] + info["meta"]["cost"]["epochs"]:
        record["epoch"] -= 1
    (tmp_path / STATE).write_bytes(checkpoint.state_to_bytes(st_load(raw), {"certkit_resume": json.dumps(info)}))
    trainer(2).run(resume=True)
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [e["epoch"] for e in json.loads((tmp_path / "model.json").read_text())["cost"]["epochs"]] == [1, 2]


def test_log_tensorboard_without_the_package_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # an import of it raises ImportError
    code, _, err = run(capsys, "train", "--epochs", "1", "--log", "tensorboard", "--out", str(tmp_path / "run"))
    assert (
        code == 2
        and err
        == "certkit: error: --log tensorboard needs the tensorboard package: pip install 'certkit[tensorboard]'\n"
    )
    assert not (tmp_path / "run").exists()  # refused before any data was read or any file written


def test_log_tensorboard_writes_one_scalar_per_metric_and_epoch(
    fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensorboard package is an optional extra; a recording stand-in for its SummaryWriter checks what
    certkit hands it."""
    calls: list[tuple[str, float, int]] = []
    dirs: list[str] = []

    class Writer:
        def __init__(self, log_dir: str) -> None:
            dirs.append(log_dir)

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            calls.append((tag, value, global_step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    out = tmp_path / "run"
    assert (
        run(
            capsys,
            *train_argv(
                fmnist_root, epochs=2, train_subset=128, test_subset=0, batch_size=64, log="tensorboard", out=out
            ),
        )[0]
        == 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert dirs == [str(out)]
    assert [(tag, step) for tag, _, step in calls if tag == "loss"] == [("loss", 1), ("loss", 2)]
    assert {(tag, step): value for tag, value, step in calls}[("loss", 2)] == pytest.approx(records[1]["loss"])
    assert not any(tag == "epoch" for tag, _, _ in calls)


def test_the_package_names_resolve_lazily_and_train_stays_the_function() -> None:
    """certkit imports torch-backed names on first use; importing the certkit.train submodule (as this
    test file did) must not replace the certkit.train function with the module."""
    import certkit
    import certkit.train as submodule_import  # noqa: F401

    assert callable(certkit.train) and certkit.train.__module__ == "certkit.train"
    assert certkit.Smooth.__name__ == "Smooth" and certkit.load.__module__ == "certkit.checkpoint"
    with pytest.raises(AttributeError):
        certkit.no_such_name  # noqa: B018


class _Board:
    """Stands in for ``torch.utils.tensorboard.SummaryWriter`` (the optional package is not installed for the
    tests): records every scalar, and writes an event file's name as the real one does."""

    scalars: ClassVar[list[tuple[str, float, int]]] = []

    def __init__(self, log_dir: str) -> None:
        (Path(log_dir) / "events.out.tfevents.0.test").touch()

    def add_scalar(self, key: str, value: float, global_step: int) -> None:
        self.scalars.append((key, value, global_step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_log_tensorboard_writes_every_epoch_and_a_resume_repeats_the_last_saved_one(
    fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each epoch's numbers go to TensorBoard at its step (from 1). A kill between an epoch's save and its
    scalars would lose that epoch, so a resume writes the last saved one again (the same values at the same
    step); a resume without the flag says the event files get no more epochs."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_Board))
    monkeypatch.setattr(_Board, "scalars", [])
    out = tmp_path / "run"
    common = dict(train_subset=128, test_subset=0, batch_size=64, out=out)
    assert run(capsys, *train_argv(fmnist_root, "--log", "tensorboard", epochs=2, **common))[0] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {(k, v, r["epoch"]) for r in records for k, v in r.items() if k != "epoch"}
    assert set(_Board.scalars) == expected and {"loss", "lr"} <= {k for k, _, _ in expected}
    before = len(_Board.scalars)
    argv = train_argv(fmnist_root, "--log", "tensorboard", "--resume", epochs=3, **common)
    assert run(capsys, *argv)[0] == 0
    again = _Board.scalars[before:]
    assert sorted({s for _, _, s in again}) == [2, 3]
    assert {(k, v) for k, v, s in again if s == 2} == {(k, v) for k, v, s in _Board.scalars[:before] if s == 2}
    code, _, err = run(capsys, *train_argv(fmnist_root, "--resume", epochs=4, **common))
    assert code == 0 and "get no more epochs without --log tensorboard" in err


@pytest.mark.slow  # an epoch over the whole training split
def test_a_run_recorded_with_a_setting_now_refused_still_resumes(
    fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An older certkit recorded settings no part of the run read (--momentum with Adam) and subsets larger
    than their split (which trained on the whole split): the same run resumes without them."""
    from safetensors import safe_open
    from safetensors.torch import load as st_load

    out = tmp_path / "run"
    common = dict(test_subset=0, batch_size=64, optimizer="adam", lr=0.001, out=out)
    argv = train_argv(fmnist_root, epochs=1, train_subset=128, **common)
    assert run(capsys, *argv)[0] == 0
    state = out / STATE
    with safe_open(str(state), framework="pt") as f:
        info = json.loads(f.metadata()["certkit_resume"])
    info["meta"]["train"]["momentum"] = 0.5  # what an older certkit recorded for --momentum 0.5 with Adam
    info["meta"]["train_subset"] = 100_000_000  # what an older certkit recorded for a subset past the split
    state.write_bytes(checkpoint.state_to_bytes(st_load(state.read_bytes()), {"certkit_resume": json.dumps(info)}))
    code, _, err = run(capsys, *train_argv(fmnist_root, "--resume", epochs=2, **common))  # the whole split
    assert code == 0, err
    assert json.loads((out / "model.json").read_text())["epochs_completed"] == 2


def test_an_interrupted_train_says_whether_resume_can_continue_it(
    fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C before the first epoch was saved leaves nothing to resume: the hint says to start again, and
    only once an epoch is saved does it point to --resume."""
    out = tmp_path / "run"
    argv = train_argv(fmnist_root, epochs=1, train_subset=64, test_subset=0, batch_size=64, out=out)

    def interrupted(self: Trainer):  # Ctrl-C as the next epoch starts
        raise KeyboardInterrupt
        yield  # a generator, as fit_epochs is

    monkeypatch.setattr(Trainer, "fit_epochs", interrupted)
    code, _, err = run(capsys, *argv)
    assert code == 130 and err.strip().splitlines()[-1] == (
        "certkit: interrupted; no epoch was saved: rerun the same command to start again"
    )
    monkeypatch.undo()
    assert run(capsys, *argv)[0] == 0  # the same command starts the run
    monkeypatch.setattr(Trainer, "fit_epochs", interrupted)
    code, _, err = run(
        capsys, *train_argv(fmnist_root, "--resume", epochs=2, train_subset=64, test_subset=0, batch_size=64, out=out)
    )
    assert code == 130 and err.strip().endswith("rerun the command with --resume to continue from the last saved epoch")
