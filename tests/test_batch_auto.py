"""``--batch auto``: the flag, both probes (the memory probe on a model that runs out of "CUDA" memory on CPU),
and that an automatic run writes the rows of the explicit batch it chose, resuming files of other batches."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from certkit import checkpoint
from certkit.cli import main
from certkit.errors import CertkitError
from certkit.models import create_model
from certkit.results import read_results
from certkit.smoothing import autobatch
from certkit.smoothing.autobatch import MAX_CPU_BATCH, MIN_AUTO_BATCH, auto_batch_size, batch_cap, fastest
from certkit.smoothing.smooth import Smooth
from helpers import make_idx_dataset

AUTO_LINE = re.compile(r"^certkit: --batch auto: (\d+) \((.+)\)$")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit status and stderr of one command."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def is_power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


class RunsOutOfMemory(nn.Module):
    """A linear classifier that raises CUDA's out-of-memory error on batches of more than ``limit`` rows,
    and remembers the largest batch it was given."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.largest = 0
        self.linear = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {len(x)} rows")
        return self.linear(x.flatten(1))


@pytest.mark.parametrize(
    ("limit", "cap", "expected", "largest_tried"),
    [
        (3000, 2**17, 1024, 4096),  # 2048 fits, 4096 does not: half of 2048
        (256, 2**17, 128, 512),  # only the first size fits
        (10**9, 512, 512, 1024),  # everything fits: the cap, after checking that twice the cap fits
    ],
)
def test_the_memory_probe_takes_half_the_largest_power_of_two_that_fits(
    limit: int, cap: int, expected: int, largest_tried: int
) -> None:
    model = RunsOutOfMemory(limit)
    smoothed = Smooth(model, 3, 0.25)
    assert auto_batch_size(smoothed, (1, 4, 4), cap, probe="memory") == expected
    assert model.largest == largest_tried


def test_the_memory_probe_refuses_when_nothing_fits() -> None:
    with pytest.raises(CertkitError, match="not even 256 noisy copies fit"):
        auto_batch_size(Smooth(RunsOutOfMemory(200), 3, 0.25), (1, 4, 4), 2**17, probe="memory")


def test_the_speed_probe_returns_a_power_of_two_within_bounds_and_leaves_every_generator_alone() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    smoothed = Smooth(model, 3, 0.25)
    state = torch.get_rng_state()
    for cap in (100, 512):
        size = auto_batch_size(smoothed, (1, 4, 4), cap, probe="speed", repeats=2)
        assert is_power_of_two(size) and MIN_AUTO_BATCH <= size <= max(cap, MIN_AUTO_BATCH)
    assert torch.equal(torch.get_rng_state(), state)  # the probe draws from a generator of its own


def test_the_speed_probe_stops_after_two_doublings_without_a_five_percent_gain() -> None:
    # throughput (rows per second) by batch size: grows to 1024, then 2048 and 4096 gain under 5% each
    rate = {128: 1000.0, 256: 1800.0, 512: 3000.0, 1024: 4000.0, 2048: 4100.0, 4096: 4150.0, 8192: 9000.0}
    tried: list[int] = []

    def seconds(rows: int) -> float:
        tried.append(rows)
        return rows / rate[rows]

    assert fastest(seconds, 128, 16384, budget_s=1e9) == 4096  # the fastest of those tried
    assert tried == [128, 256, 512, 1024, 2048, 4096]  # 8192 is never tried
    tried.clear()
    assert fastest(seconds, 128, 512, budget_s=1e9) == 512 and tried == [128, 256, 512]  # the limit
    tried.clear()
    # 0.44 s spent on 128..512: 1024, guessed at twice the last (0.34 s), would pass 0.7 s: the probe stops
    assert fastest(seconds, 128, 16384, budget_s=0.7) == 512 and tried == [128, 256, 512]


class OnAFakeClock(nn.Module):
    """A linear classifier whose forward pass of ``rows`` rows advances a fake clock by ``rows / rate[rows]``
    seconds, so which size the speed probe finds fastest is known in advance; it records each pass's rows."""

    def __init__(self, rate: dict[int, float]) -> None:
        super().__init__()
        self.rate, self.now, self.passes = rate, 0.0, []
        self.linear = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(len(x))
        self.now += len(x) / self.rate[len(x)]
        return self.linear(x.flatten(1))


@pytest.mark.parametrize(
    ("cap", "expected", "tried"),
    [
        # throughput peaks at 1024 rows; 2048 and 4096 are slower, so the probe stops there
        (2**17, 1024, [128, 256, 512, 1024, 2048, 4096]),
        (512, 512, [128, 256, 512]),  # the cap bounds the sizes tried, below the peak
    ],
    ids=["peak-at-1024", "capped-at-512"],
)
def test_the_speed_probe_returns_the_size_its_timings_find_fastest(
    cap: int, expected: int, tried: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MIN_AUTO_BATCH == 128  # the rates below start there
    rate = {128: 1000.0, 256: 2000.0, 512: 4000.0, 1024: 8000.0, 2048: 5000.0, 4096: 3000.0}
    model = OnAFakeClock(rate)
    monkeypatch.setattr(autobatch, "time", SimpleNamespace(perf_counter=lambda: model.now))
    calls: list[tuple[int, int, float]] = []
    real_fastest = autobatch.fastest

    def recorded(seconds, start: int, limit: int, budget_s: float) -> int:
        calls.append((start, limit, budget_s))
        return real_fastest(seconds, start, limit, budget_s)

    monkeypatch.setattr(autobatch, "fastest", recorded)
    smoothed = Smooth(model, 3, 0.25)
    assert auto_batch_size(smoothed, (1, 4, 4), cap, probe="speed", repeats=2, budget_s=1000.0) == expected
    assert calls == [(MIN_AUTO_BATCH, min(cap, MAX_CPU_BATCH), 500.0)]
    # each size was timed by running that many noisy copies through the network, ``repeats`` times
    assert model.passes == [rows for rows in tried for _ in range(2)]


def test_the_cap_holds_one_group_of_inputs_within_the_bounds() -> None:
    assert batch_cap(100_000, 64) == 2**17
    assert batch_cap(1000, 4) == 4096
    assert batch_cap(10, 1) == MIN_AUTO_BATCH


@pytest.fixture
def lenet_run(tmp_path: Path) -> tuple[Path, Path]:
    data = make_idx_dataset(tmp_path / "data", n_train=4, n_test=6)
    torch.manual_seed(0)
    run_dir = tmp_path / "run"
    checkpoint.save(
        create_model("lenet", 10, (1, 28, 28)), run_dir, checkpoint.make_meta("lenet", "mnist", 0.25, "gaussian")
    )
    return run_dir, data


def rows(path: Path) -> list[tuple]:
    r = read_results(path)
    return list(zip(r.idx.tolist(), r.label.tolist(), r.predict.tolist(), r.radius.tolist(), r.correct.tolist()))


@pytest.mark.slow  # a real timing probe of every batch size, then two certifications
def test_certify_with_auto_writes_the_rows_of_the_batch_it_chose(
    lenet_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, data = lenet_run
    # on the CPU, whose probe this test reads, also where a GPU is visible
    common = [str(run_dir), "--data-dir", str(data), "--n0", "10", "--n", "300", "--alpha", "0.01", "--seed", "4"]
    common += ["--device", "cpu"]
    probes = []
    probe = autobatch.auto_batch_size

    def counted(*args: object, **kwargs: object) -> int:
        probes.append(args)
        return probe(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(autobatch, "auto_batch_size", counted)
    code, err = run(capsys, "certify", *common, "--batch", "auto", "--out", str(tmp_path / "auto.tsv"))
    assert code == 0, err
    lines = [m for m in map(AUTO_LINE.match, err.splitlines()) if m]
    assert len(lines) == 1 and len(probes) == 1  # found once for the run, printed once
    chosen = int(lines[0].group(1))
    assert is_power_of_two(chosen) and MIN_AUTO_BATCH <= chosen <= batch_cap(300, 6)
    assert "fastest of a short timing probe on cpu" in lines[0].group(2)

    code, err = run(capsys, "certify", *common, "--batch", str(chosen), "--out", str(tmp_path / "explicit.tsv"))
    assert code == 0, err
    assert not any(map(AUTO_LINE.match, err.splitlines())), err  # an explicit batch is not announced
    assert rows(tmp_path / "auto.tsv") == rows(tmp_path / "explicit.tsv")
    assert len(rows(tmp_path / "auto.tsv")) == 6

    # a file begun with another explicit batch is resumed by an automatic run, and ends with the same rows
    partial = tmp_path / "partial.tsv"
    code, err = run(capsys, "certify", *common, "--batch", "100", "--max", "3", "--out", str(partial))
    assert code == 0, err
    code, err = run(capsys, "certify", *common, "--batch", "auto", "--out", str(partial))
    assert code == 0, err
    assert rows(partial) == rows(tmp_path / "explicit.tsv")


def test_predict_takes_auto(lenet_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, data = lenet_run
    args = [str(run_dir), "--data-dir", str(data), "--n", "200", "--alpha", "0.01", "--max", "2"]
    code, err = run(capsys, "predict", *args, "--batch", "auto", "--out", str(tmp_path / "auto.tsv"))
    assert code == 0, err
    chosen = [int(m.group(1)) for m in map(AUTO_LINE.match, err.splitlines()) if m]
    assert len(chosen) == 1
    code, err = run(capsys, "predict", *args, "--batch", str(chosen[0]), "--out", str(tmp_path / "explicit.tsv"))
    assert code == 0, err
    r_auto, r_explicit = read_results(tmp_path / "auto.tsv"), read_results(tmp_path / "explicit.tsv")
    assert r_auto.predict.tolist() == r_explicit.predict.tolist() and len(r_auto) == 2


@pytest.mark.parametrize("value", ["0", "-1", "foo", "Auto"])
def test_a_batch_that_is_neither_a_positive_integer_nor_auto_is_one_line(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, "certify", "RUN", "--batch", value, "--out", str(tmp_path / "r.tsv"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("certkit: error: certify: argument --batch/--batch-size: ")
    assert "expected an integer >= 1 or auto" in err


def test_batch_auto_parses() -> None:
    from certkit.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["certify", "RUN", "--batch", "auto", "--out", "r.tsv"]).batch == "auto"
    assert parser.parse_args(["predict", "RUN", "--batch-size", "512", "--out", "r.tsv"]).batch == 512
    assert parser.parse_args(["certify", "RUN", "--out", "r.tsv"]).batch == 1000
