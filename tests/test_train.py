"""The trainer: learns on real data, counts its cost, and resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from torch.utils.data import TensorDataset

from certkit import checkpoint
from certkit.data import ArrayDataset, dataset_info, load_dataset
from certkit.errors import CertkitError
from certkit.methods import get_objective
from certkit.models import create_model
from certkit.objectives import CRT
from certkit.objectives.gaussian import Gaussian
from certkit.recipes import get_recipe
from certkit.stepgraph import StepRunner
from certkit.train import STATE, TrainConfig, Trainer, recipe, train
from helpers import quiet_trainer, tiny_data


def _trainer(out: Path | None, epochs: int = 3, seed: int = 0, schedule: str = "step", **config: Any) -> Trainer:
    torch.manual_seed(123)
    settings: dict[str, Any] = dict(epochs=epochs, batch_size=16, lr=0.05, lr_step=2, seed=seed, test_batch_size=32)
    cfg = TrainConfig(**{**settings, "schedule": schedule, **config})
    return quiet_trainer("smallcnn", (1, 28, 28), Gaussian(0.25), tiny_data(), tiny_data(32, seed=1), cfg, out)


def test_two_runs_taking_turns_train_what_each_trains_alone(tmp_path: Path) -> None:
    """``run_epochs`` lets two runs alternate epoch by epoch (the demo times its students so): each epoch
    reseeds its own noise, so the weights are those of the same runs trained one after the other."""
    alone = [_trainer(tmp_path / f"alone{seed}", seed=seed) for seed in (0, 1)]
    for t in alone:
        t.run()
    turns = [_trainer(tmp_path / f"turns{seed}", seed=seed).run_epochs() for seed in (0, 1)]
    records: list[dict] = []
    while turns:
        step = [(run, next(run, None)) for run in turns]
        records += [r for _, r in step if r is not None]
        turns = [run for run, r in step if r is not None]
    assert [r["epoch"] for r in records] == [1, 1, 2, 2, 3, 3]
    for seed, t in zip((0, 1), alone):
        mine = checkpoint.load_with_meta(tmp_path / f"turns{seed}")[0].state_dict()
        for k, v in t.model.state_dict().items():
            assert torch.equal(v, mine[k]), k
    assert not list(tmp_path.glob("*.lock"))  # each run released its lock when it was done


def test_ledger_counts_passes_and_time(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", epochs=2)
    t.fit()
    for e in t.ledger.epochs:
        assert e["forward"] == 64 and e["backward"] == 64  # 1 + 1 pass per image; test passes not counted
        assert e["seconds"] > 0 and e["steps"] == 4
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["cost"]["total"]["forward"] == 128 and meta["epochs_completed"] == 2
    assert meta["cost"]["device"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "test_clean_acc" in json.loads(lines[-1])


@pytest.mark.parametrize(
    ("schedule", "config"),
    [("step", {}), ("multistep", {"milestones": (3,)}), ("cosine", {}), ("step", {"optimizer": "adam", "lr": 1e-3})],
)
def test_resume_is_exact(tmp_path: Path, schedule: str, config: dict[str, Any]) -> None:
    full = _trainer(None, epochs=4, schedule=schedule, **config)
    full.fit()
    part = _trainer(tmp_path / "run", epochs=4, schedule=schedule, **config)
    for epoch in range(2):  # an interrupted run: two epochs completed and saved
        part.history.append(part.train_epoch(epoch))
        part.save(epoch)
    resumed = _trainer(tmp_path / "run", epochs=4, schedule=schedule, **config)
    assert resumed.resume() and resumed.start_epoch == 2
    resumed.fit()
    rates = [e["lr"] for e in resumed.history]
    assert rates == [e["lr"] for e in full.history] and rates[3] < rates[1]  # the resumed part decays the rate
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(resumed.ledger.epochs) == 4
    assert torch.equal(checkpoint.load(tmp_path / "run")[1].classifier[1].weight, full.model[1].classifier[1].weight)


def _rewrite_resume_record(run: Path, edit: Callable[[Any], Any]) -> None:
    """Replace the resume file's JSON record by ``edit(record)``, the tensors kept."""
    raw = (run / STATE).read_bytes()
    with safe_open(str(run / STATE), framework="pt") as f:
        record = json.loads(f.metadata()["certkit_resume"])
    (run / STATE).write_bytes(checkpoint.state_to_bytes(st_load(raw), {"certkit_resume": json.dumps(edit(record))}))


def test_an_adam_run_saved_by_a_captured_step_resumes_on_cpu(tmp_path: Path) -> None:
    run = tmp_path / "run"
    part = _trainer(run, epochs=2, optimizer="adam", lr=1e-3)
    part.history.append(part.train_epoch(0))
    part.save(0)

    def captured(record: Any) -> Any:  # what a --compile graph run on CUDA saves
        record["optimizer"]["param_groups"][0]["capturable"] = True
        return record

    _rewrite_resume_record(run, captured)
    resumed = _trainer(run, epochs=2, optimizer="adam", lr=1e-3)
    assert resumed.resume()
    assert resumed.optimizer.param_groups[0]["capturable"] is False  # this process's own way of stepping
    resumed.fit()
    assert len(resumed.history) == 2


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: {},
        lambda r: [r],
        lambda r: {**r, "epoch": "1"},
        lambda r: {**r, "optimizer": {"param_groups": 1}},
        lambda r: {**r, "epoch": -5},  # would train from epoch -4 on, past the epochs model.json records
        lambda r: {**r, "epoch": True},
        lambda r: {**r, "epoch": 3},
        lambda r: {**r, "history": [1, 2]},
        lambda r: {**r, "meta": {**r["meta"], "hparams": [1, 2]}},
        lambda r: {**r, "meta": {**r["meta"], "hparams": "ab"}},
        lambda r: {**r, "meta": {**r["meta"], "cost": "x"}},
        lambda r: {**r, "scheduler": {**r["scheduler"], "last_epoch": "abc"}},
        lambda r: {**r, "scheduler": {**r["scheduler"], "_last_lr": "abc"}},
        lambda r: {**r, "optimizer": {**r["optimizer"], "plain_state": {"x": {}}}},
    ],
)
def test_a_damaged_resume_record_is_a_one_line_error(tmp_path: Path, edit: Callable[[Any], Any]) -> None:
    run = tmp_path / "run"
    part = _trainer(run, epochs=2)
    part.history.append(part.train_epoch(0))
    part.save(0)
    _rewrite_resume_record(run, edit)
    with pytest.raises(CertkitError, match="cannot resume from it"):
        _trainer(run, epochs=2).resume()


def _rewrite_resume_tensors(run: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Replace the resume file's tensors by ``edit(tensors)``, the record kept."""
    with safe_open(str(run / STATE), framework="pt") as f:
        metadata = f.metadata()
    (run / STATE).write_bytes(checkpoint.state_to_bytes(edit(st_load((run / STATE).read_bytes())), metadata))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t, k: {**t, k: torch.full_like(t[k], float("nan"))}, "holds NaN or inf"),
        (lambda t, k: {**t, k: torch.zeros(3)}, "has shape"),
        (lambda t, k: {**t, "optim.99.momentum_buffer": torch.zeros(1)}, "names no parameter"),
    ],
)
def test_damaged_optimizer_state_is_refused_before_it_is_used(
    tmp_path: Path, edit: Callable[[dict[str, torch.Tensor], str], dict[str, torch.Tensor]], match: str
) -> None:
    """A NaN momentum would make the first step's weights NaN after the loss was checked, and the run would
    publish them; a momentum of another shape would fail inside the first step."""
    run = tmp_path / "run"
    part = _trainer(run, epochs=2)
    part.history.append(part.train_epoch(0))
    part.save(0)
    _rewrite_resume_tensors(run, lambda raw: edit(raw, next(k for k in raw if k.endswith("momentum_buffer"))))
    with pytest.raises(CertkitError, match=f"cannot resume from it \\(optim.*{match}"):
        _trainer(run, epochs=2).resume()


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    run = tmp_path / "run"
    part = _trainer(run, epochs=2)
    part.history.append(part.train_epoch(0))
    with torch.no_grad():
        next(part.model.parameters())[0].fill_(float("nan"))
    with pytest.raises(CertkitError, match="training diverged at epoch 1: the weights became NaN or inf"):
        part.save(0)
    assert not any(run.glob("*.safetensors"))


def test_a_run_saved_with_torchs_steplr_state_resumes_on_its_schedule(tmp_path: Path) -> None:
    """A resume file written by an older certkit holds StepLR's state: the run goes on from that position
    with the schedule of its settings (the decays where an uninterrupted run has them)."""
    full = _trainer(None, epochs=4)
    full.fit()
    run = tmp_path / "run"
    part = _trainer(run, epochs=4)
    for epoch in range(2):
        part.history.append(part.train_epoch(epoch))
        part.save(epoch)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    older = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    for _ in range(2):
        opt.step()
        older.step()

    def steplr(record: Any) -> Any:
        record["scheduler"] = json.loads(json.dumps(older.state_dict()))
        return record

    _rewrite_resume_record(run, steplr)
    resumed = _trainer(run, epochs=4)
    assert resumed.resume()
    resumed.fit()
    assert [e["lr"] for e in resumed.history] == [e["lr"] for e in full.history]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_weights_of_another_shape_are_a_one_line_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    part = _trainer(run, epochs=2)
    part.history.append(part.train_epoch(0))
    part.save(0)
    _rewrite_resume_tensors(
        run,
        lambda raw: {**raw, next(k for k in raw if k.startswith("model.") and k.endswith("weight")): torch.zeros(3)},
    )
    with pytest.raises(CertkitError, match="cannot resume from it"):
        _trainer(run, epochs=2).resume()


def _rates(trainer: Trainer, epochs: int) -> list[float]:
    """The rate of every epoch, stepping the trainer's scheduler after each as the trainer does."""
    rates = []
    for _ in range(epochs):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()  # no gradients: the weights stay; torch warns of a schedule stepped first
        trainer.scheduler.step()
    return rates


def _step_lr_rates(epochs: int, step_size: int, after_epoch: bool) -> list[float]:
    """The rate of every epoch of a script driving torch's StepLR with ``step(epoch)``: before each epoch
    (Cohen et al.'s train.py) or after it (the smoothmix and smoothing-catrs scripts)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.1)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates step(epoch); those scripts use it
        for epoch in range(epochs):
            if not after_epoch:
                scheduler.step(epoch)
            rates.append(opt.param_groups[0]["lr"])
            if after_epoch:
                scheduler.step(epoch)
    return rates


def test_the_step_schedule_decays_when_the_official_scripts_do() -> None:
    """Every epoch of a 90-epoch run gets the rate the reference scripts gave it: with lag 1 (the family
    recipes) as the RS codes whose numbers they follow (31 epochs at the first rate), with lag 0 (torch's
    StepLR, the default) as Cohen et al.'s."""
    late = _rates(_trainer(None, epochs=90, lr_step=30, lr_step_lag=1), 90)
    assert late == pytest.approx(_step_lr_rates(90, 30, after_epoch=True), rel=1e-12)
    assert late[30] == late[0] and late[31] == pytest.approx(late[0] * 0.1)
    on_time = _rates(_trainer(None, epochs=90, lr_step=30), 90)
    assert on_time == pytest.approx(_step_lr_rates(90, 30, after_epoch=False), rel=1e-12)
    assert on_time[30] == pytest.approx(on_time[0] * 0.1)
    assert get_recipe("cohen-cifar10").train["lr_step_lag"] == 0
    assert TrainConfig.for_method("mnist", "gaussian").lr_step_lag == 1
    with pytest.raises(CertkitError, match="--lr-step-lag"):
        TrainConfig(lr_step_lag=-1)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", epochs=1)
    t.fit()
    other = _trainer(tmp_path / "run", epochs=3, seed=7)
    with pytest.raises(CertkitError, match="seed"):
        other.resume()


def test_resume_refuses_another_sigma_or_method_setting(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", epochs=1)
    t.fit()
    other = _trainer(tmp_path / "run", epochs=3)
    other.objective = Gaussian(0.5)
    with pytest.raises(CertkitError, match=r"--sigma 0\.25, not 0\.5"):
        other.resume()
    other.objective = Gaussian(0.25)
    other.objective.hparams["extra"] = 1  # a method setting the saved run did not have
    with pytest.raises(CertkitError, match="--extra None, not 1"):
        other.resume()


def test_resume_extends_a_step_schedule_but_not_a_cosine_one(tmp_path: Path) -> None:
    _trainer(tmp_path / "step", epochs=1).fit()
    longer = _trainer(tmp_path / "step", epochs=2)  # step: more epochs leave the first epochs' rates unchanged
    assert longer.resume() and longer.start_epoch == 1
    _trainer(tmp_path / "cos", epochs=1, schedule="cosine").fit()
    with pytest.raises(CertkitError, match="cosine learning-rate schedule, which --epochs 2 would change"):
        _trainer(tmp_path / "cos", epochs=2, schedule="cosine").resume()  # every rate depends on the total


class _Ramped(Gaussian):
    """A method whose every epoch depends on the run's length, as GloRo's ε ramp."""

    def schedule_reads_total_epochs(self) -> bool:
        return True


def test_resume_with_more_epochs_is_refused_where_the_epochs_trained_would_have_differed(tmp_path: Path) -> None:
    _trainer(tmp_path / "ramp", epochs=1).fit()
    ramped = _trainer(tmp_path / "ramp", epochs=2)
    ramped.objective = _Ramped(0.25)
    with pytest.raises(CertkitError, match="gaussian's ramps, which end at a share of the run"):
        ramped.resume()
    gloro = get_objective("gloro")
    assert gloro(epsilon=0.3, eps_ramp=0.5).schedule_reads_total_epochs()
    assert gloro(epsilon=0.3, eps_ramp=0.0, lbd_start=0.5).schedule_reads_total_epochs()
    assert not gloro(epsilon=0.3, eps_ramp=0.0).schedule_reads_total_epochs()
    # milestones derived from --epochs (CRT's 50% and 75%) move with it: said as such, not as --milestones
    _trainer(tmp_path / "ms", epochs=2, schedule="multistep", milestones=(1,)).fit()
    with pytest.raises(CertkitError, match="milestones that follow --epochs"):
        _trainer(tmp_path / "ms", epochs=4, schedule="multistep", milestones=(2,)).resume()
    assert _trainer(tmp_path / "ms", epochs=4, schedule="multistep", milestones=(1,)).resume()


def test_resume_refuses_another_teacher(tmp_path: Path) -> None:
    for seed in (0, 1):
        _trainer(tmp_path / f"teacher{seed}", epochs=1, seed=seed).fit()

    def student(teacher: str) -> Trainer:
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, test_batch_size=32)
        crt = CRT(0.25, teacher=tmp_path / teacher)
        return quiet_trainer("lenet", (1, 28, 28), crt, tiny_data(), None, cfg, tmp_path / "student")

    first = student("teacher0")
    first.config = dataclasses.replace(first.config, epochs=1)
    first.fit()
    with pytest.raises(CertkitError, match=r"started with the teacher '.*teacher0' \(weights [0-9a-f]{12}\), not"):
        student("teacher1").resume()
    assert student("teacher0").resume()


def test_recipe_milestones_follow_the_epochs_and_multistep_needs_them() -> None:
    macer = get_recipe("macer-cifar10").train
    assert TrainConfig.for_method("cifar10", "macer", macer).milestones == (200, 400)
    assert TrainConfig.for_method("cifar10", "macer", macer, epochs=22).milestones == (10, 20)
    with pytest.raises(CertkitError, match="--schedule multistep needs --milestones"):
        TrainConfig(schedule="multistep")


@pytest.mark.parametrize(
    "given, message",
    [
        (dict(milestones=(30, 60)), "--milestones applies to the multistep schedule; this run's schedule is step"),
        (dict(schedule="cosine", lr_step=10), "--lr-step applies to the step schedule"),
        (dict(schedule="cosine", lr_step_lag=1), "--lr-step-lag applies to the step schedule"),
        (dict(schedule="exp", gamma=0.5), "--lr-gamma applies to the step and multistep schedules"),
        (dict(lr_final=0.5), "--lr-final applies to the exp and half-exp schedules"),
        (dict(optimizer="adam", momentum=0.5), "--momentum applies to the sgd optimizer; this run's optimizer is adam"),
    ],
)
def test_a_setting_the_schedule_or_optimizer_never_reads_is_refused_when_given(given: dict, message: str) -> None:
    """model.json records what ran: a given value no part of the run reads would be recorded as if it had."""
    with pytest.raises(CertkitError, match=re.escape(message)):
        TrainConfig.for_method("mnist", "gaussian", **given)
    # the recipe's own values for other schedules are not the user's: changing the schedule alone is fine
    assert TrainConfig.for_method("mnist", "gaussian", schedule="cosine").lr_step == 30
    assert TrainConfig.for_method("mnist", "gaussian", schedule="multistep", milestones=(3,), gamma=0.5).gamma == 0.5
    assert TrainConfig.for_method("mnist", "gaussian", optimizer="adam", lr=1e-3).optimizer == "adam"


def test_epoch_figures_weigh_each_image_once() -> None:
    """A last batch of one image counts as one image, not as a whole step (the reference's running mean)."""
    runner = StepRunner(lambda x, y: {"acc": (y == 0).float().mean()}, [], torch.device("cpu"))
    runner(torch.zeros(4, 1), torch.tensor([0, 0, 0, 1]))
    runner(torch.zeros(1, 1), torch.tensor([1]))
    assert runner.steps == 2 and runner.images == 5 and float(runner.totals["acc"]) / runner.images == 0.6


def test_recipes() -> None:
    assert recipe("mnist", "gaussian") == dict(
        epochs=90, batch_size=256, lr=0.01, schedule="step", lr_step=30, lr_step_lag=1
    )
    assert recipe("cifar10", "crt")["milestones"] == (100, 150)


def test_published_milestones_follow_the_number_of_epochs() -> None:
    """CRT decays at 50% and 75% of its run: another --epochs moves the milestones, given ones stay."""
    assert TrainConfig.for_method("cifar10", "crt").milestones == (100, 150)
    assert TrainConfig.for_method("cifar10", "crt", epochs=100).milestones == (50, 75)
    assert TrainConfig.for_method("imagenet", "crt", epochs=30).milestones == (15, 22)
    assert TrainConfig.for_method("cifar10", "crt", epochs=1).milestones == (1, 1)  # a smoke run keeps its rate
    assert TrainConfig.for_method("cifar10", "crt", epochs=100, milestones=(10, 20)).milestones == (10, 20)


@pytest.mark.slow  # trains on the real dataset
def test_real_fashion_mnist_beats_chance(fmnist_root: Path, tmp_path: Path) -> None:
    trainer = train(
        "fashion-mnist",
        "lenet",
        "gaussian",
        sigma=0.25,
        out=tmp_path / "g",
        train_subset=6000,
        test_subset=1000,
        epochs=2,
        lr=0.05,
        batch_size=64,
        device="cpu",
        progress=False,
    )
    last = trainer.history[-1]
    assert last["test_clean_acc"] > 0.6 and last["test_noisy_acc"] > 0.6  # chance is 0.1
    model = checkpoint.load(tmp_path / "g")
    test = load_dataset("fashion-mnist", "test").subset(1000)
    with torch.no_grad():
        acc = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
    assert abs(acc - last["test_clean_acc"]) < 1e-6


def test_empty_training_or_test_data_is_a_one_line_error() -> None:
    empty = ArrayDataset(dataset_info("mnist"), torch.zeros(0, 1, 28, 28, dtype=torch.uint8), torch.zeros(0).long())
    model = create_model("smallcnn", 10, (1, 28, 28))
    for train_data, test_data, what in ((empty, None, "training"), (tiny_data(), empty, "test")):
        with pytest.raises(CertkitError, match=f"the {what} data is empty"):
            Trainer(model, Gaussian(0.25), train_data, test_data, TrainConfig(epochs=1), device="cpu", progress=False)
    with pytest.raises(CertkitError, match="the training data is empty"):
        train(empty, create_model("smallcnn", 10, (1, 28, 28)), "gaussian", epochs=1, device="cpu", num_classes=10)


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", epochs=1)
    t.fit()
    with pytest.raises(CertkitError, match="--resume"):
        train("mnist", "smallcnn", "gaussian", out=tmp_path / "run", data_dir="/nonexistent")


@pytest.mark.parametrize("now, resumes", [("auto", True), ("on", False)])
def test_a_setting_added_after_a_run_started_is_compared_with_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, now: str, resumes: bool
) -> None:
    """A run started by an older certkit has no record of a setting added since (here --channels-last): it
    resumes when the setting is at its declared default, the value that computes what the run computed,
    and is refused under any other value."""
    t = _trainer(tmp_path / "run", epochs=1)
    recorded = t.checkpoint_meta

    def older(epoch: int) -> dict:
        meta = recorded(epoch)
        meta["train"] = {k: v for k, v in meta["train"].items() if k != "channels_last"}
        return meta

    monkeypatch.setattr(t, "checkpoint_meta", older)
    t.fit()
    later = _trainer(tmp_path / "run", epochs=2)
    later.config.channels_last = now
    if resumes:
        assert later.resume()
    else:
        with pytest.raises(CertkitError, match="--channels-last 'auto', not 'on'"):  # what it computed
            later.resume()


def test_an_interrupted_save_says_how_to_republish_and_resume_cleans_up(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trainer(run, epochs=1).fit()
    weights = run / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes() + b"\0")  # a kill between the weights and model.json
    stale = run / f".{STATE}.x1y2z3.tmp"  # what SIGKILL leaves of an atomic write
    stale.write_bytes(b"partial")
    with pytest.raises(CertkitError, match="its training state is there: run the same `certkit train` with --resume"):
        checkpoint.load_with_meta(run)
    _trainer(run, epochs=1).run(resume=True)
    checkpoint.load_with_meta(run)  # republished
    assert not stale.exists()


def test_a_finished_run_without_its_resume_state_is_never_overwritten(tmp_path: Path) -> None:
    _trainer(tmp_path, epochs=1).fit()
    (tmp_path / STATE).unlink()  # a copy of a finished run: weights and model.json only
    data = TensorDataset(torch.rand(4, 1, 28, 28), torch.arange(4))
    for resume in (False, True):  # neither way is open, and the message says so rather than sending to the other
        with pytest.raises(CertkitError, match=r"holds a run without its resume state .* choose another --out"):
            train(data, "lenet", "gaussian", num_classes=10, out=tmp_path, resume=resume)
