"""``certkit curves``: training curves from metrics.jsonl, epochs numbered from 1 as the console prints them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from certkit.cli import main
from certkit.curves import plot_training_curves, read_metrics
from certkit.errors import CertkitError


def _run(folder: Path, first_epoch: int, epochs: int = 3) -> Path:
    folder.mkdir(parents=True)
    lines = [
        {
            "epoch": first_epoch + e,
            "lr": 0.01,
            "seconds": 1.0,
            "loss": 1.0 / (e + 1),
            "acc": 0.5 + 0.1 * e,
            "test_clean_acc": 0.6,
            "test_noisy_acc": 0.55,
        }
        for e in range(epochs)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_epochs_count_from_one_whatever_the_file_counted_from(tmp_path: Path) -> None:
    assert [e["epoch"] for e in read_metrics(_run(tmp_path / "old", 0))] == [1, 2, 3]
    assert [e["epoch"] for e in read_metrics(_run(tmp_path / "new", 1))] == [1, 2, 3]


def test_curves_cli_plots_several_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _run(tmp_path / "a", 0), _run(tmp_path / "b", 1, epochs=2)
    out = tmp_path / "curves.svg"
    assert main(["curves", str(a), str(b), "--plot", str(out), "--labels", "gaussian,crt", "--title", "F-MNIST"]) == 0
    svg = out.read_text()
    assert "F-MNIST" in svg and "gaussian: test noisy" in svg and "crt: train" in svg
    assert f"plot: {out}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no metrics.jsonl"),
        ("", "no completed epoch"),
        ("{oops\n", ":1: not valid JSON"),
        ('{"loss": 1}\n', "integer 'epoch'"),
        ('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": "high"}\n', ":2: 'loss' is 'high', not a number"),
        ('{"epoch": 1, "loss": 0.5, "test_clean_acc": true}\n', "'test_clean_acc' is True, not a number"),
    ],
)
def test_bad_runs_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(CertkitError, match=message):
        read_metrics(run)
    assert main(["curves", str(run), "--plot", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "c.png").exists()


def test_a_run_without_accuracies_plots_without_warnings(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2, "loss": 0.4}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns of a legend with nothing to show
        assert plot_training_curves([run], tmp_path / "c.png").stat().st_size > 0


def test_a_one_epoch_run_is_drawn_as_points_and_a_result_file_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One epoch is one point per curve, which a line alone leaves invisible: it gets a marker."""
    import certkit.curves

    drawn: list = []
    monkeypatch.setattr(certkit.curves, "save_figure", lambda fig, path: drawn.append(fig) or Path(path))
    plot_training_curves([_run(tmp_path / "one", 1, epochs=1)], tmp_path / "c.png")
    lines = [line for ax in drawn[0].axes for line in ax.get_lines()]
    assert [line.get_marker() for line in lines] == ["o", "o", "s", "^"]  # loss; the accuracies told apart
    plot_training_curves([_run(tmp_path / "two", 1, epochs=2)], tmp_path / "c.png")
    assert all(line.get_marker() in (None, "None") for ax in drawn[1].axes for line in ax.get_lines())
    tsv = tmp_path / "r.tsv"
    tsv.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    assert main(["curves", str(tsv), "--plot", str(tmp_path / "d.png")]) == 2
    assert "r.tsv: not a certkit run folder" in capsys.readouterr().err
