"""Crafted or damaged checkpoints, sidecars and metrics files: each is refused in one line, before any large
allocation and without a traceback."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from certkit import checkpoint
from certkit.cli import _refuse_overwriting
from certkit.curves import read_metrics
from certkit.errors import CertkitError
from certkit.experiments.reproduce import _run_meta
from certkit.models import create_model
from certkit.reference import import_checkpoint
from certkit.results import read_sidecar

DEEP = "[" * 100_000 + "]" * 100_000


def _saved(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    checkpoint.save(
        create_model("lenet", 10, (1, 28, 28)), run, checkpoint.make_meta("lenet", "fashion-mnist", 0.25, "x")
    )
    return run


def _edit_meta(run: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads((run / "model.json").read_text())
    edit(meta)
    (run / "model.json").write_text(json.dumps(meta))


def test_a_crafted_model_json_is_refused_before_the_model_is_materialised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100,000 classes at 512x512 (gigabytes of weights) beside a 68-byte weights file: the architecture is
    compared with the file on the meta device, and no real tensor of it is ever allocated."""
    run = tmp_path / "big"
    run.mkdir()
    weights = st_save({"x": torch.zeros(1)})
    (run / "model.safetensors").write_bytes(weights)
    meta = checkpoint.make_meta("lenet", "fashion-mnist", 0.25, "gaussian", num_classes=100_000, in_shape=[1, 512, 512])
    meta.update(
        format=checkpoint.FORMAT,
        weights={"sha256": hashlib.sha256(weights).hexdigest(), "tensors": {"x": {"shape": [1], "dtype": "float32"}}},
    )
    (run / "model.json").write_text(json.dumps(meta))
    devices = []

    def on_meta_only(*args: Any) -> torch.nn.Module:
        devices.append(torch.empty(0).device.type)
        if devices[-1] != "meta":
            raise AssertionError("the crafted architecture was built with real tensors")
        return create_model(*args)

    monkeypatch.setattr(checkpoint, "create_model", on_meta_only)
    with pytest.raises(CertkitError, match=r"weights do not fit architecture 'lenet' \(missing .*unexpected x\)"):
        checkpoint.load(run)
    assert devices == ["meta"]


def test_a_checkpoint_still_loads_as_saved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("lenet", 10, (1, 28, 28)).eval()
    checkpoint.save(model, tmp_path / "run", checkpoint.make_meta("lenet", "fashion-mnist", 0.25, "gaussian"))
    loaded = checkpoint.load(tmp_path / "run")
    assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_deeply_nested_json_is_a_one_line_error(tmp_path: Path) -> None:
    run = _saved(tmp_path)
    (run / "model.json").write_text(DEEP)
    with pytest.raises(CertkitError, match=r"model\.json: not valid JSON \(maximum recursion depth"):
        checkpoint.load(run)
    result = tmp_path / "r.tsv"
    result.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    (tmp_path / "r.tsv.json").write_text(DEEP)
    with pytest.raises(CertkitError, match=r"r\.tsv\.json: not valid JSON"):
        read_sidecar(result)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n' + DEEP + "\n")
    with pytest.raises(CertkitError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_metrics(tmp_path)


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc/self/mem to force EIO")
@pytest.mark.parametrize("name", ["model.json", "model.safetensors"])
def test_a_file_that_cannot_be_read_is_a_one_line_error(tmp_path: Path, name: str) -> None:
    """/proc/self/mem is a regular file whose read at offset 0 fails with EIO: any unreadable file does so."""
    run = _saved(tmp_path)
    (run / name).unlink()
    (run / name).symlink_to("/proc/self/mem")
    with pytest.raises(CertkitError, match=rf"{name}: cannot read.*Input/output error"):
        checkpoint.load(run)


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc/self/mem to force EIO")
def test_a_sidecar_that_cannot_be_read_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "r.tsv").write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    (tmp_path / "r.tsv.json").symlink_to("/proc/self/mem")
    with pytest.raises(CertkitError, match=r"r\.tsv\.json: cannot read the settings file"):
        read_sidecar(tmp_path / "r.tsv")


@pytest.mark.parametrize("name", ["model.json", "model.safetensors"])
def test_a_checkpoint_file_that_is_not_regular_is_not_called_missing(tmp_path: Path, name: str) -> None:
    run = _saved(tmp_path)
    (run / name).unlink()
    os.mkfifo(run / name)  # opening it would block forever
    with pytest.raises(CertkitError, match=rf"{name}: is not a regular file \(a FIFO"):
        checkpoint.load(run)
    (run / name).unlink()
    (run / name).mkdir()
    with pytest.raises(CertkitError, match=rf"{name}: is a directory"):
        checkpoint.load(run)


@pytest.mark.parametrize(
    "key, value", [("dataset", {"a": 1}), ("dataset", ["fashion-mnist"]), ("wrapper", ["gloro"]), ("method", 3)]
)
def test_metadata_names_of_the_wrong_type_are_refused(tmp_path: Path, key: str, value: Any) -> None:
    run = _saved(tmp_path)
    _edit_meta(run, lambda m: m.update({key: value}))
    with pytest.raises(CertkitError, match=f"model.json: '{key}' must be a string"):
        checkpoint.load(run)


def test_a_symlink_loop_at_the_run_path_is_a_one_line_error(tmp_path: Path) -> None:
    run = tmp_path / "loop"
    run.mkdir()
    (run / "model.json").symlink_to(run / "model.json")
    with pytest.raises(CertkitError, match="cannot resolve it"):
        _refuse_overwriting(str(run), [tmp_path / "out.tsv"], "--out")


def test_a_reference_checkpoint_of_scalars_is_a_one_line_error(tmp_path: Path) -> None:
    names = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight")
    path = tmp_path / "zd.pth"
    torch.save({"arch": "lenet", "state_dict": {k: torch.zeros(()) for k in (*names, "fc2.bias")}}, path)
    with pytest.raises(CertkitError, match=r"has shape \(\)"):
        import_checkpoint(path, "fashion-mnist", normalization="none")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p.write_text("{broken"), "not valid JSON"),
        (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "train": [1]})), "'train' or 'cost'"),
        (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "cost": "x"})), "'cost' is malformed"),
    ],
)
def test_reproduce_names_a_damaged_model_json(tmp_path: Path, edit: Callable[[Path], Any], match: str) -> None:
    run = _saved(tmp_path)
    assert _run_meta(run)["arch"] == "lenet"
    edit(run / "model.json")
    with pytest.raises(CertkitError, match=rf"{run / 'model.json'}: .*{match}"):
        _run_meta(run)


def test_a_module_of_your_own_loads_as_before_lazy_or_in_another_dtype(tmp_path: Path) -> None:
    """The meta-device check is for architectures certkit builds from model.json; a module the user built
    (lazy layers not yet initialised, float64) is loaded by load_state_dict as it always was."""
    from torch import nn

    def lazy() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(10))

    trained = lazy()
    trained(torch.rand(2, 1, 28, 28))
    meta = checkpoint.make_meta("mine", "fashion-mnist", 0.25, "gaussian")
    meta.pop("normalization")
    checkpoint.save(trained, tmp_path / "lazy", meta)
    loaded = checkpoint.load(tmp_path / "lazy", model=lazy())
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), trained.eval()(x))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    checkpoint.save(plain, tmp_path / "plain", meta)
    double = checkpoint.load(tmp_path / "plain", model=nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).double())
    assert double[1].weight.dtype == torch.float64 and torch.equal(double[1].weight.float(), plain[1].weight)
