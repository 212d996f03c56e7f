"""The pure helpers of ``benchmarks/vs_official.py``: the data both sides read and the logs it parses.

No timing is asserted; these check that the official side and certkit are handed the same images and that
each side's per-epoch seconds are read from the right place.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from certkit.cli import build_parser, main
from certkit.data import load_dataset, read_idx
from certkit.errors import CertkitError
from helpers import benchmark_module, make_idx_dataset


@pytest.fixture(scope="module")
def vs() -> Iterator[ModuleType]:
    with benchmark_module("vs_official") as module:
        yield module


def test_subset_is_the_first_images_for_certkit_and_torchvision(vs: ModuleType, tmp_path: Path) -> None:
    source = make_idx_dataset(tmp_path / "src", n_train=20, n_test=10)
    raw = tmp_path / "cache" / "MNIST" / "raw"
    vs.write_subset(source, raw, train=12, test=3)

    full = read_idx(source / "train-images-idx3-ubyte.gz")
    labels = read_idx(source / "train-labels-idx1-ubyte.gz")
    train = load_dataset("fashion-mnist", "train", data_dir=raw)
    test = load_dataset("fashion-mnist", "test", data_dir=raw)
    assert (len(train), len(test)) == (12, 3)
    np.testing.assert_array_equal(train.images.squeeze(1).numpy(), full[:12])
    np.testing.assert_array_equal(train.labels.numpy(), labels[:12])

    # the official side reads the same files through torchvision's MNIST class
    from torchvision import datasets

    theirs = datasets.MNIST(str(tmp_path / "cache"), train=True)
    assert len(theirs) == 12
    np.testing.assert_array_equal(theirs.data.numpy(), full[:12])
    np.testing.assert_array_equal(theirs.targets.numpy(), labels[:12])
    assert len(datasets.MNIST(str(tmp_path / "cache"), train=False)) == 3


def test_truncation_refuses_more_items_than_the_file_holds(vs: ModuleType, tmp_path: Path) -> None:
    source = make_idx_dataset(tmp_path / "src", n_train=5, n_test=2)
    with pytest.raises(CertkitError, match="holds 5 items"):
        vs.truncate_idx(source / "train-images-idx3-ubyte.gz", tmp_path / "out", 6)
    (tmp_path / "junk").write_bytes(b"not an idx file")
    with pytest.raises(CertkitError, match="not an IDX file"):
        vs.truncate_idx(tmp_path / "junk", tmp_path / "out", 1)


def test_official_log_parser_reads_the_time_column(vs: ModuleType, tmp_path: Path) -> None:
    # the header and row format of the official train_utils.init_logfile / per-epoch log call
    rows = ["epoch\ttime\tlr\ttrain loss\ttrain acc\ttestloss\ttest acc"]
    for epoch, seconds in enumerate((12.3456, 0.10749, 123.4)):
        rows.append(f"{epoch}\t{seconds:.3}\t{0.01:.3}\t{2.3:.3}\t{11.3:.3}\t{2.3:.3}\t{0.0:.3}")
    log = tmp_path / "log.txt"
    log.write_text("\n".join(rows) + "\n")
    assert vs.official_epoch_seconds(log) == [12.3, 0.107, 123.0]

    log.write_text("something else\n1\t2\n")
    with pytest.raises(CertkitError, match="not an official training log"):
        vs.official_epoch_seconds(log)


def test_certkit_parser_reads_each_epochs_seconds_from_a_real_run(vs: ModuleType, tmp_path: Path) -> None:
    data = make_idx_dataset(tmp_path / "data", n_train=16, n_test=4)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(data),
                "--arch",
                "lenet",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--test-subset",
                "0",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    seconds = vs.certkit_epoch_seconds(out / "metrics.jsonl")
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert vs.timed(seconds, 2, "run") == seconds[1:]
    with pytest.raises(CertkitError, match="logged 2 epochs, expected 3"):
        vs.timed(seconds, 3, "run")


@pytest.mark.parametrize("method", ["gaussian", "smoothmix", "smoothadv", "macer", "consistency"])
def test_certkit_flags_of_each_method_are_certkit_options(vs: ModuleType, method: str) -> None:
    args = build_parser().parse_args(["train", "--out", "x", "--method", method, *vs.METHODS[method].certkit])
    assert args.method == method


def test_amp_settings_are_a_list_timed_side_by_side(vs: ModuleType) -> None:
    assert vs.parse_args(["--amp", "off,bf16"]).amp == ["off", "bf16"]
    assert vs.parse_args([]).amp == ["off"]
    for bad in ("fp16", "bf16,bf16", ","):
        with pytest.raises(SystemExit):
            vs.parse_args(["--amp", bad])


@pytest.mark.slow  # subprocesses training a LeNet
def test_bare_floor_loop_trains_on_the_subset_and_reports_each_epoch(vs: ModuleType, tmp_path: Path) -> None:
    """``--floor`` runs a real Gaussian loop over the same truncated files: one time per epoch, and a bad
    folder is an error naming the loop rather than a number."""
    import os

    source = make_idx_dataset(tmp_path / "src", n_train=300, n_test=10)
    raw = tmp_path / "raw"
    vs.write_subset(source, raw, train=300, test=3)
    env = vs.child_env(1, "cpu", os.pathsep.join(sys.path))
    for amp in ("off", "bf16"):
        seconds = vs.run_floor(raw, 2, amp, env)
        assert len(seconds) == 2 and all(s > 0 for s in seconds)
    with pytest.raises(CertkitError, match="bare Gaussian loop"):
        vs.run_floor(tmp_path / "missing", 2, "off", env)


def test_round_spread_gives_the_extreme_single_round_ratios(vs: ModuleType) -> None:
    """Each round's ratio pairs that round's two runs, not the fastest of one side with the slowest of the
    other; one round has no spread to give."""
    mine, official = [1.0, 1.2, 0.9], [2.0, 2.0, 1.5]  # ratios 0.5, 0.6, 0.6
    assert vs.round_spread(mine, official) == "; rounds 0.500–0.600"
    assert vs.round_spread([1.0], [2.0]) == ""
