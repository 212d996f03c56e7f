"""Your own model and data: an nn.Module and torch Datasets through training, saving, loading and
certification; mismatches as one-line errors before any work; the objective protocol's defaults."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import certkit
from certkit import RunPlan, Smooth, certify_dataset
from certkit.cli import main
from certkit.errors import CertkitError
from certkit.methods import METHODS, build_objective
from certkit.objectives import Objective
from certkit.results import read_results
from certkit.train import TrainConfig, Trainer
from helpers import make_idx_dataset

SHAPE = (1, 8, 8)


def mlp(classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))


def tensors(n: int = 48, seed: int = 0) -> TensorDataset:
    """Three classes told apart by the mean brightness: learnable in one epoch."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = (0.2 + 0.3 * y.view(-1, 1, 1, 1).float() + 0.05 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1)
    return TensorDataset(x, y)


def _train(out: Path, method: str, **kwargs: object) -> Trainer:
    torch.manual_seed(0)
    return certkit.train(
        tensors(),
        mlp(),
        method,
        sigma=0.25,
        out=out,
        test_data=tensors(12, seed=1),
        epochs=1,
        batch_size=16,
        lr=0.05,
        device="cpu",
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byo")
    _train(root / "gaussian", "gaussian")
    _train(root / "smoothmix", "smoothmix", hparams={"num_noise_vec": 2, "num_steps": 2, "mix_step": 1})
    # the teacher is a certkit run of your own module, loaded into an instance of it
    _train(root / "crt", "crt", teacher=root / "gaussian", teacher_model=mlp())
    return {name: root / name for name in ("gaussian", "smoothmix", "crt")}


@pytest.mark.parametrize("method", ["gaussian", "smoothmix", "crt"])
def test_own_module_trains_saves_loads_and_certifies(runs: dict[str, Path], method: str, tmp_path: Path) -> None:
    run = runs[method]
    meta = json.loads((run / "model.json").read_text())
    assert meta["arch"] == "custom:Sequential" and meta["num_classes"] == 3 and meta["in_shape"] == list(SHAPE)
    assert meta["method"] == method and meta["epochs_completed"] == 1
    if method == "crt":
        assert meta["teacher"]["path"] == str(runs["gaussian"]) and meta["cost"]["total"]["teacher_forward"] > 0
    with pytest.raises(CertkitError, match="model=<"):
        certkit.load(run)  # a module certkit does not know needs an instance of it
    model = certkit.load(run, model=mlp())
    saved = certkit.checkpoint.read_weights(run / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    # certify and predict straight from a plain torch Dataset
    test = tensors(6, seed=2)
    smoothed = Smooth(model, num_classes=3, sigma=0.25)
    plan = RunPlan(n0=10, n=100, alpha=0.01, batch_size=100)
    summary = certify_dataset(smoothed, test, plan, out=tmp_path / "c.tsv", progress=False)
    assert summary is not None and summary["N"] == 6
    rows = read_results(tmp_path / "c.tsv")
    assert list(rows.idx) == list(range(6)) and list(rows.label) == [int(test[i][1]) for i in range(6)]
    plan = RunPlan(mode="predict", n=100, alpha=0.01, batch_size=100)
    certify_dataset(smoothed, test, plan, out=tmp_path / "p.tsv", progress=False)
    assert len(read_results(tmp_path / "p.tsv")) == 6


class Tied(nn.Module):
    """Input and output embeddings tied: one parameter under two names in the state dict."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.encode = nn.Linear(channels * 8 * 8, 3, bias=False)
        self.decode = nn.Linear(3, 3)
        self.mirror = nn.Linear(channels * 8 * 8, 3, bias=False)
        self.mirror.weight = self.encode.weight

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        return self.decode(self.encode(flat) + self.mirror(flat))


@pytest.mark.parametrize("channels", [1, 6])
def test_tied_weights_and_many_channels_save_load_and_certify(tmp_path: Path, channels: int) -> None:
    """A run that trains must load: multispectral images (6 bands) and tied weights included."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(12, channels, 8, 8, generator=g), torch.arange(12) % 3)
    torch.manual_seed(0)
    certkit.train(data, Tied(channels), "gaussian", out=tmp_path, epochs=1, batch_size=6, device="cpu", progress=False)
    assert json.loads((tmp_path / "model.json").read_text())["in_shape"] == [channels, 8, 8]
    model = certkit.load(tmp_path, model=Tied(channels))
    assert model.mirror.weight is model.encode.weight  # the module's own tie, filled once
    saved = certkit.checkpoint.read_weights(tmp_path / "model.safetensors")
    assert torch.equal(saved["mirror.weight"], saved["encode.weight"])
    summary = certify_dataset(
        Smooth(model, 3, 0.25), data, RunPlan(n0=10, n=100, max_idx=2), out=tmp_path / "c.tsv", progress=False
    )
    assert summary is not None and summary["N"] == 2


def test_an_image_shape_loading_would_refuse_is_refused_before_training(tmp_path: Path) -> None:
    data = TensorDataset(torch.rand(2, 1, 8, 5000), torch.tensor([0, 1]))
    model = nn.Sequential(nn.Flatten(), nn.Linear(40_000, 3))
    with pytest.raises(CertkitError, match=r"training data: image shape \(1, 8, 5000\) is beyond"):
        certkit.train(data, model, "gaussian", out=tmp_path / "r", device="cpu", progress=False)
    assert not (tmp_path / "r").exists()


def test_dataloader_trains_with_its_own_batches() -> None:
    loader = DataLoader(tensors(), batch_size=12, shuffle=False)
    trainer = Trainer(
        mlp(),
        build_objective("gaussian", 0.25),
        loader,
        None,
        TrainConfig(epochs=1),
        device="cpu",
        progress=False,
        log=lambda m: None,
    )
    trainer.fit()
    assert trainer.ledger.epochs[0]["steps"] == 4 and trainer.ledger.epochs[0]["forward"] == 48
    assert trainer.config.batch_size == 12  # what model.json records is the batch that ran


def test_mismatches_are_one_line_errors_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(CertkitError, match="outputs 3 logits but the dataset has 5 classes"):
        certkit.train(tensors(), mlp(), "gaussian", num_classes=5, out=tmp_path / "a", device="cpu")
    with pytest.raises(CertkitError, match=r"does not fit images of shape \(1, 8, 8\)"):
        certkit.train(
            tensors(), nn.Sequential(nn.Flatten(), nn.Linear(10, 3)), "gaussian", out=tmp_path / "b", device="cpu"
        )
    with pytest.raises(CertkitError, match="teacher outputs 5 logits"), pytest.warns(UserWarning, match="no teacher"):
        certkit.train(tensors(), mlp(), "crt", teacher=mlp(5), out=tmp_path / "c", device="cpu")
    with pytest.raises(CertkitError, match="this teacher is already a module"):
        certkit.train(tensors(), mlp(), "crt", teacher=mlp(), teacher_model=mlp(), device="cpu")
    with pytest.raises(CertkitError, match=r"label 3, outside 0\.\.2"):
        certkit.train(TensorDataset(torch.rand(4, *SHAPE), torch.tensor([3, 0, 1, 2])), mlp(), "gaussian", device="cpu")
    assert not any(tmp_path.iterdir())  # nothing written
    pixels = TensorDataset(torch.rand(16, *SHAPE) * 255, torch.arange(16) % 3)
    with pytest.warns(UserWarning, match="0-255 pixels"):
        Trainer(mlp(), build_objective("gaussian", 0.25), pixels, None, TrainConfig(epochs=1), device="cpu")
    normalized = TensorDataset((torch.rand(16, *SHAPE) - 0.286) / 0.353, torch.arange(16) % 3)
    with pytest.warns(UserWarning, match="normalized images"):  # its maximum, 2.02, passes the 0-255 test
        Trainer(mlp(), build_objective("gaussian", 0.25), normalized, None, TrainConfig(epochs=1), device="cpu")


def test_certification_refuses_integer_pixels_and_names_the_scale_of_off_range_ones(tmp_path: Path) -> None:
    """Noise and radii are in [0, 1] pixel units: a uint8 image would certify at the largest radius n allows."""
    smooth = Smooth(mlp(), 3, 0.25)
    x = tensors(1)[0][0]
    with pytest.raises(CertkitError, match=r"uint8 pixels; certkit certifies float images in \[0, 1\]"):
        smooth.certify((x * 255).to(torch.uint8), 10, 100, 0.001, 100)
    with pytest.raises(CertkitError, match="dataset item 0: uint8 pixels"):
        data = TensorDataset((torch.rand(2, *SHAPE) * 255).to(torch.uint8), torch.tensor([0, 1]))
        certify_dataset(smooth, data, RunPlan(n0=10, n=100), out=tmp_path / "u8.tsv", progress=False)
    with pytest.raises(CertkitError, match="not a ndarray"):
        smooth.predict(x.numpy(), 100, 0.001, 100)  # type: ignore[arg-type]
    cases = [
        (x * 255, "0-255 pixels"),
        ((x - 0.3) / 0.35, "normalized images"),
        (x.index_fill(1, torch.tensor([0]), 1.2), "a little above 1"),
    ]
    for image, cause in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            smooth.certify(image, 10, 100, 0.001, 100)
        assert [str(w.message) for w in caught if cause in str(w.message)], cause
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an image in [0, 1] warns nothing
        smooth.certify(x, 10, 100, 0.001, 100)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "smoothmix", "--alpha", "0.5"], "official --alpha is --step-size"),
        (["--method", "macer", "--num-noise-vec", "4"], "its hyperparameters: --gauss-num"),
        (["--arch", "resnet50"], "does not fit images of shape (1, 28, 28)"),
    ],
)
def test_cli_refuses_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    root = make_idx_dataset(tmp_path / "data", n_train=8, n_test=4)
    out = tmp_path / "out"
    code = main(
        ["train", "--dataset", "fashion-mnist", "--data-dir", str(root), "--out", str(out), "--device", "cpu", *args]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("certkit: error: ")
    assert not out.exists()


def test_cli_factories_for_model_and_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_byo_pkg.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        def model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))

        def data():
            x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
            y = torch.arange(20) % 3
            return TensorDataset(x, y), TensorDataset(x[:6], y[:6]), 3
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--arch",
            "my_byo_pkg:model",
            "--dataset",
            "my_byo_pkg:data",
            "--epochs",
            "1",
            "--batch-size",
            "10",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"] == "my_byo_pkg:model" and meta["dataset"] == "my_byo_pkg:data" and meta["num_classes"] == 3
    assert "test_clean_acc" in meta["metrics"]
    certkit.load(out, model=sys.modules["my_byo_pkg"].model())


def test_objective_with_only_a_loss_trains_on_the_declared_defaults() -> None:
    class Plain(Objective):
        name = "plain"

        def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            loss = nn.functional.cross_entropy(model(x), y)
            return loss, {"ce": loss.detach()}

    obj = Plain(0.25)
    assert obj.counted_modules() == {} and obj.cost_ancestors() == [] and obj.checkpoint_meta() == {}
    trainer = Trainer(
        mlp(),
        obj,
        tensors(),
        tensors(6),
        TrainConfig(epochs=1, batch_size=16),
        device="cpu",
        progress=False,
        log=lambda m: None,
    )
    assert trainer.fit()[0]["ce"] > 0 and trainer.meta["num_classes"] == 3


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"crt"}))
def test_direct_construction_takes_the_cli_defaults(name: str) -> None:
    """``Method(sigma)`` equals what ``certkit train --method NAME`` builds on its default dataset."""
    direct = METHODS[name](0.5)
    cli = build_objective(name, 0.5, "fashion-mnist")
    assert direct.hparams == cli.hparams and direct.sigma == cli.sigma


@pytest.mark.slow  # the README section end to end
def test_readme_section_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Bring your own model and data", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    summary = namespace["summary"]
    assert isinstance(summary, dict) and summary["N"] == 100 and summary["acr"] > 0
    for run in ("runs/mine", "runs/student"):
        assert json.loads((tmp_path / run / "model.json").read_text())["epochs_completed"] == 2
    assert json.loads((tmp_path / "runs/student/model.json").read_text())["teacher"]["path"] == "runs/mine"


def test_the_public_names_resolve_list_and_carry_their_types() -> None:
    lazy = certkit._LAZY  # type: ignore[attr-defined]
    assert set(certkit.__all__) == {*lazy, "__version__"}
    assert set(certkit.__all__) <= set(dir(certkit))  # tab completion lists them before first use
    for name in lazy:
        assert getattr(certkit, name) is getattr(__import__(lazy[name], fromlist=[name]), name)
    assert callable(certkit.train) and certkit.Trainer.__module__ == "certkit.train"
    assert (Path(certkit.__file__).parent / "py.typed").is_file()  # PEP 561: the hints reach your programs


def test_own_data_takes_a_dataset_familys_published_settings() -> None:
    from certkit.objectives import SmoothMix

    trainer = certkit.build_trainer(tensors(), mlp(), "smoothmix", family="cifar10", device="cpu", progress=False)
    assert trainer.objective.hparams == SmoothMix(0.25, family="cifar10").hparams
    assert trainer.config == TrainConfig.for_method("cifar10", SmoothMix)
    assert trainer.config != TrainConfig.for_method("mnist", SmoothMix)
    with pytest.raises(CertkitError, match="is of the mnist family, not 'cifar10'"):
        certkit.build_trainer("fashion-mnist", "lenet", family="cifar10", device="cpu")


def test_a_sigma_that_would_be_dropped_is_refused() -> None:
    with pytest.raises(CertkitError, match=r"sigma=0\.25 given beside a gaussian objective built with sigma=0\.5"):
        certkit.build_trainer(tensors(), mlp(), build_objective("gaussian", 0.5), sigma=0.25, device="cpu")
    with pytest.raises(CertkitError, match="method 'gloro' takes no sigma"):
        certkit.build_trainer(tensors(), mlp(), "gloro", sigma=0.25, device="cpu")
    assert (
        certkit.build_trainer(tensors(), mlp(), build_objective("gaussian", 0.5), device="cpu").objective.sigma == 0.5
    )
    assert certkit.build_trainer(tensors(), mlp(), "gaussian", device="cpu").objective.sigma == 0.25


def test_certification_mistakes_are_one_line_errors_with_nothing_written(tmp_path: Path) -> None:
    smooth, out = Smooth(mlp(), 3, 0.25), tmp_path / "c.tsv"
    wrong_shape = TensorDataset(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(CertkitError, match=r"the model does not fit images of shape \(3, 8, 8\)"):
        certify_dataset(smooth, wrong_shape, RunPlan(n0=10, n=100), out=out, progress=False)
    with pytest.raises(CertkitError, match=r"dataset item 0 has label 7, outside 0\.\.2"):
        certify_dataset(smooth, TensorDataset(torch.rand(1, *SHAPE), torch.tensor([7])), out=out, progress=False)
    with pytest.raises(CertkitError, match=r"for a DataLoader, pass loader\.dataset"):
        certify_dataset(smooth, DataLoader(tensors(4)), out=out, progress=False)  # type: ignore[arg-type]
    with pytest.raises(CertkitError, match=r"plan must be a certkit\.RunPlan, not a dict"):
        certify_dataset(smooth, tensors(4), {"n": 100}, out=out, progress=False)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())
    certify_dataset(smooth, tensors(2), RunPlan(n0=10, n=100), out=out, progress=False)  # the same out, now right
    assert len(read_results(out)) == 2


def test_training_refuses_labels_that_are_not_class_indices_and_settings_of_the_wrong_type() -> None:
    one_hot = TensorDataset(torch.rand(4, *SHAPE), torch.eye(3)[[0, 1, 2, 0]])
    with pytest.raises(CertkitError, match=r"training item 0: the label must be a class index .* shape \(3,\)"):
        certkit.build_trainer(one_hot, mlp(), "gaussian", device="cpu")
    with pytest.raises(CertkitError, match="--epochs must be an integer"):
        certkit.build_trainer(tensors(), mlp(), "gaussian", epochs="2", device="cpu")


def test_loading_into_another_module_names_the_first_tensor_that_differs(runs: dict[str, Path]) -> None:
    with pytest.raises(CertkitError, match=r"3\.weight: the file has float32 \[3, 32\], it takes float32 \[5, 32\]"):
        certkit.load(runs["gaussian"], model=mlp(5))
    with pytest.raises(CertkitError, match=r"missing 0\.bias, 0\.weight; unexpected 1\.bias, 1\.weight, 3\.bias"):
        certkit.load(runs["gaussian"], model=nn.Sequential(nn.Linear(64, 32), nn.Flatten()))
