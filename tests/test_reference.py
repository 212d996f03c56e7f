"""Reference ``.pth.tar`` checkpoints: every layout the field's code bases write loads with the same logits.

The modules below mirror the reference definitions' class structure and attribute names (jh-jeong/smoothmix
``code/archs/lenet.py`` and ``code/archs/cifar_resnet.py``, ``datasets.NormalizeLayer``, SmoothAdv's
``InputCenterLayer``), so ``state_dict()`` produces the reference key names; each layout is saved with
``torch.save`` exactly as those code bases do, imported with certkit and compared logit for logit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certkit import checkpoint
from certkit.cli import main
from certkit.data import dataset_info
from certkit.errors import CertkitError
from certkit.models import create_model
from certkit.models.layers import Normalize
from certkit.reference import export_checkpoint, import_checkpoint
from certkit.results import read_results

CIFAR = dataset_info("cifar10")


# --- mirrors of the reference definitions (names and structure only) -------------------------------------
class RefNormalizeLayer(nn.Module):
    """(x - means) / sds with the constants as plain attributes: no entry in the state dict."""

    def __init__(self, means: Sequence[float], sds: Sequence[float]) -> None:
        super().__init__()
        self.means, self.sds = torch.tensor(list(means)), torch.tensor(list(sds))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.means.view(1, -1, 1, 1)) / self.sds.view(1, -1, 1, 1)


class RefInputCenterLayer(nn.Module):
    def __init__(self, means: Sequence[float]) -> None:
        super().__init__()
        self.means = torch.tensor(list(means))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.means.view(1, -1, 1, 1)


class RefLeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, side: int = 28) -> None:
        super().__init__()
        self.flat = 50 * ((side - 4) // 2 - 4) ** 2 // 4
        self.conv1 = nn.Conv2d(in_channels, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(self.flat, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        return self.fc2(F.relu(self.fc1(x.reshape(-1, self.flat))))


class RefBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, 1)
        self.layer2 = self._make_layer(32, n, 2)
        self.layer3 = self._make_layer(64, n, 2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [RefBasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [RefBasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.avgpool(x).flatten(1))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh random weights and non-trivial BatchNorm affine maps and statistics, so that a layer mapped
    to the wrong place cannot match by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.3 + 0.4 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def _logits_match(ref: nn.Module, model: nn.Module, shape: Sequence[int], n: int = 2) -> bool:
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x)
        assert not torch.allclose(want[0], want[1], rtol=1e-3, atol=1e-3)  # the logits depend on the input
        return torch.allclose(want, model(x), rtol=1e-5, atol=1e-5)


def _sgd_state(model: nn.Module) -> dict[str, Any]:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9).state_dict()


def _import_quietly(path: Path, dataset: str, **kw: str) -> tuple[nn.Sequential, dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit or irrelevant normalization must not warn
        return import_checkpoint(path, dataset, **kw)


# --- the layouts -----------------------------------------------------------------------------------------
def test_lenet_reference_layout(tmp_path: Path) -> None:
    """SmoothMix/MACER LeNet (conv1, conv2, fc1, fc2) in Sequential(Identity, LeNet), with its optimizer."""
    ref = _randomize(nn.Sequential(nn.Identity(), RefLeNet()))
    assert "1.conv1.weight" in ref.state_dict() and "1.fc2.bias" in ref.state_dict()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "lenet", "state_dict": ref.state_dict(), "optimizer": _sgd_state(ref)}, path)
    model, meta = _import_quietly(path, "fashion-mnist")  # Identity = every kind on MNIST-like data: no warning
    assert _logits_match(ref, model, (1, 28, 28), n=4)
    assert meta["arch"] == "lenet" and meta["source"]["arch"] == "lenet"


def test_cifar_resnet110_saved_from_dataparallel(tmp_path: Path) -> None:
    ref = _randomize(nn.DataParallel(nn.Sequential(RefNormalizeLayer(CIFAR.mean, CIFAR.std), RefResNet(110))))
    state = ref.state_dict()
    assert next(iter(state)).startswith("module.1.") and not any(k.startswith("module.0.") for k in state)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 150, "arch": "cifar_resnet110", "state_dict": state, "optimizer": _sgd_state(ref)}, path)
    with pytest.warns(UserWarning, match="assuming the 'standard' input layer"):
        model, meta = import_checkpoint(path, "cifar10")
    assert _logits_match(ref, model, (3, 32, 32))
    assert meta["arch"] == "resnet110" and meta["source"]["normalization"] == "standard"


def test_crt_checkpoint_without_arch_needs_arch(tmp_path: Path) -> None:
    """CRT saves {'epoch', 'state_dict', 'optimizer', 'scheduler'}: the user names the architecture."""
    ref = _randomize(nn.Sequential(RefNormalizeLayer(CIFAR.mean, CIFAR.std), RefResNet(20)))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[100, 150])
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {"epoch": 199, "state_dict": ref.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        path,
    )
    with pytest.raises(CertkitError, match=r"does not record its architecture.*pass --arch"):
        import_checkpoint(path, "cifar10")
    model, meta = _import_quietly(path, "cifar10", arch="resnet20", normalization="standard")
    assert _logits_match(ref, model, (3, 32, 32))
    assert meta["source"]["arch"] == "resnet20"
    # a reference name works too; an --arch that contradicts a recorded one is refused
    assert _logits_match(
        ref, _import_quietly(path, "cifar10", arch="cifar_resnet20", normalization="standard")[0], (3, 32, 32)
    )
    torch.save({"arch": "cifar_resnet20", "state_dict": ref.state_dict()}, path)
    with pytest.raises(CertkitError, match="--arch resnet110 disagrees"):
        import_checkpoint(path, "cifar10", arch="resnet110", normalization="standard")


def test_input_center_layer(tmp_path: Path) -> None:
    """SmoothAdv's mean-only first layer: --normalization center reproduces it; the default would not."""
    ref = _randomize(nn.Sequential(RefInputCenterLayer(CIFAR.mean), RefResNet(20)))
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 10, "arch": "cifar_resnet20", "state_dict": ref.state_dict()}, path)
    model, meta = _import_quietly(path, "cifar10", normalization="center")
    assert _logits_match(ref, model, (3, 32, 32))
    assert meta["normalization"] == {"mean": list(CIFAR.mean), "std": [1.0, 1.0, 1.0]}
    with pytest.warns(UserWarning, match="--normalization center/none"):
        standard = import_checkpoint(path, "cifar10")[0]
    assert not _logits_match(ref, standard, (3, 32, 32))


def test_macer_bare_net_defaults_to_no_input_layer(tmp_path: Path) -> None:
    """MACER saves the bare net under 'net' and feeds it raw pixels."""
    ref = _randomize(RefResNet(20))
    path = tmp_path / "440.pth"
    torch.save({"net": ref.state_dict(), "epoch": 440}, path)
    with pytest.warns(UserWarning, match="assuming the 'none' input layer"):
        model, _ = import_checkpoint(path, "cifar10", arch="resnet20")
    assert _logits_match(ref, model, (3, 32, 32))


def test_imagenet_dataparallel_inside_sequential(tmp_path: Path) -> None:
    """Cohen et al.'s and SmoothAdv's ImageNet layout: Sequential(layer, DataParallel(torchvision ResNet)), keys
    ``1.module.*``; SmoothAdv's layer is InputCenterLayer. (ResNet-18 stands in for ResNet-50: same key scheme.)"""
    from torchvision.models import resnet18

    imagenet = dataset_info("imagenet")
    torch.manual_seed(0)
    ref = _randomize(nn.Sequential(RefInputCenterLayer(imagenet.mean), nn.DataParallel(resnet18(num_classes=1000))))
    assert next(iter(ref.state_dict())).startswith("1.module.")
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": ref.state_dict()}, path)
    model, _ = _import_quietly(path, "imagenet", normalization="center")
    assert _logits_match(ref, model, (3, 224, 224))


def test_normalize_expresses_center_exactly() -> None:
    x = torch.rand(4, 3, 8, 8)
    mean = torch.tensor(CIFAR.mean).view(1, 3, 1, 1)
    assert torch.equal(Normalize(CIFAR.mean, [1.0, 1.0, 1.0])(x), x - mean)
    assert torch.equal(Normalize([0.0] * 3, [1.0] * 3)(x), x)


# --- refusals --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ref, arch, dataset, message",
    [
        (
            RefLeNet(num_classes=100),
            "lenet",
            "fashion-mnist",
            "checkpoint has 100 classes \\(1.fc2.bias\\), dataset fashion-mnist has 10",
        ),
        (RefLeNet(in_channels=3), "lenet", "fashion-mnist", "checkpoint takes 3-channel inputs \\(1.conv1.weight\\)"),
        (RefLeNet(side=32), "lenet", "fashion-mnist", "1.fc1.weight has shape \\(500, 1250\\).*another input shape"),
        (RefResNet(20), "cifar_resnet20", "fashion-mnist", "CIFAR network for 32x32 inputs"),
        (
            RefResNet(20, num_classes=100),
            "cifar_resnet20",
            "cifar10",
            "checkpoint has 100 classes \\(1.fc.bias\\), dataset cifar10 has 10",
        ),
    ],
)
def test_misfit_is_one_line(tmp_path: Path, ref: nn.Module, arch: str, dataset: str, message: str) -> None:
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": arch, "state_dict": nn.Sequential(nn.Identity(), ref).state_dict()}, path)
    with pytest.raises(CertkitError, match=message) as err:
        import_checkpoint(path, dataset, normalization="standard")
    assert "\n" not in str(err.value)


def test_misfit_certkit_run_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    checkpoint.save(
        create_model("lenet", 10, (1, 28, 28)),
        run_dir,
        checkpoint.make_meta("lenet", "fashion-mnist", 0.25, "gaussian"),
    )
    out = tmp_path / "r.tsv"
    code = main(
        ["certify", str(run_dir), "--dataset", "cifar10", "--data-dir", str(tmp_path / "absent"), "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "model takes inputs of shape (1, 28, 28), dataset cifar10 has (3, 32, 32)" in err and not out.exists()
    code = main(["certify", str(run_dir), "--arch", "lenet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--arch and --normalization describe reference" in err


# --- export ----------------------------------------------------------------------------------------------
def _certkit_run(tmp_path: Path, arch: str, dataset: str, seed: int = 0) -> tuple[Path, nn.Sequential]:
    info = dataset_info(dataset)
    torch.manual_seed(seed)
    model = _randomize(create_model(arch, info.num_classes, info.in_shape, info.mean, info.std), seed)
    run_dir = tmp_path / f"{arch}-run"
    checkpoint.save(model, run_dir, checkpoint.make_meta(arch, dataset, 0.25, "gaussian", epochs_completed=7))
    return run_dir, model


@pytest.mark.parametrize(
    "arch, dataset, ref, name",
    [
        ("lenet", "fashion-mnist", lambda: nn.Sequential(nn.Identity(), RefLeNet()), "lenet"),
        (
            "resnet20",
            "cifar10",
            lambda: nn.Sequential(RefNormalizeLayer(CIFAR.mean, CIFAR.std), RefResNet(20)),
            "cifar_resnet20",
        ),
    ],
)
def test_export_round_trip(tmp_path: Path, arch: str, dataset: str, ref: Callable[[], nn.Module], name: str) -> None:
    run_dir, model = _certkit_run(tmp_path, arch, dataset)
    out = export_checkpoint(run_dir, tmp_path / "exported.pth.tar")
    saved = torch.load(out, weights_only=True)
    assert set(saved) == {"epoch", "arch", "state_dict"} and saved["arch"] == name and saved["epoch"] == 7
    reference = ref().eval()
    assert list(saved["state_dict"]) == list(reference.state_dict())  # the reference certify.py's strict load
    reference.load_state_dict(saved["state_dict"], strict=True)
    shape = dataset_info(dataset).in_shape
    assert _logits_match(model, reference, shape)
    back, _ = _import_quietly(out, dataset, normalization="standard")
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_export_resnet50_keeps_the_inner_dataparallel(tmp_path: Path) -> None:
    """The reference builds ImageNet's ResNet-50 as Sequential(layer, DataParallel(resnet50)): keys ``1.module.*``."""
    from torchvision.models import resnet50

    run_dir = tmp_path / "run"
    checkpoint.save(
        create_model("resnet50", 1000, (3, 224, 224), dataset_info("imagenet").mean, dataset_info("imagenet").std),
        run_dir,
        checkpoint.make_meta("resnet50", "imagenet", 0.5, "gaussian"),
    )
    saved = torch.load(export_checkpoint(run_dir, tmp_path / "r50.pth.tar"), weights_only=True)
    assert saved["arch"] == "resnet50"
    want = nn.Sequential(nn.Identity(), nn.DataParallel(resnet50(num_classes=1000))).state_dict()
    assert {k: v.shape for k, v in saved["state_dict"].items()} == {k: v.shape for k, v in want.items()}


def test_export_refusals(tmp_path: Path) -> None:
    run_dir, _ = _certkit_run(tmp_path, "resnet56", "cifar10")
    with pytest.raises(CertkitError, match="cannot build 'resnet56'"):
        export_checkpoint(run_dir, tmp_path / "x.pth.tar")
    # a center-layer model would be certified with (x-mu)/sigma by the reference certify.py
    model = create_model("resnet20", 10, (3, 32, 32), CIFAR.mean, [1.0] * 3)
    checkpoint.save(model, tmp_path / "center", checkpoint.make_meta("resnet20", "cifar10", 0.25, "imported"))
    with pytest.raises(CertkitError, match="not the reference layer for cifar10"):
        export_checkpoint(tmp_path / "center", tmp_path / "x.pth.tar")
    assert not (tmp_path / "x.pth.tar").exists()


# --- the command line ------------------------------------------------------------------------------------
def test_cli_certify_reference_lenet_and_export(
    tmp_path: Path, fmnist_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CRT-style LeNet file certifies exactly as the same weights saved as a certkit run, and exports back."""
    run_dir, model = _certkit_run(tmp_path, "lenet", "fashion-mnist", seed=3)
    ref = nn.Sequential(nn.Identity(), RefLeNet()).eval()
    ref.load_state_dict(
        torch.load(export_checkpoint(run_dir, tmp_path / "ref.pth.tar"), weights_only=True)["state_dict"]
    )
    crt = tmp_path / "crt.pth.tar"
    torch.save({"epoch": 90, "state_dict": ref.state_dict()}, crt)
    common = ["--dataset", "fashion-mnist", "--n0", "20", "--n", "200", "--max", "4", "--seed", "5"]
    assert main(["certify", str(crt), *common, "--out", str(tmp_path / "r.tsv")]) == 2
    assert "pass --arch NAME" in capsys.readouterr().err
    assert (
        main(["certify", str(crt), "--arch", "lenet", "--sigma", "0.25", *common, "--out", str(tmp_path / "r.tsv")])
        == 0
    )
    assert main(["certify", str(run_dir), *common, "--out", str(tmp_path / "c.tsv")]) == 0
    got, want = read_results(tmp_path / "r.tsv"), read_results(tmp_path / "c.tsv")
    assert list(got.idx) == [0, 1, 2, 3]
    assert list(got.predict) == list(want.predict) and list(got.radius) == list(want.radius)

    out = tmp_path / "exported.pth.tar"
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "reference", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert _logits_match(model, import_checkpoint(out, "fashion-mnist")[0], (1, 28, 28))
