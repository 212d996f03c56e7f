"""Progress for batch jobs: plain log lines with done/total, rate, ETA and the running scores, when no
terminal is attached; nothing from ranks other than 0."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from certkit.errors import CertkitError
from certkit.progress import Progress, interval_from_env
from certkit.report import exact_accuracy, exact_acr, floor_figure
from certkit.results import read_results


def test_lines_carry_count_rate_eta_and_note(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="certkit")
    with Progress(1000, "certify r.tsv", done=100, every=0, terminal=False) as bar:
        bar.update(50, "acc=0.800 acr=0.512")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1  # at the update (every=0); a closing line would only repeat it
    assert lines[0].startswith("certify r.tsv: 150/1,000 (15.0%), ")
    assert " img/s, ETA " in lines[0] and lines[0].endswith("| acc=0.800 acr=0.512")


def test_disabled_and_idle_bars_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="certkit")
    with Progress(10, "rank 1", every=0, terminal=False, enabled=False) as bar:
        bar.update(5)
    with Progress(10, "slow", every=3600, terminal=False) as bar:
        bar.update(5)  # below the interval: only the closing line
    with Progress(10, "resumed, nothing left", done=10, every=0, terminal=False):
        pass
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["slow"]


def test_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTKIT_PROGRESS_SECONDS", "5")
    assert interval_from_env() == 5.0
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv("CERTKIT_PROGRESS_SECONDS", bad)
        with pytest.raises(CertkitError, match="CERTKIT_PROGRESS_SECONDS"):
            interval_from_env()


def test_certify_with_redirected_output_logs_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a SLURM user sees in the job's log: progress lines on stderr (not only 'wrote' at the end)."""
    import torch

    from certkit import checkpoint
    from certkit.cli import main
    from certkit.data import load_dataset
    from certkit.models import create_model
    from helpers import make_idx_dataset

    data = make_idx_dataset(tmp_path / "data", n_train=4, n_test=6)
    torch.manual_seed(0)
    run = tmp_path / "run"
    # a LeNet that always answers the first test image's label: the rows it gets right, it certifies
    model = create_model("lenet", 10, (1, 28, 28))
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    labels = [int(load_dataset("mnist", "test", data)[i][1]) for i in range(6)]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[labels[0]] = 10.0
    checkpoint.save(model, run, checkpoint.make_meta("lenet", "mnist", 0.25, "gaussian"))
    argv = ["certify", str(run), "--data-dir", str(data), "--n0", "10", "--n", "100", "--batch", "100"]
    out = tmp_path / "r.tsv"
    monkeypatch.setenv("CERTKIT_PROGRESS_SECONDS", "soon")  # refused before the result file is created
    assert main([*argv, "--out", str(out)]) == 2
    assert "CERTKIT_PROGRESS_SECONDS" in capsys.readouterr().err and not list(tmp_path.glob("r.*"))
    monkeypatch.setenv("CERTKIT_PROGRESS_SECONDS", "0")
    assert main([*argv, "--max", "3", "--out", str(out)]) == 0  # the first three, then all six, resumed
    capsys.readouterr()
    code = main([*argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "certkit: resuming " + str(out) + ": 3 of 6 rows done" in captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("certkit: certify r.tsv: ")]
    assert lines and lines[-1].startswith("certkit: certify r.tsv: 6/6 (100.0%)") and "acr=" in lines[-1]
    assert len(lines) == len(set(lines))  # no closing line repeating the last one
    assert "ETA ?" not in captured.err  # the kept rows set the note; no line before this session has a rate
    # the running figures cover the file's six rows, the three kept ones included, as the result line does
    res = read_results(out)
    acc, acr = floor_figure(exact_accuracy(res, 0.0)), floor_figure(exact_acr(res))
    assert labels[:3].count(labels[0]) != labels[3:].count(labels[0])  # this session's rows alone score otherwise
    assert lines[-1].endswith(f"acc={acc} acr={acr}") and exact_acr(res) > 0
    assert f"certify: 6 images, accuracy {acc}, ACR {acr}, abstained" in captured.out
