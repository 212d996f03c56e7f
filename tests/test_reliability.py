"""Interruption and bad input, the way users meet them: real ``certkit`` processes killed with SIGKILL.

A killed training run resumed with ``--resume`` must end with exactly the weights of an uninterrupted run
(CPU, fixed seed); a killed certification re-run with the same ``--out`` must end with exactly the rows of
an uninterrupted one, no index lost or duplicated. Those tests run processes and are slow; the refusals of
non-finite images at the end run in-process, in the fast tier.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from certkit.errors import CertkitError
from certkit.results import read_results
from helpers import make_idx_dataset, train_argv

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def certkit(*argv: str, wait: bool = True) -> subprocess.Popen[bytes] | subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "certkit", *argv]
    if wait:
        return subprocess.run(cmd, env=ENV, capture_output=True, timeout=300)
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(proc: subprocess.Popen[bytes], ready, timeout: float = 120.0, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``proc`` as soon as ``ready()`` holds; fail if it finished first (the test would prove
    nothing). SIGKILL must kill it on the spot; SIGTERM is certkit's to handle (status 143)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"process ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 143), proc.returncode


@pytest.mark.slow  # trains in subprocesses, killing one mid-run
def test_training_killed_mid_run_resumes_to_identical_weights(tmp_path: Path) -> None:
    data = make_idx_dataset(tmp_path / "data", n_train=600, n_test=50)
    args = train_argv(
        data, epochs=6, dataset="mnist", arch="lenet", batch_size=32, lr=0.05, schedule="cosine", seed=3, device="cpu"
    )
    ref = certkit(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr.decode()

    run = tmp_path / "run"
    proc = certkit(*args, "--out", str(run), wait=False)
    metrics = run / "metrics.jsonl"
    kill_when(proc, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2)
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 6
    # without --resume the run refuses to overwrite what is there
    again = certkit(*args, "--out", str(run))
    assert again.returncode == 2 and b"--resume" in again.stderr
    resumed = certkit(*args, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr.decode()

    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(metrics.read_text().splitlines()) == 6  # one line per epoch, none duplicated


@pytest.mark.slow  # trains in subprocesses, killing one
def test_training_killed_before_first_epoch_starts_over(tmp_path: Path) -> None:
    data = make_idx_dataset(tmp_path / "data", n_train=200, n_test=20)
    args = train_argv(data, dataset="mnist", arch="smallcnn", batch_size=50, out=tmp_path / "run")
    proc = certkit(*args, wait=False)
    kill_when(proc, lambda: True)  # at once: nothing complete on disk
    resumed = certkit(*args, "--resume")  # nothing to resume: refused, not a silent fresh start
    assert resumed.returncode == 2 and "holds no run" in resumed.stderr.decode(), resumed.stderr.decode()
    again = certkit(*args)
    assert again.returncode == 0, again.stderr.decode()
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cert")
    data = make_idx_dataset(root / "data", n_train=200, n_test=60)
    out = root / "run"
    r = certkit(*train_argv(data, dataset="mnist", arch="lenet", batch_size=50, out=out))
    assert r.returncode == 0, r.stderr.decode()
    return out, data


@pytest.mark.slow  # trains, then certifies in subprocesses, killing one
def test_certification_killed_mid_run_resumes_without_loss_or_duplicates(
    lenet_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = lenet_run
    args = [
        "certify",
        str(run),
        "--data-dir",
        str(data),
        "--n0",
        "50",
        "--n",
        "2000",
        "--batch",
        "100",
        "--max",
        "20",
        "--device",
        "cpu",
    ]
    ref = certkit(*args, "--out", str(tmp_path / "ref.tsv"))
    assert ref.returncode == 0, ref.stderr.decode()

    tsv = tmp_path / "r.tsv"
    proc = certkit(*args, "--out", str(tsv), wait=False)
    kill_when(proc, lambda: tsv.exists() and len(tsv.read_text().splitlines()) >= 4)
    assert len(tsv.read_text().splitlines()) < 21
    resumed = certkit(*args, "--out", str(tsv))
    assert resumed.returncode == 0, resumed.stderr.decode()

    a, b = read_results(tmp_path / "ref.tsv"), read_results(tsv)
    assert list(b.idx) == list(range(20))
    for col in ("idx", "label", "predict", "radius", "correct"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))


@pytest.mark.slow  # trains, then certifies in subprocesses, terminating one
def test_a_terminated_certification_says_how_to_continue_and_leaves_no_lock(
    lenet_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """SIGTERM (a batch scheduler's kill) is handled as Ctrl-C: one line saying how to continue, the lock
    removed, every written row kept, and the same command finishes the file."""
    run, data = lenet_run
    tsv = tmp_path / "r.tsv"
    args = ["certify", str(run), "--data-dir", str(data), "--n0", "50", "--n", "2000", "--batch", "100"]
    args += ["--max", "20", "--device", "cpu", "--out", str(tsv)]
    proc = certkit(*args, wait=False)
    kill_when(proc, lambda: tsv.exists() and len(tsv.read_text().splitlines()) >= 3, sig=signal.SIGTERM)
    lines = proc.stderr.read().decode().strip().splitlines()
    assert lines[-1] == "certkit: terminated; rerun the same command to continue where it stopped", lines
    assert not list(tmp_path.glob("*.lock"))
    kept = len(tsv.read_text().splitlines()) - 1
    resumed = certkit(*args)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"resuming {tsv}: {kept} of 20 rows done".encode() in resumed.stderr
    assert list(read_results(tsv).idx) == list(range(20))


@pytest.mark.slow  # trains and certifies in subprocesses
def test_certify_refuses_a_file_from_another_model(lenet_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = lenet_run
    tsv = tmp_path / "r.tsv"
    base = ["certify", "--data-dir", str(data), "--n0", "20", "--n", "100", "--max", "3", "--out", str(tsv)]
    assert certkit(base[0], str(run), *base[1:]).returncode == 0
    other = tmp_path / "other"
    r = certkit(*train_argv(data, dataset="mnist", arch="lenet", batch_size=50, seed=1, out=other))
    assert r.returncode == 0
    before = tsv.read_bytes()
    r = certkit(base[0], str(other), *base[1:])
    assert r.returncode == 2 and b"model_sha256" in r.stderr and len(r.stderr.splitlines()) == 1
    assert tsv.read_bytes() == before


@pytest.mark.slow  # three subprocesses
def test_errors_from_processes_are_one_line_without_traceback(tmp_path: Path) -> None:
    not_results = tmp_path / "notes.txt"
    not_results.write_text("hello\tworld\n1\t2\n")
    for argv, needle in [
        (["report", str(not_results)], b"not a result file"),
        (["train", "--arch", "nope", "--out", str(tmp_path / "x")], b"valid architectures"),
        (["certify", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.tsv")], b"not a certkit run"),
    ]:
        r = certkit(*argv)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert b"Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("method", ["smoothing", "gloro"])
def test_nan_images_are_refused_before_any_row(tmp_path: Path, method: str) -> None:
    from torch import nn

    from certkit.gloro.certify import certify_gloro_dataset
    from certkit.gloro.model import GloroNet
    from certkit.models import create_model
    from certkit.smoothing.runner import RunPlan, certify_dataset
    from certkit.smoothing.smooth import Smooth

    class Images:
        def __init__(self) -> None:
            self.x = torch.rand(4, 1, 28, 28)
            self.x[2, 0, 3, 3] = float("nan")

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return self.x[i], 0

    model = create_model("lenet", 10, (1, 28, 28)).eval()
    out = tmp_path / "r.tsv"
    # one input per batch: inputs 0 and 1 would be certified and written before input 2 were read
    with pytest.raises(CertkitError, match="dataset item 2 contains NaN or inf"):
        if method == "smoothing":
            plan = RunPlan(n0=10, n=100, inputs_per_batch=1)
            certify_dataset(Smooth(model, 10, 0.25), Images(), plan, out=out, progress=False)
        else:
            net = GloroNet(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), (1, 28, 28), epsilon=0.1)
            certify_gloro_dataset(net, Images(), out=out, batch_size=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # no rows, no header, no settings file, no lock


@pytest.mark.parametrize("kind", ["array-subclass", "float64-overflow"])
def test_images_that_are_not_finite_in_float32_are_refused_before_any_row(tmp_path: Path, kind: str) -> None:
    """A subclass of certkit's array dataset is read item by item (its items need not be the arrays'), and an
    image is checked in the float32 certification computes in (1e300 in float64 is inf there)."""
    from certkit.data import ArrayDataset, dataset_info
    from certkit.models import create_model
    from certkit.smoothing.runner import RunPlan, certify_dataset
    from certkit.smoothing.smooth import Smooth

    class Spoiled(ArrayDataset):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            x, y = super().__getitem__(i)
            if i == 2:
                if kind == "array-subclass":
                    x = x.clone()
                    x[0, 3, 3] = float("nan")
                else:
                    x = x.double()
                    x[0, 3, 3] = 1e300
            return x, y

    images = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
    data = Spoiled(dataset_info("mnist"), images, torch.zeros(4, dtype=torch.long))
    out = tmp_path / "r.tsv"
    with pytest.raises(CertkitError, match="dataset item 2 contains NaN or inf"):
        plan = RunPlan(n0=10, n=100, inputs_per_batch=1)
        model = create_model("lenet", 10, (1, 28, 28)).eval()
        certify_dataset(Smooth(model, 10, 0.25), data, plan, out=out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_inf_image_is_refused_by_certify() -> None:
    from certkit.models import create_model
    from certkit.smoothing.smooth import Smooth

    model = create_model("lenet", 10, (1, 28, 28)).eval()
    with pytest.raises(CertkitError, match="NaN or inf"):
        Smooth(model, 10, 0.25).certify(torch.full((1, 28, 28), float("inf")), 10, 100, 0.001, 100)
