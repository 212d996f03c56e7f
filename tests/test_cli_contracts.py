"""What the command line promises about your own code and about flags that do not apply.

``--arch``/``--dataset pkg.module:factory``: a spec that names no function, or a factory that breaks the
contract (an nn.Module; train and test splits with items, a class count >= 1), is the user's to fix: exit
status 2 and one line naming the flag, before any data is read. A GloRo net certifies without sampling, so
randomized smoothing's flags are refused for it rather than silently ignored (``--epsilon`` for smoothing
is in test_hostile_cli.py's table).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from certkit.cli import main
from helpers import train_argv

FACTORIES = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

COUNT = 3


def make_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


def notmodule():
    return 3


def _split(n):
    return TensorDataset(torch.rand(n, 3, 8, 8), torch.arange(n) % 4)


def make_data():
    return _split(16), _split(8), 4


def empty():
    return _split(0), _split(0), 4


def empty_test():
    return _split(16), _split(0), 4


def str_classes():
    return _split(16), _split(8), "four"


def zero_classes():
    return _split(16), _split(8), 0


def refuses():
    from certkit.errors import CertkitError

    raise CertkitError("this factory needs MY_DATA set")
"""

# id: (flags after `certkit train`, words the one line must hold)
CASES: dict[str, tuple[list[str], list[str]]] = {
    "arch-colon-only": (["--arch", ":"], ["--arch expects pkg.module:factory", "not ':'"]),
    "dataset-colon-only": (["--dataset", ":"], ["--dataset expects pkg.module:factory", "not ':'"]),
    "arch-relative-module": (["--arch", ".foo:bar"], ["absolute module", "not '.foo:bar'"]),
    "arch-no-function": (["--arch", "factories:"], ["--arch expects pkg.module:factory", "not 'factories:'"]),
    "arch-no-such-module": (["--arch", "no_such_module_x:f"], ["--arch no_such_module_x:f", "cannot import"]),
    "arch-not-callable": (["--arch", "factories:COUNT"], ["--arch factories:COUNT", "is an int, not a function"]),
    "arch-returns-int": (["--arch", "factories:notmodule"], ["--arch factories:notmodule", "nn.Module, not int"]),
    "dataset-classes-string": (["--dataset", "factories:str_classes"], ["num_classes", "integer >= 1", "'four'"]),
    "dataset-classes-zero": (["--dataset", "factories:zero_classes"], ["num_classes", "integer >= 1", "not 0"]),
    "dataset-empty": (["--dataset", "factories:empty"], ["--dataset factories:empty", "train split is empty"]),
    "dataset-empty-test": (["--dataset", "factories:empty_test"], ["test split is empty"]),
    # a factory that refuses in certkit's own terms is a mistake to fix, said in its words
    "dataset-factory-refuses": (["--dataset", "factories:refuses"], ["this factory needs MY_DATA set"]),
}


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``factories`` of good and broken factories, importable for the test."""
    (tmp_path / "factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", list(CASES))
def test_factory_mistakes_are_one_line_with_status_2(
    name: str, factories: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags, words = CASES[name]
    argv = ["train", "--epochs", "1", "--device", "cpu", "--out", str(factories / "run"), *flags]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certkit: error:"), lines
    assert all(w in lines[0] for w in words), lines[0]
    assert not (factories / "run").exists()


def test_good_factories_still_train(factories: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--arch", "factories:make_model", "--dataset", "factories:make_data", "--epochs", "1"]
    assert main([*argv, "--device", "cpu", "--batch-size", "8", "--out", str(factories / "run")]) == 0
    assert (factories / "run" / "model.json").is_file()


@pytest.fixture(scope="module")
def gloro_run(tmp_path_factory: pytest.TempPathFactory, fmnist_root: Path) -> Path:
    """A GloRo LeNet-size net: one short epoch on a Fashion-MNIST subset."""
    out = tmp_path_factory.mktemp("gloro") / "run"
    argv = train_argv(fmnist_root, arch="gloro-2c2f", method="gloro", train_subset=64, test_subset=0, out=out)
    assert main(argv) == 0
    return out


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--sigma", "0.5"], "--sigma"),
        (["--n", "50"], "--n"),
        (["--n0", "10"], "--n0"),
        (["--alpha", "0.01"], "--alpha"),
        (["--seed", "3"], "--seed"),
        (["--amp", "bf16"], "--amp"),
        (["--channels-last"], "--channels-last"),
        (["--compile"], "--compile"),
        (["--amp", "fp16", "--channels-last"], "--amp and --channels-last"),
    ],
)
def test_smoothing_flags_are_refused_for_a_gloro_net(
    gloro_run: Path, fmnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    out = tmp_path / "g.tsv"
    argv = ["certify", str(gloro_run), "--data-dir", str(fmnist_root), "--max", "2", "--out", str(out), *flags]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    verb = "apply" if " and " in named else "applies"
    assert len(lines) == 1 and f"certkit: error: {named} {verb} to randomized smoothing" in lines[0], lines
    assert not out.exists()
    # the same command without them certifies
    assert main(argv[: -len(flags)]) == 0 and out.is_file()
