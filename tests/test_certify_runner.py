"""The dataset runner: rows, resume, shards + merge, inputs per batch, predict mode, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from certkit.errors import CertkitError
from certkit.results import merge_results, read_results, summary_path
from certkit.smoothing.runner import RunPlan, certify_dataset
from certkit.smoothing.samplers import check_generator, input_generator
from certkit.smoothing.smooth import Smooth
from certkit.smoothing.statistics import AdaptiveSchedule


class TinyDataset:
    """12 random 1x4x4 images with labels 0..2: a plain map-style dataset."""

    def __init__(self, size: int = 12, bad: int | None = None) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.rand(size, 1, 4, 4, generator=gen)
        if bad is not None:
            self.images[bad, 0, 0, 0] = float("nan")
        self.labels = [i % 3 for i in range(size)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


def tiny_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


COMMON = dict(num_classes=3, sigma=0.25, n0=20, n=300, alpha=0.01, batch_size=200)


def run(
    model: nn.Module,
    data: object,
    *,
    out: Path,
    num_classes: int,
    sigma: float,
    smooth_options: dict | None = None,
    shared_noise: int = 0,
    **plan: object,
) -> dict | None:
    """certify_dataset with the smoothed classifier and the plan built from one flat set of keywords."""
    smoothed = Smooth(model, num_classes, sigma, shared_noise=shared_noise, **(smooth_options or {}))
    return certify_dataset(smoothed, data, RunPlan(**plan), out=out, progress=False)  # type: ignore[arg-type]


def rows_without_time(path: Path) -> list[tuple]:
    r = read_results(path)
    radius = r.radius.tolist() if r.radius is not None else [None] * len(r)
    return list(zip(r.idx.tolist(), r.label.tolist(), r.predict.tolist(), radius, r.correct.tolist()))


def test_rows_summary_and_independence_from_batching(tmp_path: Path):
    model, data = tiny_model(), TinyDataset()
    summary = run(model, data, out=tmp_path / "a.tsv", skip=2, inputs_per_batch=1, **COMMON)
    rows = rows_without_time(tmp_path / "a.tsv")
    assert [r[0] for r in rows] == [0, 2, 4, 6, 8, 10]
    assert summary is not None and summary["N"] == 6
    assert json.loads(summary_path(tmp_path / "a.tsv").read_text())["acr"] == pytest.approx(summary["acr"])
    # a different grouping of inputs and a different batch size give the same rows
    run(model, data, out=tmp_path / "b.tsv", skip=2, inputs_per_batch=4, **{**COMMON, "batch_size": 500})
    assert rows_without_time(tmp_path / "b.tsv") == rows


class Interrupted(TinyDataset):
    """Raises KeyboardInterrupt (a Ctrl-C) when image ``stop_at`` is loaded for certification: its second
    load, the first being the pass that hashes the dataset before any row is written."""

    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.stop_at = stop_at
        self.loads = 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.loads += i == self.stop_at
        if self.loads == 2:
            raise KeyboardInterrupt
        return super().__getitem__(i)


def test_resume_after_a_kill_gives_the_uninterrupted_rows(tmp_path: Path):
    model = tiny_model()
    run(model, TinyDataset(), out=tmp_path / "full.tsv", inputs_per_batch=2, **COMMON)
    killed = tmp_path / "killed.tsv"
    with pytest.raises(KeyboardInterrupt):
        run(model, Interrupted(stop_at=7), out=killed, inputs_per_batch=2, **COMMON)
    assert read_results(killed).idx.tolist() == [0, 1, 2, 3, 4, 5]
    with open(killed, "a") as f:
        f.write("6\t0\t0\t0.1")  # and a row cut short by the kill
    summary = run(model, TinyDataset(), out=killed, inputs_per_batch=3, **COMMON)
    assert summary is not None and summary["N"] == 12
    assert rows_without_time(killed) == rows_without_time(tmp_path / "full.tsv")
    # a different max is a different run: refused
    with pytest.raises(CertkitError, match="max"):
        run(model, TinyDataset(), out=killed, max_idx=8, **COMMON)


def test_resume_with_other_weights_is_refused(tmp_path: Path):
    data = TinyDataset()
    run(tiny_model(), data, out=tmp_path / "r.tsv", max_idx=3, **COMMON)
    other = tiny_model()
    with torch.no_grad():
        other[1].bias += 1
    with pytest.raises(CertkitError, match="model_sha256"):
        run(other, data, out=tmp_path / "r.tsv", max_idx=3, **COMMON)


def test_shards_merge_to_the_unsharded_rows(tmp_path: Path):
    model, data = tiny_model(), TinyDataset()
    run(model, data, out=tmp_path / "whole.tsv", **COMMON)
    paths = []
    for i in range(3):
        p = tmp_path / f"s{i}.tsv"
        run(model, data, out=p, shard=(i, 3), **COMMON)
        paths.append(p)
    merge_results(paths, tmp_path / "merged.tsv")
    assert rows_without_time(tmp_path / "merged.tsv") == rows_without_time(tmp_path / "whole.tsv")


def test_predict_mode_and_adaptive_samples_column(tmp_path: Path):
    model, data = tiny_model(), TinyDataset(6)
    run(model, data, out=tmp_path / "p.tsv", mode="predict", **COMMON)
    assert read_results(tmp_path / "p.tsv").kind == "predict"
    adaptive = AdaptiveSchedule(first_stage=50)
    run(model, data, out=tmp_path / "ad.tsv", adaptive=adaptive, **COMMON)
    res = read_results(tmp_path / "ad.tsv")
    assert res.samples is not None and all(20 + 50 <= s <= 20 + 300 for s in res.samples)


def test_bad_inputs_are_user_errors(tmp_path: Path):
    with pytest.raises(CertkitError, match="NaN"):
        run(tiny_model(), TinyDataset(bad=3), out=tmp_path / "x.tsv", **COMMON)
    with pytest.raises(CertkitError, match="needs n >= 10"):
        run(tiny_model(), TinyDataset(), out=tmp_path / "y.tsv", **{**COMMON, "n": 5, "alpha": 0.001})


class _Negated(nn.Module):
    """A 'compiled' model that votes differently from the original: what the speed check must catch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.model(x)


def test_speed_options_run_a_vote_check_first(tmp_path: Path, monkeypatch):
    model, data = tiny_model(), TinyDataset(4)
    # a faithful compile (identity here: the real one is slow on CPU) passes and is recorded in the summary
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)
    summary = run(model, data, out=tmp_path / "ok.tsv", smooth_options={"compile": True}, **COMMON)
    assert summary is not None and summary["speed_check"]["vote_agreement"] == 1.0
    assert summary["speed_check"]["min_input_agreement"] == 1.0 and "certifies" in summary["speed_check"]
    assert summary["speed_check"]["options"] == {"compile": True}
    # the rows are those of the plain run (the compiled batches are padded to one shape)
    run(model, data, out=tmp_path / "plain.tsv", **COMMON)
    assert rows_without_time(tmp_path / "ok.tsv") == rows_without_time(tmp_path / "plain.tsv")
    # a compile that changes the votes is refused before anything is certified
    monkeypatch.setattr(torch, "compile", lambda m, **kw: _Negated(m))
    with pytest.raises(CertkitError, match="equal the fp32 votes"):
        run(model, data, out=tmp_path / "bad.tsv", smooth_options={"compile": True}, **COMMON)
    assert not (tmp_path / "bad.tsv").exists()


class _Shifted(nn.Module):
    """A 'compiled' half-space [w.x > 0] whose boundary moved by ``shift``: at an input on the boundary its
    vote probability changes by Phi(shift / sigma) - 1/2; far from it, by nothing."""

    def __init__(self, model: nn.Module, shift: float) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) - torch.tensor([0.0, 2 * self.shift])


class _HalfSpaceData:
    """Eight 1x1x4 inputs 3 sigma from the boundary of [w.x > 0], except index 3, which lies on it."""

    def __init__(self, w: torch.Tensor, sigma: float) -> None:
        self.images = [(w * (0.0 if i == 3 else 3 * sigma * (-1) ** i)).view(1, 1, 4) for i in range(8)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(i % 2 == 0)


def test_a_speed_option_that_moves_one_inputs_vote_probability_by_two_percent_is_refused(tmp_path: Path, monkeypatch):
    from scipy.stats import norm

    sigma, w = 0.25, torch.tensor([0.6, -0.8, 0.0, 0.0])
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-w, w]))
        model[1].bias.zero_()
    data = _HalfSpaceData(w, sigma)
    shift = sigma * float(norm.ppf(0.52))  # index 3 changes from p = 0.5 to 0.48; over all eight, 0.25% of votes
    monkeypatch.setattr(torch, "compile", lambda m, **kw: _Shifted(m, shift))
    common = {**COMMON, "num_classes": 2, "sigma": sigma}
    with pytest.raises(CertkitError, match="at index 3 equal the fp32 votes"):
        run(model, data, out=tmp_path / "bad.tsv", smooth_options={"compile": True}, **common)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: _Shifted(m, 0.0))
    summary = run(model, data, out=tmp_path / "ok.tsv", smooth_options={"compile": True}, **common)
    assert summary is not None and summary["speed_check"]["inputs"] == list(range(8))


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.seen = nn.Linear(4, 2), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.linear(x.flatten(1))


def test_the_vote_check_draws_from_a_stream_of_its_own():
    model, x = _Recorder(), torch.rand(1, 1, 1, 4)
    Smooth(model, 2, 0.5, channels_last=True).sampler.vote_agreement(x, num=50, seed=7, batch_size=50)
    noise = (model.seen[0] - x[0]) / 0.5
    torch.testing.assert_close(noise, torch.randn(50, 1, 1, 4, generator=check_generator(7)), rtol=0, atol=1e-5)
    assert not torch.allclose(noise, torch.randn(50, 1, 1, 4, generator=input_generator(7, 0)), atol=1e-3)


def test_a_plain_torch_dataset_is_certified_like_certkits_own(tmp_path: Path):
    from torch.utils.data import TensorDataset

    model, data = tiny_model(), TinyDataset()
    tensors = TensorDataset(data.images, torch.tensor(data.labels))  # labels come back as 0-d tensors
    run(model, tensors, out=tmp_path / "torch.tsv", **COMMON)
    run(model, data, out=tmp_path / "own.tsv", **COMMON)
    assert rows_without_time(tmp_path / "torch.tsv") == rows_without_time(tmp_path / "own.tsv")


@pytest.mark.parametrize(
    "plan,message",
    [
        ({"mode": "attack"}, "mode must be"),
        ({"mode": "predict", "adaptive": AdaptiveSchedule()}, "certify only"),
        ({"n": 5, "alpha": 0.001}, "needs n >= 10"),
        ({"batch_size": 0}, "--batch must be in 1"),
        ({"inputs_per_batch": 0}, "inputs per batch"),
        ({"skip": 0}, "skip"),
        ({"shard": (2, 2)}, "shard"),
    ],
)
def test_a_bad_run_plan_is_refused_when_it_is_made(plan: dict, message: str):
    with pytest.raises(CertkitError, match=message):
        RunPlan(**plan)


def test_run_plan_settings_and_group_size():
    plan = RunPlan(n0=50, n=500, batch_size=1000)
    assert plan.group_size(0) == 20 and plan.group_size(4) == 4
    assert RunPlan(inputs_per_batch=3).group_size(4) == 3
    assert RunPlan(mode="predict", n=100, batch_size=1000).group_size(0) == 10
    assert plan.settings()["noise_block"] == 100 and RunPlan(batch_size=30).settings()["noise_block"] == 30
    assert "n0" not in RunPlan(mode="predict").settings()
    assert plan.indices(10) == list(range(10)) and RunPlan(skip=3, shard=(1, 2)).indices(10) == [3, 9]


def test_the_summary_uses_the_radii_proved_before_the_file_floored_them(tmp_path: Path) -> None:
    """Every vote unanimous: each row proves max_radius exactly; the TSV holds it floored to six significant
    digits, and the summary of the run that proved it reports the proved value, not the floored one."""
    from torch.utils.data import TensorDataset

    from certkit import report
    from certkit.smoothing.statistics import max_radius

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([10.0, -10.0]))
    data = TensorDataset(torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    out = tmp_path / "r.tsv"
    summary = run(model, data, out=out, num_classes=2, sigma=0.25, n0=10, n=10_000, alpha=0.001, batch_size=1000)
    proved = max_radius(0.25, 10_000, 0.001)
    assert summary is not None and summary["acr"] == pytest.approx(proved, abs=1e-12)
    assert report.acr(out) < proved and report.acr(out) == pytest.approx(proved, rel=1e-5)  # the file: floored


def test_a_shard_whose_plan_holds_no_image_summarises_to_no_figure(tmp_path: Path):
    """A shard of fewer planned images than shards (torchrun with more ranks than images) has no rows: its
    summary says N 0 and leaves every mean null, which a reader cannot take for a measured 0."""
    out = tmp_path / "s.tsv"
    summary = run(tiny_model(), TinyDataset(), out=out, max_idx=3, shard=(5, 10), **COMMON)
    written = json.loads(summary_path(out).read_text())
    assert summary is not None and written["N"] == 0
    assert written["acr"] is None and written["accuracy"] is None and written["abstain_rate"] is None
    assert set(written["certified_accuracy"].values()) == {None}
