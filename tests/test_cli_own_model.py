"""``certkit certify``/``predict`` of a run of your own model, trained with ``--arch pkg.module:factory``.

The CLI builds the untrained module with the factory that ``--arch`` names (only because the command line
names it, never because model.json does, and only the spec model.json records) and loads the run's weights
into it through the library path that checks their hash; ``--dataset pkg.module:factory`` certifies on the
factory's test split, checked against the model's class count and input shape.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import certkit
from certkit.cli import main
from certkit.results import read_results, sidecar_path
from certkit.smoothing.runner import model_fingerprint

MODULE = "ck_own_model_factories"
ARCH, DATA = f"{MODULE}:make_model", f"{MODULE}:make_data"

FACTORIES = """
import torch
from torch import nn
from torch.utils.data import TensorDataset


def make_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


def other_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


def _split(n, classes=4, side=8):
    g = torch.Generator().manual_seed(n)
    return TensorDataset(torch.rand(n, 3, side, side, generator=g), torch.arange(n) % classes)


def make_data():
    return _split(16), _split(8), 4


def five_classes():
    return _split(16, 5), _split(8, 5), 5


def small_images():
    return _split(16, side=4), _split(8, side=4), 4
"""

#: a module whose import leaves a file behind: proof that certkit imported it
MARKER = """
from pathlib import Path

Path(__file__).with_name("imported.marker").write_text("imported")


def make_model():
    raise AssertionError("called")


def make_data():
    raise AssertionError("called")
"""

TINY = ["--n0", "10", "--n", "50", "--max", "2", "--batch", "50", "--device", "cpu"]


def crt_argv(teacher: Path, out: Path, *teacher_flags: str) -> list[str]:
    return [
        "train", "--method", "crt", "--teacher", str(teacher), *teacher_flags, "--arch", ARCH, "--dataset", DATA,
        "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A one-epoch run of the factories' model on the factories' data (the folder also holds the module)."""
    root = tmp_path_factory.mktemp("own")
    (root / f"{MODULE}.py").write_text(FACTORIES)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        argv = ["train", "--arch", ARCH, "--dataset", DATA, "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
        assert main([*argv, "--out", str(root / "run")]) == 0
    yield root / "run"
    sys.modules.pop(MODULE, None)


@pytest.fixture
def importable(own_run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The factories' folder on sys.path for one test; returns the run."""
    monkeypatch.syspath_prepend(str(own_run.parent))
    return own_run


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("certkit: error:"), lines
    return lines[0]


@pytest.mark.parametrize("mode", ["certify", "predict"])
def test_own_model_certifies_with_its_arch_and_data(mode: str, importable: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{mode}.tsv"
    flags = TINY if mode == "certify" else [f for f in TINY if f not in ("--n0", "10")]
    assert main([mode, str(importable), "--arch", ARCH, "--dataset", DATA, *flags, "--out", str(out)]) == 0
    rows = read_results(out)
    test = sys.modules[MODULE].make_data()[1]
    assert rows.kind == mode and rows.idx.tolist() == [0, 1]
    assert rows.label.tolist() == [int(test[i][1]) for i in (0, 1)]
    assert set(rows.predict.tolist()) <= {-1, 0, 1, 2, 3}
    assert rows.correct.tolist() == [int(p == y) for p, y in zip(rows.predict, rows.label, strict=True)]
    # the run's weights, loaded into the factory's module, not the factory's fresh initialisation
    settings = json.loads(sidecar_path(out).read_text())["settings"]
    trained = certkit.load(importable, model=sys.modules[MODULE].make_model())
    assert settings["model_sha256"] == model_fingerprint(trained)
    assert settings["model_sha256"] != model_fingerprint(sys.modules[MODULE].make_model())
    assert settings["dataset"] == DATA


def test_without_arch_it_says_which_to_pass(
    importable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certify", str(importable), *TINY, "--out", str(tmp_path / "c.tsv")]) == 2
    line = one_error_line(capsys)
    assert f"pass --arch {ARCH} --dataset {DATA}" in line, line
    assert main(["certify", str(importable), "--dataset", DATA, *TINY, "--out", str(tmp_path / "c.tsv")]) == 2
    line = one_error_line(capsys)
    assert f"pass --arch {ARCH} to build it" in line, line
    assert not (tmp_path / "c.tsv").exists()


def test_recorded_dataset_factory_must_be_named(
    importable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certify", str(importable), "--arch", ARCH, *TINY, "--out", str(tmp_path / "c.tsv")]) == 2
    assert f"pass --dataset {DATA}" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--arch", f"{MODULE}:other_model"], [f"--arch {MODULE}:other_model", f"trained with --arch {ARCH}"]),
        (["--arch", ARCH, "--normalization", "none"], ["--normalization describes reference"]),
        (["--dataset", f"{MODULE}:five_classes"], ["model has 4 classes", f"dataset {MODULE}:five_classes has 5"]),
        (["--dataset", f"{MODULE}:small_images"], ["inputs of shape (3, 8, 8)", "has (3, 4, 4)"]),
    ],
    ids=["other-arch", "normalization", "dataset-classes", "dataset-shape"],
)
def test_mismatches_are_one_line(
    flags: list[str], words: list[str], importable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["certify", str(importable), *flags]
    argv += [] if "--arch" in flags else ["--arch", ARCH]
    argv += [] if "--dataset" in flags else ["--dataset", DATA]
    assert main([*argv, *TINY, "--out", str(tmp_path / "c.tsv")]) == 2
    line = one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / "c.tsv").exists()


def test_tampered_weights_are_refused(importable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(importable, run)
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    argv = ["certify", str(run), "--arch", ARCH, "--dataset", DATA, *TINY, "--out", str(tmp_path / "c.tsv")]
    assert main(argv) == 2
    assert "SHA-256 does not match" in one_error_line(capsys)
    # a CRT teacher's weights load through the same checked path, not into the factory's module unchecked
    assert main(crt_argv(run, tmp_path / "s", "--teacher-arch", ARCH)) == 2
    assert "SHA-256 does not match" in one_error_line(capsys)


def run_naming_the_marker(own_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **recorded: str) -> Path:
    """A copy of the run whose model.json names ``ck_marker_mod:make_model`` (and ``recorded``), a module on
    sys.path whose import leaves ``imported.marker`` in ``tmp_path``."""
    (tmp_path / "ck_marker_mod.py").write_text(MARKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(own_run.parent))
    run = tmp_path / "run"
    shutil.copytree(own_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta.update(arch="ck_marker_mod:make_model", **recorded)
    (run / "model.json").write_text(json.dumps(meta))
    return run


def test_a_factory_model_json_names_is_never_imported(
    own_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.json naming a module whose import leaves a marker: certify without --arch, or with another spec
    than the one recorded, and train with it as a CRT teacher likewise, refuse without importing it."""
    run = run_naming_the_marker(own_run, tmp_path, monkeypatch, dataset="ck_marker_mod:make_data")
    assert main(["certify", str(run), *TINY, "--out", str(tmp_path / "c.tsv")]) == 2
    assert "pass --arch ck_marker_mod:make_model --dataset ck_marker_mod:make_data" in one_error_line(capsys)
    assert main(["predict", str(run), "--dataset", DATA, "--n", "50", "--out", str(tmp_path / "p.tsv")]) == 2
    assert "pass --arch ck_marker_mod:make_model to build it" in one_error_line(capsys)
    # the user's --arch spec differs from the recorded one: neither is imported
    assert main(["certify", str(run), "--arch", ARCH, "--dataset", DATA, *TINY, "--out", str(tmp_path / "c.tsv")]) == 2
    assert "trained with --arch ck_marker_mod:make_model" in one_error_line(capsys)
    # nor as a CRT teacher, without --teacher-arch or with another spec
    for flags in ([], ["--teacher-arch", ARCH]):
        assert main(crt_argv(run, tmp_path / "s", *flags)) == 2
        assert "ck_marker_mod:make_model" in one_error_line(capsys)
    assert not (tmp_path / "imported.marker").exists()
    assert "ck_marker_mod" not in sys.modules


def test_a_run_of_certkits_own_arch_refuses_a_factory(
    importable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(importable, run)
    meta = json.loads((run / "model.json").read_text())
    meta["arch"] = "lenet"
    (run / "model.json").write_text(json.dumps(meta))
    assert main(["certify", str(run), "--arch", ARCH, *TINY, "--out", str(tmp_path / "c.tsv")]) == 2
    assert "run of certkit's architecture 'lenet'" in one_error_line(capsys)


def test_a_run_of_a_module_given_from_python_points_to_certkit_load(
    importable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trainer records a module passed from Python as ``custom:<class>``: no factory names it, so certify
    points to certkit.load rather than to an --arch that would import a module named ``custom``."""
    run = tmp_path / "run"
    shutil.copytree(importable, run)
    meta = json.loads((run / "model.json").read_text())
    meta["arch"] = "custom:Sequential"
    (run / "model.json").write_text(json.dumps(meta))
    for extra in ([], ["--arch", "custom:Sequential"]):
        assert main(["certify", str(run), *extra, "--dataset", DATA, *TINY, "--out", str(tmp_path / "c.tsv")]) == 2
        assert "certkit.load(run, model=" in one_error_line(capsys)
    assert "custom" not in sys.modules


def test_own_model_run_teaches_crt_with_teacher_arch(importable: Path, tmp_path: Path) -> None:
    """``--teacher-arch pkg.module:factory`` builds the teacher run's module, its checked weights load into it,
    and the student's lineage names that run; the student teaches the next generation the same way."""
    from certkit.checkpoint import sha256_file

    student = tmp_path / "student"
    assert main(crt_argv(importable, student, "--teacher-arch", ARCH)) == 0
    meta = json.loads((student / "model.json").read_text())
    assert meta["teacher"]["sha256"] == sha256_file(importable / "model.safetensors")
    assert meta["teacher"]["arch"] == ARCH and [g["method"] for g in meta["lineage"]] == ["gaussian"]
    assert main(crt_argv(student, tmp_path / "gen2", "--teacher-arch", ARCH)) == 0
    lineage = json.loads((tmp_path / "gen2" / "model.json").read_text())["lineage"]
    assert [g["method"] for g in lineage] == ["gaussian", "crt"]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ([], [f"pass --teacher-arch {ARCH} to build it"]),
        (["--teacher-arch", f"{MODULE}:other_model"], [f"--teacher-arch {MODULE}:other_model", f"--arch {ARCH}"]),
        (["--teacher-arch", ARCH, "--teacher-normalization", "none"], ["--teacher-normalization describes"]),
    ],
    ids=["missing", "other-arch", "normalization"],
)
def test_own_model_teacher_mistakes_are_one_line(
    flags: list[str], words: list[str], importable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(crt_argv(importable, tmp_path / "s", *flags)) == 2
    line = one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / "s" / "model.json").exists()


def test_export_refuses_an_own_model_run_in_one_line(
    own_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reference certify.py builds only its own architectures; the refusal says so before any import."""
    assert main(["export", str(own_run), "--format", "reference", "--out", str(tmp_path / "x.pth")]) == 2
    assert f"the reference certify.py cannot build '{ARCH}'" in one_error_line(capsys)
    assert not (tmp_path / "x.pth").exists()


def test_help_explains_factories(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["certify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a run of your own model (trained with --arch pkg.module:factory)" in text
    assert "never because model.json names it" in text
    assert "or pkg.module:factory, your own data: the factory's test split" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "for a teacher run of your own model (trained with --arch pkg.module:factory), that" in text
