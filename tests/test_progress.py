"""Progress for batch jobs: plain log lines with done/total, rate, ETA and the running scores, when no
terminal is attached; nothing from ranks other than 0."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from certkit.errors import CertkitError
from certkit.progress import Progress, interval_from_env


def test_lines_carry_count_rate_eta_and_note(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="certkit")
    with Progress(1000, "certify r.tsv", done=100, every=0, terminal=False) as bar:
        bar.update(50, "acc=0.800 acr=0.512")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # one at the update (every=0), one at the end
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
    from certkit.models import create_model
    from helpers import make_idx_dataset

    data = make_idx_dataset(tmp_path / "data", n_train=4, n_test=6)
    torch.manual_seed(0)
    run = tmp_path / "run"
    checkpoint.save(
        create_model("lenet", 10, (1, 28, 28)), run, checkpoint.make_meta("lenet", "mnist", 0.25, "gaussian")
    )
    monkeypatch.setenv("CERTKIT_PROGRESS_SECONDS", "0")
    code = main(
        [
            "certify",
            str(run),
            "--data-dir",
            str(data),
            "--n0",
            "10",
            "--n",
            "100",
            "--batch",
            "100",
            "--out",
            str(tmp_path / "r.tsv"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("certkit: certify r.tsv: ")]
    assert lines and lines[-1].startswith("certkit: certify r.tsv: 6/6 (100.0%)") and "acr=" in lines[-1]
