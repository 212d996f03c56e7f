"""Hostile and malformed files (issue 18, the file-level part): crafted data files, result files, special
output paths, concurrent writers, a resume on other images and a network with NaN weights.

Each case must end in one :class:`CertkitError` naming the file (in-process), or through the real CLI in
exit status 2 with exactly one stderr line and no traceback, leaving every file as it was. Cases that ask
for an allocation (gzip and pickle bombs, a huge radius) must also stay under a memory bound, measured
with tracemalloc around the call.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from certkit import checkpoint
from certkit.data import ArrayDataset, dataset_info, load_dataset, read_idx
from certkit.errors import CertkitError
from certkit.models.registry import create_model
from certkit.report import report_files
from certkit.results import ResultWriter, merge_results, read_results, sidecar_path, summary_path
from certkit.train import train
from helpers import make_idx_dataset, train_argv
from test_certify_runner import run

MiB = 1 << 20
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def peak_of(call: Callable[[], Any]) -> tuple[BaseException | None, int]:
    """(the exception ``call`` raised, or None; the peak bytes Python and numpy allocated meanwhile)."""
    tracemalloc.start()
    try:
        call()
        raised: BaseException | None = None
    except Exception as e:  # the caller asserts which one
        raised = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return raised, peak


def refused(call: Callable[[], Any], *needles: str, peak_below: int | None = None) -> str:
    """Assert ``call`` raises one one-line CertkitError holding every needle (and under the memory bound)."""
    raised, peak = peak_of(call)
    assert isinstance(raised, CertkitError), repr(raised)
    message = str(raised)
    assert "\n" not in message and all(n in message for n in needles), message
    if peak_below is not None:
        assert peak < peak_below, f"peak {peak / MiB:.0f} MiB"
    return message


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """A real ``certkit`` process; one that blocks (a FIFO) fails the test by its timeout."""
    return subprocess.run(
        [sys.executable, "-m", "certkit", *argv], env=ENV, capture_output=True, text=True, timeout=120
    )


def assert_cli_refusal(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("certkit: error:") and "Traceback" not in proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]


# ----------------------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------------------


def gzip_stream(header: bytes, zero_bytes: int) -> bytes:
    """A gzip file of ``header`` followed by ``zero_bytes`` zeros, compressed a chunk at a time."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    chunk = bytes(MiB)
    parts = [packer.compress(header)]
    for _ in range(zero_bytes // MiB):
        parts.append(packer.compress(chunk))
    return b"".join(parts) + packer.flush()


def idx_header(*dims: int) -> bytes:
    return struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


IDX_CASES = {
    # name: (the file's content, message fragment, memory bound or None)
    "magic-only": (lambda: gzip.compress(struct.pack(">HBB", 0, 0x08, 3)), "truncated IDX header", None),
    "half-dims": (lambda: gzip.compress(idx_header(10, 28, 28)[:9]), "truncated IDX header", None),
    # bombs: a small declared shape with 256 MiB behind it, and a declared shape of 3 TB
    "bomb": (lambda: gzip_stream(idx_header(100, 28, 28), 256 * MiB), "more data bytes", 16 * MiB),
    "huge-header": (lambda: gzip_stream(idx_header(2**32 - 1, 28, 28), 256 * MiB), "declares", 16 * MiB),
}


@pytest.mark.parametrize("name", list(IDX_CASES))
def test_crafted_idx_images_are_refused(tmp_path: Path, name: str) -> None:
    content, message, bound = IDX_CASES[name]
    root = make_idx_dataset(tmp_path / "d")
    target = root / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(content())
    refused(lambda: load_dataset("mnist", "test", data_dir=root), str(target), message, peak_below=bound)


def test_a_truncated_uncompressed_idx_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 1) + b"\x00\x00")
    refused(lambda: read_idx(path), str(path), "truncated IDX header")


def test_torchvision_layout_is_found_and_the_error_names_both_places(tmp_path: Path) -> None:
    flat = make_idx_dataset(tmp_path / "flat", n_test=7)
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in flat.iterdir():
        f.rename(raw / f.name)
    assert len(load_dataset("fashion-mnist", "test", data_dir=tmp_path / "tv")) == 7
    refused(lambda: load_dataset("mnist", "test", data_dir=tmp_path / "tv"), str(tmp_path / "tv" / "MNIST" / "raw"))


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 batches
# ----------------------------------------------------------------------------------------------------------


class _Reduced:
    """Pickles as ``func(*args)``: how a crafted batch asks the unpickler to call an allowed global."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.func, self.args


def doubled(depth: int) -> list[Any]:
    """[[x, x], [x, x]] nested ``depth`` times over shared lists: a few hundred pickle bytes, 2**depth leaves."""
    node: list[Any] = [0]
    for _ in range(depth):
        node = [node, node]
    return node


_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array reconstructor, under whatever module it lives
GOOD_DATA = np.zeros((2, 3072), dtype=np.uint8)
CIFAR_CASES = {
    # name: (batch, message fragment, memory bound or None)
    "string-labels": ({b"data": GOOD_DATA, b"labels": b"ab"}, "flat list of integers", None),
    "integer-labels": ({b"data": GOOD_DATA, b"labels": 5}, "flat list of integers", None),
    "bool-labels": ({b"data": GOOD_DATA, b"labels": [True, False]}, "flat list of integers", None),
    "nested-labels": ({b"data": GOOD_DATA, b"labels": [[1], [2]]}, "flat list of integers", None),
    "object-labels": ({b"data": GOOD_DATA, b"labels": np.array([1, 2], dtype=object)}, "flat list of integers", None),
    "label-out-of-range": ({b"data": GOOD_DATA, b"labels": [0, 10]}, "labels outside 0..9", None),
    "float-data": ({b"data": GOOD_DATA.astype(np.float64), b"labels": [0, 1]}, "uint8 array", None),
    # expansion bombs: shared nested lists (32 MiB as an array), 5 million shared empty lists, and a
    # reconstructed object array of 10 million entries
    "shared-nesting": ({b"data": GOOD_DATA, b"labels": doubled(22)}, "flat list of integers", 16 * MiB),
    "many-objects": ({b"data": GOOD_DATA, b"labels": [[]] * 5_000_000}, "pickle operations", 24 * MiB),
    "object-array": (
        {b"data": GOOD_DATA, b"labels": _Reduced(_RECONSTRUCT, np.ndarray, (10_000_000,), np.dtype(object))},
        "refusing an array",
        16 * MiB,
    ),
}


@pytest.mark.parametrize("name", list(CIFAR_CASES))
def test_crafted_cifar_batches_are_refused(tmp_path: Path, name: str) -> None:
    batch, message, bound = CIFAR_CASES[name]
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    target = folder / "test_batch"
    target.write_bytes(pickle.dumps(batch, protocol=2))
    refused(lambda: load_dataset("cifar10", "test", data_dir=tmp_path), str(target), message, peak_below=bound)


def test_an_oversized_cifar_batch_is_refused_before_reading(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    target = folder / "test_batch"
    with open(target, "wb") as f:
        f.truncate(65 * MiB)  # sparse: no disk used
    refused(lambda: load_dataset("cifar10", "test", data_dir=tmp_path), str(target), "larger than", peak_below=8 * MiB)


# ----------------------------------------------------------------------------------------------------------
# Result rows: reading, resume, merge, report
# ----------------------------------------------------------------------------------------------------------

GOOD_ROW = "0\t3\t3\t0.5\t1\t0:00:01\n"
ROW_CASES = {
    # name: (the second row, message fragment)
    "correct-7": ("1\t2\t2\t0.5\t7\t0:00:01\n", "correct must be 0 or 1"),
    "negative-radius": ("1\t2\t2\t-0.5\t1\t0:00:01\n", "radius must be"),
    "infinite-radius": ("1\t2\t2\tinf\t1\t0:00:01\n", "radius must be"),
    "nan-radius": ("1\t2\t2\tnan\t1\t0:00:01\n", "radius must be"),
    "huge-radius": ("1\t2\t2\t1e300\t1\t0:00:01\n", "radius must be"),
    "predict-below-abstain": ("1\t2\t-2\t0.5\t0\t0:00:01\n", "predict must be an integer >= -1"),
    "fractional-idx": ("1.5\t2\t2\t0.5\t1\t0:00:01\n", "idx must be an integer"),
    "idx-beyond-int64": ("99999999999999999999\t2\t2\t0.5\t1\t0:00:01\n", "idx must be an integer"),
    "negative-time": ("1\t2\t2\t0.5\t1\t-3\n", "time must be"),
    "duplicate-idx": (GOOD_ROW, "index 0 appears again (first on line 2)"),
}


@pytest.mark.parametrize("name", list(ROW_CASES))
def test_bad_result_rows_are_refused_naming_file_and_line(tmp_path: Path, name: str) -> None:
    row, message = ROW_CASES[name]
    path = tmp_path / "r.tsv"
    path.write_text(HEADER + GOOD_ROW + row)
    refused(lambda: read_results(path), f"{path}:3:", message)
    refused(lambda: report_files([path]), f"{path}:3:", message)


PLANNED = {"sigma": 0.25, "n": 100, "alpha": 0.001, "dataset_size": 6, "skip": 1, "max": -1, "shard": None}


def started(path: Path, rows: list[int], settings: dict[str, Any] = PLANNED) -> Path:
    with ResultWriter(path, "certify", settings) as out:
        for i in rows:
            out.write_certify(i, i % 3, i % 3, 0.5, 1.0)
    return path


RESUME_CASES = {
    # name: (text appended to a file holding rows 0 and 1, message fragment)
    "fragment-mid-file": ("3\n" + "2\t2\t2\t0.5\t1\t0:00:01\n", ":4: expected 6 columns, found 1"),
    "outside-the-plan": ("9\t0\t0\t0.5\t1\t0:00:01\n", ":4: index 9 is not in the run's plan"),
    "correct-7": ("2\t2\t2\t0.5\t7\t0:00:01\n", ":4: correct must be 0 or 1"),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resume_refuses_damage_other_than_an_unterminated_last_line(tmp_path: Path, name: str) -> None:
    text, message = RESUME_CASES[name]
    path = started(tmp_path / "r.tsv", [0, 1])
    with open(path, "a") as f:
        f.write(text)
    before = path.read_bytes()
    refused(lambda: ResultWriter(path, "certify", PLANNED), str(path), message)
    assert path.read_bytes() == before


def sharded(tmp_path: Path, tail: str = "") -> list[Path]:
    """Shards 0/2 and 1/2 of a 4-image plan; ``tail`` is appended to shard 0."""
    paths = [
        started(tmp_path / f"s{i}.tsv", [i, i + 2], {**PLANNED, "dataset_size": 4, "shard": [i, 2]}) for i in (0, 1)
    ]
    with open(paths[0], "a") as f:
        f.write(tail)
    return paths


def test_merge_refuses_its_own_input_as_output(tmp_path: Path) -> None:
    shards = sharded(tmp_path)
    before = [p.read_bytes() for p in shards] + [sidecar_path(p).read_bytes() for p in shards]
    refused(lambda: merge_results(shards, shards[1]), "is one of its input shards")
    assert [p.read_bytes() for p in shards] + [sidecar_path(p).read_bytes() for p in shards] == before


def test_merge_refuses_a_row_outside_the_shards_plan(tmp_path: Path) -> None:
    shards = sharded(tmp_path, tail="5\t1\t1\t0.5\t1\t0:00:01\n")  # the plan ends at index 3
    refused(lambda: merge_results(shards, tmp_path / "m.tsv"), f"{shards[0]}:4: index 5 is not in the run's plan")
    assert not (tmp_path / "m.tsv").exists()


def test_merge_never_copies_a_half_row(tmp_path: Path) -> None:
    shards = sharded(tmp_path, tail="3\t0\t")  # killed mid-row (and 3 is not even its index)
    merged = merge_results(shards, tmp_path / "m.tsv")
    lines = merged.read_text().splitlines()
    assert all(len(line.split("\t")) == 6 for line in lines)
    assert read_results(merged).idx.tolist() == [0, 1, 2, 3]


def test_a_result_file_never_replaces_a_json_file_certkit_did_not_write_there(tmp_path: Path) -> None:
    """``--out runs/a/model`` would put its settings file on the run's model.json, ``--out notes`` on a user's
    notes.json, ``--out r.tsv`` its summary on r.summary.json: each is refused and the file kept."""
    run_meta = tmp_path / "model.json"
    run_meta.write_text('{"format": "certkit-checkpoint/1"}')
    notes = tmp_path / "r.summary.json"
    notes.write_text('{"my": "notes"}')
    for out, kept in ((tmp_path / "model", run_meta), (tmp_path / "r.tsv", notes)):
        before = kept.read_bytes()
        refused(partial(ResultWriter, out, "certify", PLANNED), str(kept), "not certkit's")
        refused(partial(ResultWriter, out, "certify", PLANNED, resume=False), str(kept))
        refused(partial(merge_results, sharded(tmp_path), out), str(kept))
        assert kept.read_bytes() == before and not out.exists()
    # what certkit wrote there itself is replaced as before: a settings file left without its result file
    started(tmp_path / "again.tsv", [0]).unlink()
    with ResultWriter(tmp_path / "again.tsv", "certify", PLANNED) as writer:
        assert writer.done_indices == set()


def test_merge_replaces_an_existing_output_only_when_asked_and_drops_its_summary(tmp_path: Path) -> None:
    shards, out = sharded(tmp_path), tmp_path / "m.tsv"
    merge_results(shards, out, overwrite=False)
    summary_path(out).write_text(json.dumps({"file": out.name, "kind": "certify", "N": 1}))
    before = out.read_bytes()
    refused(lambda: merge_results(shards, out, overwrite=False), f"merge --out {out} exists", "--overwrite")
    assert out.read_bytes() == before and summary_path(out).exists()
    merge_results(shards, out, overwrite=True)
    assert read_results(out).idx.tolist() == [0, 1, 2, 3] and not summary_path(out).exists()
    refused(lambda: merge_results([tmp_path / "absent.tsv"], tmp_path / "n.tsv"), "absent.tsv: no such result file")


def test_cli_merge_and_export_refuse_an_existing_output_without_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from certkit.cli import main

    shards, out = sharded(tmp_path), tmp_path / "m.tsv"
    assert main(["merge", str(shards[0]), str(shards[1]), "--out", str(out)]) == 0
    assert f"merged 2 shards -> {out}" in capsys.readouterr().out
    assert main(["merge", str(shards[0]), str(shards[1]), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(shards[0]), str(shards[1]), "--out", str(out), "--overwrite"]) == 0
    single = started(tmp_path / "one.tsv", list(range(6)))
    assert main(["merge", str(single), "--out", str(tmp_path / "one-merged.tsv")]) == 0
    assert "merged 1 shard ->" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    checkpoint.save(
        create_model("lenet", 10, (1, 28, 28)), run_dir, checkpoint.make_meta("lenet", "fashion-mnist", 0.25, "x")
    )
    exported = tmp_path / "e.pth.tar"
    exported.write_bytes(b"mine")
    assert main(["export", str(run_dir), "--format", "reference", "--out", str(exported)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and exported.read_bytes() == b"mine"
    assert main(["export", str(run_dir), "--format", "reference", "--out", str(exported), "--overwrite"]) == 0
    assert exported.read_bytes() != b"mine"


def test_report_bounds_the_radius_grid_of_a_huge_radius(tmp_path: Path) -> None:
    import matplotlib.pyplot  # noqa: F401  imported before measuring: its import is not the report's cost

    path = tmp_path / "r.tsv"
    path.write_text(HEADER + GOOD_ROW + "1\t2\t2\t20000\t1\t0:00:01\n")
    text: list[str] = []
    raised, peak = peak_of(lambda: text.append(report_files([path], plot=tmp_path / "c.png")))
    assert raised is None, raised
    assert peak < 32 * MiB, f"peak {peak / MiB:.0f} MiB"
    assert text[0].splitlines()[0].count("r=") <= 64 and (tmp_path / "c.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------
# Through the CLI: exit status 2, one stderr line, nothing written or changed
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # runs certkit in a subprocess
def test_cli_report_refuses_a_bad_row_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "r.tsv"
    path.write_text(HEADER + GOOD_ROW + "1\t2\t2\t0.5\t7\t0:00:01\n")
    assert_cli_refusal(cli("report", str(path)), f"{path}:3:", "correct must be 0 or 1")


@pytest.mark.slow  # runs certkit in a subprocess
def test_cli_report_refuses_a_fifo_and_a_link_to_dev_zero(tmp_path: Path) -> None:
    fifo, zero = tmp_path / "fifo.tsv", tmp_path / "zero.tsv"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    assert_cli_refusal(cli("report", str(fifo)), str(fifo), "must be a regular file")
    assert_cli_refusal(cli("report", str(zero)), str(zero), "must be a regular file")


@pytest.mark.slow  # runs certkit in a subprocess
def test_cli_merge_refuses_its_input_and_a_fifo_as_output(tmp_path: Path) -> None:
    shards = sharded(tmp_path)
    before = shards[0].read_bytes(), shards[0].stat().st_mtime_ns
    assert_cli_refusal(cli("merge", *map(str, shards), "--out", str(shards[0])), "one of its input shards")
    assert (shards[0].read_bytes(), shards[0].stat().st_mtime_ns) == before
    fifo = tmp_path / "m.tsv"
    os.mkfifo(fifo)
    assert_cli_refusal(cli("merge", *map(str, shards), "--out", str(fifo)), "must be a regular file")
    assert fifo.is_fifo() and not sidecar_path(fifo).exists()


# ----------------------------------------------------------------------------------------------------------
# Special output paths and concurrent writers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero", "link-to-dev-null"])
def test_special_result_paths_are_refused_before_any_work(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "r.tsv"
    if kind == "fifo":
        os.mkfifo(out)
    else:
        out.symlink_to("/dev/zero" if kind == "link-to-dev-zero" else "/dev/null")
    refused(lambda: ResultWriter(out, "certify", PLANNED), str(out), "must be a regular file")
    forwards = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model.register_forward_hook(lambda *_: forwards.append(1))
    refused(lambda: run(model, TinyDataset(), out=out, **COMMON), str(out), "must be a regular file")
    assert not forwards and not sidecar_path(out).exists()


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_lock_refuses_a_second_writer(tmp_path: Path, live_pid: int) -> None:
    out = tmp_path / "r.tsv"
    Path(f"{out}.lock").write_text(f"{live_pid}\n")
    refused(lambda: ResultWriter(out, "certify", PLANNED), str(out), f"in use by process {live_pid}")
    assert not out.exists() and not sidecar_path(out).exists()


def test_two_writers_in_turn_and_a_dead_holders_lock_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "r.tsv"
    first = ResultWriter(out, "certify", PLANNED)
    refused(lambda: ResultWriter(out, "certify", PLANNED), str(out), f"in use by process {os.getpid()}")
    first.close()
    assert not Path(f"{out}.lock").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    Path(f"{out}.lock").write_text(f"{dead.pid}\n")
    with ResultWriter(out, "certify", PLANNED) as second:
        second.write_certify(0, 0, 0, 0.5, 1.0)
    assert not Path(f"{out}.lock").exists() and read_results(out).idx.tolist() == [0]


@pytest.mark.slow  # runs certkit in a subprocess
def test_training_into_a_locked_run_directory_is_refused(tmp_path: Path, live_pid: int) -> None:
    data = make_idx_dataset(tmp_path / "data", n_train=8, n_test=4)
    run = tmp_path / "run"
    Path(f"{run}.lock").write_text(f"{live_pid}\n")
    refused(
        lambda: train(
            "mnist",
            "lenet",
            "gaussian",
            out=run,
            data_dir=str(data),
            epochs=1,
            batch_size=4,
            device="cpu",
            progress=False,
        ),
        str(run),
        f"in use by process {live_pid}",
    )
    assert not run.exists()
    proc = cli(*train_argv(data, dataset="mnist", arch="lenet", batch_size=4, out=run))
    assert_cli_refusal(proc, f"in use by process {live_pid}")
    assert not run.exists()


# ----------------------------------------------------------------------------------------------------------
# Certification: another test set on resume, a network with NaN weights
# ----------------------------------------------------------------------------------------------------------


class TinyDataset:
    """Random 1x4x4 images through the plain torch ``Dataset`` interface; ``ones`` makes that image all ones."""

    def __init__(self, seed: int = 0, size: int = 8, ones: int | None = None) -> None:
        self.images = torch.rand(size, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 0.1
        if ones is not None:
            self.images[ones] = 1.0
        self.labels = [i % 3 for i in range(size)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.labels[i]


COMMON = dict(num_classes=3, sigma=0.25, n0=10, n=100, alpha=0.01, batch_size=100)


def mnist_like(seed: int) -> ArrayDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return ArrayDataset(dataset_info("mnist"), images, torch.arange(6) % 10, split="test")


@pytest.mark.parametrize("kind", ["held-arrays", "torch-dataset"])
def test_resume_on_another_test_set_of_the_same_size_is_refused(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    if kind == "held-arrays":
        model, first, other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), mnist_like(0), mnist_like(1)
        options = {**COMMON, "num_classes": 10}
    else:
        model, first, other = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), TinyDataset(0), TinyDataset(1)
        options = COMMON
    out = tmp_path / "r.tsv"
    run(model, first, out=out, max_idx=3, **options)
    before = out.read_bytes()
    refused(lambda: run(model, other, out=out, max_idx=3, **options), "dataset_sha256")
    assert out.read_bytes() == before
    assert run(model, first, out=out, **options) is not None  # the same images resume (and grow)
    assert read_results(out).idx.tolist() == list(range(len(first)))


def test_a_file_from_before_the_dataset_hash_resumes_on_the_same_named_test_set_and_then_records_it(
    tmp_path: Path,
) -> None:
    """Files written before certkit recorded ``dataset_sha256`` resume when the dataset's name, split and size
    match; the sidecar then gains the hash, so a later resume on other images of that size is refused."""
    import json

    torch.manual_seed(0)
    model, first, other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), mnist_like(0), mnist_like(1)
    options = {**COMMON, "num_classes": 10}
    out = tmp_path / "r.tsv"
    run(model, first, out=out, max_idx=3, **options)
    side = sidecar_path(out)
    meta = json.loads(side.read_text())
    recorded = meta["settings"].pop("dataset_sha256")
    side.write_text(json.dumps(meta))
    bare = json.loads(side.read_text())
    bare["settings"].pop("split")
    # without all of the vouching keys (here: no split) the older file is still refused
    side.write_text(json.dumps(bare))
    refused(lambda: run(model, first, out=out, max_idx=4, **options), "dataset_sha256")
    side.write_text(json.dumps(meta))
    assert run(model, first, out=out, max_idx=4, **options) is not None
    assert json.loads(side.read_text())["settings"]["dataset_sha256"] == recorded
    assert read_results(out).idx.tolist() == [0, 1, 2, 3]
    refused(lambda: run(model, other, out=out, max_idx=4, **options), "dataset_sha256")


class NaNOnBright(nn.Module):
    """A linear classifier whose output is NaN on inputs brighter than any but an all-ones image's copies."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        return torch.where(x.flatten(1).sum(1, keepdim=True) > 8, torch.full_like(logits, float("nan")), logits)


@pytest.mark.parametrize("mode", ["certify", "predict"])
def test_nan_logits_stop_the_run_naming_the_first_input(tmp_path: Path, mode: str) -> None:
    broken = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    refused(lambda: run(broken, TinyDataset(), out=tmp_path / "a.tsv", mode=mode, **COMMON), "input 0")
    assert read_results(tmp_path / "a.tsv").idx.tolist() == []
    # only image 5's noisy copies are non-finite; it shares a forward batch with 4, 6 and 7
    out = tmp_path / "b.tsv"
    refused(
        lambda: run(NaNOnBright(), TinyDataset(ones=5), out=out, mode=mode, inputs_per_batch=4, **COMMON),
        "NaN or inf logits",
        "input 5",
    )
    assert read_results(out).idx.tolist() == [0, 1, 2, 3]
