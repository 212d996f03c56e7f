"""The fast training step: compiled, channels-last and without per-step host synchronisation, it trains the
same weights as the plain eager step; bf16 autocast is refused on CPU."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from certkit.data import ArrayDataset, dataset_info
from certkit.errors import CertkitError
from certkit.methods import build_objective, list_objectives
from certkit.models import create_model
from certkit.train import TrainConfig, Trainer

SHAPE = (1, 28, 28)


def data(n: int, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    return ArrayDataset(dataset_info("mnist"), images, torch.randint(0, 10, (n,), generator=g))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), nn.ReLU(), nn.Linear(16, 10))


def objective(method: str) -> Any:
    teacher = mlp() if method == "crt" else None
    return build_objective(method, None if method == "gloro" else 0.25, "mnist", None, teacher, None, 10)


def trainer(method: str, model: nn.Module, n: int = 32, **settings: Any) -> Trainer:
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=3, **settings)
    return Trainer(model, objective(method), data(n), None, cfg, device="cpu", progress=False, log=lambda m: None)


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", list_objectives())
def test_compiled_step_trains_the_eager_weights(method: str) -> None:
    eager = trainer(method, mlp(), compile="off")
    compiled = trainer(method, mlp(), compile="on")
    assert compiled.compiled and not eager.compiled
    first, second = eager.train_epoch(0), compiled.train_epoch(0)
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-4, abs=1e-6)
    assert eager.ledger.epochs[0]["steps"] == compiled.ledger.epochs[0]["steps"] > 1
    assert eager.ledger.epochs[0]["forward"] == compiled.ledger.epochs[0]["forward"]
    for (k, a), b in zip(weights(eager).items(), weights(compiled).values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k


def test_compiled_step_drops_the_last_partial_batch() -> None:
    """Fixed shapes: 40 images in batches of 16 are two compiled steps (the eager step also takes the 8)."""
    eager = trainer("gaussian", mlp(), n=40, compile="off")
    eager.train_epoch(0)
    assert eager.ledger.epochs[0]["steps"] == 3 and eager.ledger.epochs[0]["forward"] == 40
    compiled = trainer("gaussian", mlp(), n=40, compile="on")
    compiled.train_epoch(0)
    assert compiled.ledger.epochs[0]["steps"] == 2 and compiled.ledger.epochs[0]["forward"] == 32


@pytest.mark.parametrize("method", ["gaussian", "smoothmix"])
def test_channels_last_trains_the_same_weights_from_the_same_noise(method: str) -> None:
    def lenet() -> nn.Module:
        torch.manual_seed(0)
        return create_model("lenet", 10, SHAPE)

    plain = trainer(method, lenet(), channels_last="off")
    fast = trainer(method, lenet(), channels_last="auto")  # auto: on for a network with 2-d convolutions
    conv = [m for m in fast.model.modules() if isinstance(m, nn.Conv2d)][-1]  # 20 input channels
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    first, second = plain.train_epoch(0), fast.train_epoch(0)
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-4)
    for (k, a), b in zip(weights(plain).items(), weights(fast).values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k


def test_bf16_autocast_is_refused_on_cpu() -> None:
    with pytest.raises(CertkitError, match="--amp bf16 is for CUDA training"):
        trainer("gaussian", mlp(), amp="bf16")
    with pytest.raises(CertkitError, match="--compile"):
        TrainConfig(compile="always")


def test_a_nan_loss_stops_the_epoch_before_anything_is_saved(tmp_path: Any) -> None:
    """The finite check runs once per epoch on the summed loss: one NaN step is enough to stop the run."""
    model = mlp()
    with torch.no_grad():
        model[3].bias[0] = float("nan")
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05)
    t = Trainer(
        model,
        objective("gaussian"),
        data(32),
        None,
        cfg,
        out_dir=tmp_path / "run",
        device="cpu",
        progress=False,
        log=lambda m: None,
    )
    with pytest.raises(CertkitError, match="training diverged at epoch 1"):
        t.fit()
    assert not (tmp_path / "run" / "model.json").exists()
