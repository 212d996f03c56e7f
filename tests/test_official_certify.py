"""``benchmarks/official_certify.py``: the row-by-row comparison, the CPU shim, and the run end to end.

The comparison and the shim are checked without the official code or ``statsmodels``; the end-to-end run
needs ``statsmodels`` (the official ``core.py`` imports it) and says so when it skips.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from scipy.stats import binomtest

from certkit import checkpoint
from certkit.data import dataset_info
from certkit.errors import CertkitError
from certkit.models import create_model
from certkit.results import read_results
from helpers import benchmark_module, make_idx_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def oc() -> Iterator[ModuleType]:
    """The script as a module; it imports ``vs_official`` from its own folder, as it does when run."""
    with benchmark_module("official_certify") as module:
        yield module


HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"


def official_file(path: Path, rows: list[tuple[int, int, int, float]]) -> Path:
    """Rows printed as the official certify.py prints them: the radius with ``{:.3}``, the time a timedelta."""
    lines = [f"{i}\t{y}\t{p}\t{r:.3}\t{int(p == y)}\t{datetime.timedelta(seconds=0.2)}\n" for i, y, p, r in rows]
    path.write_text(HEADER + "".join(lines))
    return path


def certkit_file(path: Path, rows: list[tuple[int, int, int, str]]) -> Path:
    path.write_text(HEADER + "".join(f"{i}\t{y}\t{p}\t{r}\t{int(p == y)}\t0:00:00.210000\n" for i, y, p, r in rows))
    return path


def test_compare_row_by_row(oc: ModuleType, tmp_path: Path) -> None:
    official = read_results(
        official_file(tmp_path / "o.tsv", [(0, 3, 3, 0.45312), (1, 2, 2, 0.61581), (2, 5, -1, 0.0), (3, 1, -1, 0.0)])
    )
    assert official.radius is not None and official.radius.tolist() == [0.453, 0.616, 0.0, 0.0]
    # certkit's rows in another order: the comparison pairs rows by index
    certkit = read_results(
        certkit_file(
            tmp_path / "c.tsv", [(3, 1, -1, "0.0"), (1, 2, 2, "0.615815"), (2, 5, 5, "0.1"), (0, 3, 3, "0.476")]
        )
    )
    c = oc.compare(official, certkit)
    assert (c.rows, c.agree, c.same_class) == (4, 3, 2)  # both abstaining agrees; only rows 0 and 1 are classes
    assert c.agreement == pytest.approx(0.75)
    assert (c.abstain_official, c.abstain_certkit) == (2, 1)
    assert c.mean_abs_dradius == pytest.approx((0.023 + 0.000185) / 2)
    assert c.mean_dradius == pytest.approx((0.023 - 0.000185) / 2)
    assert c.max_dradius == pytest.approx(0.023)
    assert c.certkit_above == 1


def test_compare_refuses_files_of_other_images(oc: ModuleType, tmp_path: Path) -> None:
    official = read_results(official_file(tmp_path / "o.tsv", [(0, 3, 3, 0.5), (1, 2, 2, 0.6)]))
    other_idx = read_results(certkit_file(tmp_path / "a.tsv", [(0, 3, 3, "0.5"), (2, 2, 2, "0.6")]))
    with pytest.raises(CertkitError, match="different images"):
        oc.compare(official, other_idx)
    other_label = read_results(certkit_file(tmp_path / "b.tsv", [(0, 3, 3, "0.5"), (1, 4, 2, "0.6")]))
    with pytest.raises(CertkitError, match=r"labels of indices \[1\]"):
        oc.compare(official, other_label)


TINY = """
import argparse, sys
import torch
from scipy.stats import binom_test

net = torch.nn.Linear(3, 2).cuda()
x = torch.ones(4, 3).cuda()
out = net(x + torch.randn_like(x, device="cuda"))
assert out.device.type == "cpu"
torch.save(argparse.Namespace(a=1), sys.argv[1])
try:
    torch.load(sys.argv[1])
    print("unpickled")
except Exception as e:
    print("refused", type(e).__name__)
assert torch.load(sys.argv[1], weights_only=False).a == 1  # an explicit choice is left alone
print(binom_test(7, 10, p=0.5))
"""


@pytest.mark.slow  # subprocesses with and without the shim
def test_shim_runs_cuda_code_on_cpu(oc: ModuleType, tmp_path: Path) -> None:
    """CUDA-only code (``.cuda()``, ``randn_like(device='cuda')``, ``scipy.stats.binom_test``) runs on CPU
    under the shim and fails without it; ``torch.load`` refuses pickled objects unless asked explicitly."""
    (tmp_path / "tiny.py").write_text(TINY)
    oc.write_shim(tmp_path / "shim")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")

    def tiny(pythonpath: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "tiny.py", str(tmp_path / "ns.pt")]
        return subprocess.run(cmd, cwd=tmp_path, env={**env, "PYTHONPATH": pythonpath}, capture_output=True, text=True)

    done = tiny(str(tmp_path / "shim"))
    assert done.returncode == 0, done.stderr
    refusal, p_value = done.stdout.splitlines()
    assert refusal == "refused UnpicklingError"
    assert float(p_value) == pytest.approx(binomtest(7, 10, 0.5).pvalue)
    assert tiny("").returncode != 0


def test_missing_statsmodels_is_one_line(
    oc: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "statsmodels" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        oc.main(["--run", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "statsmodels" in err and err.startswith("official_certify: error:")


@pytest.mark.slow  # three subprocesses: certkit export, the official certify.py, certkit certify
def test_official_certify_reads_an_export(
    oc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A LeNet that always answers class 7: both certifiers give every image class 7 at the largest radius
    N samples allow, so the files agree up to the official three-digit rounding."""
    pytest.importorskip("statsmodels", reason="the official certify.py imports statsmodels")
    if not (oc.PEER_CODE / "code" / "certify.py").is_file():
        pytest.skip(f"the official code is not at {oc.PEER_CODE} (a checkout beside the project's shared folder)")
    info = dataset_info("fashion-mnist")
    model = create_model("lenet", info.num_classes, info.in_shape, info.mean, info.std)
    last = model[1].classifier[3]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[7] = 1.0
    checkpoint.save(model, tmp_path / "run", checkpoint.make_meta("lenet", "fashion-mnist", 0.25, "gaussian"))
    source = make_idx_dataset(tmp_path / "src", n_train=2, n_test=6)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    keep = tmp_path / "scratch"
    argv = ["--run", str(tmp_path / "run"), "--source", str(source), "--images", "4", "--N", "200", "--n0", "10"]
    oc.main([*argv, "--threads", "1", "--keep", str(keep)])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("official_certify: 100.0% prediction agreement, mean |dradius| ")
    assert last_line.endswith(" over 4 images (N=200)")
    official, certkit = read_results(keep / "official.tsv"), read_results(keep / "certkit.tsv")
    assert official.predict.tolist() == certkit.predict.tolist() == [7, 7, 7, 7]
    assert official.radius is not None and certkit.radius is not None
    # all N votes for class 7: the bound is alpha^(1/N) on both sides, so the radii differ only by the
    # printing: half a unit of the third significant digit (<= 0.5% of the radius) plus certkit's floor
    assert certkit.radius.min() > 0.4
    assert (abs(certkit.radius - official.radius) <= 0.0051 * certkit.radius).all()
