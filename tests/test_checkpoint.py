"""Checkpoints round-trip exactly, refuse anything that does not match its metadata, and never unpickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from certkit import checkpoint, reference
from certkit.errors import CertkitError
from certkit.models import create_model


def _saved(tmp_path: Path, arch: str = "lenet") -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model(arch, 10, (1, 28, 28))
    run = tmp_path / "run"
    checkpoint.save(model, run, checkpoint.make_meta(arch, "fashion-mnist", 0.25, "gaussian", {"x": 1}))
    return model.eval(), run


def test_round_trip_same_logits(tmp_path: Path) -> None:
    model, run = _saved(tmp_path)
    loaded, meta = checkpoint.load_with_meta(run)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert meta["sigma"] == 0.25 and meta["method"] == "gaussian" and meta["hparams"] == {"x": 1}
    assert not loaded.training
    # any of the three path forms
    for p in (run / "model.json", run / "model.safetensors"):
        with torch.no_grad():
            assert torch.equal(checkpoint.load(p)(x), model(x))


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.99])
def test_truncated_weights_refused(tmp_path: Path, fraction: float) -> None:
    _, run = _saved(tmp_path)
    w = run / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CertkitError, match=r"model\.safetensors"):
        checkpoint.load(run)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9])
def test_truncated_weights_refused_without_hash(tmp_path: Path, fraction: float) -> None:
    # even with the hash removed from the metadata, safetensors' own header check refuses the file
    _, run = _saved(tmp_path)
    meta = json.loads((run / "model.json").read_text())
    meta["weights"]["sha256"] = None
    (run / "model.json").write_text(json.dumps(meta))
    w = run / "model.safetensors"
    w.write_bytes(w.read_bytes()[: int(len(w.read_bytes()) * fraction)])
    with pytest.raises(CertkitError, match=r"model\.safetensors"):
        checkpoint.load(run)


def test_shape_mismatch_refused(tmp_path: Path) -> None:
    _, run = _saved(tmp_path)
    meta = json.loads((run / "model.json").read_text())
    meta["weights"]["tensors"]["1.classifier.3.weight"]["shape"] = [11, 500]
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CertkitError, match="shapes or dtypes do not match"):
        checkpoint.load(run)


def test_arch_mismatch_refused(tmp_path: Path) -> None:
    _, run = _saved(tmp_path)
    meta = json.loads((run / "model.json").read_text())
    meta["arch"] = "smallcnn"
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CertkitError, match="do not fit architecture 'smallcnn'"):
        checkpoint.load(run)


def test_bad_metadata_refused(tmp_path: Path) -> None:
    _, run = _saved(tmp_path)
    (run / "model.json").write_text("{not json")
    with pytest.raises(CertkitError, match=r"model\.json: not valid JSON"):
        checkpoint.load(run)
    (run / "model.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CertkitError, match="not a certkit checkpoint"):
        checkpoint.load(run)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/certkit-pwned-pth",))


def test_pickle_payload_refused_without_running(tmp_path: Path) -> None:
    marker = Path("/tmp/certkit-pwned-pth")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "evil.pth.tar"
    with open(bad, "wb") as f:
        pickle.dump({"arch": "cifar_resnet20", "state_dict": {}, "x": _Payload()}, f)
    with pytest.raises(CertkitError, match=r"evil\.pth\.tar: refused"):
        reference.load_any(bad, dataset="cifar10")
    assert not marker.exists()
    # torch.save'd payloads too
    torch.save({"arch": "cifar_resnet20", "state_dict": {}, "x": _Payload()}, bad)
    with pytest.raises(CertkitError, match="refused"):
        reference.load_any(bad, dataset="cifar10")
    assert not marker.exists()


def test_reference_checkpoint_maps_onto_certkit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = create_model("resnet20", 10, (3, 32, 32)).eval()
    # the reference layout: Sequential(NormalizeLayer without state, net) saved from DataParallel
    state = {"module." + k: v for k, v in ref.state_dict().items() if not k.startswith("0.")}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "cifar_resnet20", "state_dict": state, "epoch": 150}, path)
    model, meta = reference.load_any(path, dataset="cifar10")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref[1](reference.load_any(path, dataset="cifar10")[0][0](x))
        assert torch.allclose(model(x), expected)
    assert meta["arch"] == "resnet20" and meta["source"]["arch"] == "cifar_resnet20"
    # MACER-style bare keys (no normalization layer in their model)
    torch.save(
        {"arch": "resnet20", "state_dict": {k[2:]: v for k, v in ref.state_dict().items() if k.startswith("1.")}}, path
    )
    assert reference.load_any(path, dataset="cifar10")[1]["arch"] == "resnet20"


def test_reference_checkpoint_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.pth.tar"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CertkitError, match="does not record its architecture"):
        reference.load_any(path, dataset="cifar10")
    torch.save({"arch": "densenet40", "state_dict": {}}, path)
    with pytest.raises(CertkitError, match="unsupported architecture 'densenet40'"):
        reference.load_any(path, dataset="cifar10")
    torch.save({"arch": "cifar_resnet20", "state_dict": {"1.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(CertkitError, match="does not fit"):
        reference.load_any(path, dataset="cifar10")
