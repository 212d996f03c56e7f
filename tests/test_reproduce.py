"""``certkit reproduce``: protocols train, certify, resume at every level and compare paired with published files."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from certkit.errors import CertkitError
from certkit.experiments import reproduce as rp
from certkit.results import read_results, summary_path
from helpers import make_idx_dataset


def _write_published(folder: Path, n: int, seed: int = 1) -> Path:
    """A published-style result file (reference format: radius to 3 decimals) for indices 0..n-1."""
    rng = np.random.default_rng(seed)
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    for i in range(n):
        correct = int(rng.random() < 0.7)
        lines.append(f"{i}\t0\t{0 if correct else 1}\t{rng.random() * 0.9:.3f}\t{correct}\t0:00:00.5")
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
    theirs_path = _write_published(published / "sigma_0.25", 20)
    plan = _plan(tmp_path, data)

    text = rp.run(plan, published)
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
    assert row.published_accuracy.tolist() == pytest.approx([np.mean(same[0] & (same[1] >= r)) for r in rp.RADII])
    assert not row.partial

    # a second call trains nothing and certifies nothing again
    weights = (run / "model.safetensors").stat().st_mtime_ns
    rp.run(plan, published)
    assert (run / "model.safetensors").stat().st_mtime_ns == weights
    assert Path(f"{run}.log").read_text().count("$ ") == 1

    # an interrupted certification (rows cut, no summary) is continued, not restarted
    lines = mine_path.read_text().splitlines(keepends=True)
    mine_path.write_text("".join(lines[:3]))
    summary_path(mine_path).unlink()
    rp.run(plan, published)
    assert list(read_results(mine_path).idx) == [0, 4, 8, 12, 16]
    assert read_results(mine_path).radius[:2].tolist() == mine.radius[:2].tolist()


def test_an_unfinished_run_is_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose model.json records fewer completed epochs than its config asks for is continued with
    --resume (what certkit train then does is tested in test_train); a finished one is left alone."""
    plan = _plan(tmp_path, tmp_path)
    run = rp.run_dir(plan.out, "gaussian", 0.25)
    run.mkdir(parents=True)
    (run / "train_state.safetensors").write_bytes(b"")
    calls: list[list[str]] = []
    monkeypatch.setattr(rp, "_certkit", lambda args, log: calls.append(list(args)) or 0)
    for completed, expect_call in ((1, True), (90, False)):
        (run / "model.json").write_text(f'{{"epochs_completed": {completed}, "train": {{"epochs": 90}}}}')
        calls.clear()
        rp.train_step(plan, "gaussian", 0.25)
        assert bool(calls) == expect_call
        assert not calls or calls[0][-1] == "--resume"


def test_crt_waits_for_its_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(tmp_path, tmp_path, methods=("crt",))
    plan.protocol = rp.PROTOCOLS["fmnist-crt"]
    assert rp.train_step(plan, "crt", 0.25) is False
    assert "teacher" in capsys.readouterr().out
    assert not rp.run_dir(plan.out, "crt", 0.25).exists()


def test_selection_flags_are_checked() -> None:
    parser = argparse.ArgumentParser()
    rp.add_arguments(parser)
    plan = rp.plan_from_args(parser.parse_args(["fmnist-rs", "--methods", "gaussian,smoothmix", "--sigmas", "0.25"]))
    assert plan.methods == ("gaussian", "smoothmix") and plan.sigmas == (0.25,)
    assert plan.n == 100_000 and plan.skip == 10
    with pytest.raises(CertkitError, match="crt"):
        rp.plan_from_args(parser.parse_args(["fmnist-rs", "--methods", "crt"]))
    with pytest.raises(CertkitError, match=r"0\.3"):
        rp.plan_from_args(parser.parse_args(["fmnist-rs", "--sigmas", "0.3"]))


def test_a_crt_rows_cost_is_set_against_its_teachers() -> None:
    student = {"seconds": 100.0, "forward": 600.0, "backward": 600.0, "teacher_forward": 600.0, "steps": 5}
    teacher = {"arch": "lenet", "method": "smoothmix", "seconds": 1000.0}
    teacher["total"] = {"seconds": 1000.0, "forward": 9600.0, "backward": 9600.0, "steps": 40}
    line = rp.cost_ledger("crt", 0.25, {"total": student, "ancestors": [teacher]})
    assert line == (
        "crt sigma=0.25: 100 s, 1,800 image passes (teacher forwards included); its teacher lenet smoothmix "
        "1,000 s, 19,200 image passes: 10.0x less by the clock, 10.7x by image passes"
    )
    # runs without a teacher have no ledger line
    assert rp.cost_ledger("gaussian", 0.25, {"total": student}) is None and rp.cost_ledger("crt", 0.25, {}) is None
