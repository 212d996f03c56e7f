"""The fast training step: compiled, channels-last and without per-step host synchronisation, it trains the
same weights as the plain eager step; bf16 autocast is refused on CPU."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from certkit.data import ArrayDataset, dataset_info
from certkit.errors import CertkitError
from certkit.methods import build_objective, get_objective, list_objectives
from certkit.models import create_model
from certkit.train import TrainConfig, Trainer, own_networks, step_mode

SHAPE = (1, 28, 28)


def data(n: int, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    return ArrayDataset(dataset_info("mnist"), images, torch.randint(0, 10, (n,), generator=g))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 16), nn.ReLU(), nn.Linear(16, 10))


def objective(method: str) -> Any:
    """``method`` with its published defaults; MACER's robustness term on from the first epoch."""
    teacher = mlp() if method == "crt" else None
    hparams = {"deferred_epochs": 0} if method == "macer" else None
    return build_objective(method, None if method == "gloro" else 0.25, "mnist", hparams, teacher, None, 10)


def trainer(method: str, model: nn.Module, n: int = 32, device: str = "cpu", **settings: Any) -> Trainer:
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 16, "lr": 0.05, "seed": 3, **settings})
    return Trainer(model, objective(method), data(n), None, cfg, device=device, progress=False, log=lambda m: None)


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


@pytest.mark.slow  # a real torch.compile (inductor's C++ build on CPU; far slower with a cold cache)
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


@pytest.mark.parametrize("method", [m for m in list_objectives() if m != "gloro"])
def test_bf16_autocast_trains_on_a_cpu_with_bf16_instructions(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step runs in bf16 (its weights move differently from fp32's), the weights stay fp32, and the
    loss is fp32's up to bf16 rounding; a CPU without bf16 instructions gets a one-line refusal."""
    monkeypatch.setattr("certkit.precision.cpu_has_native_bf16", lambda: False)
    with pytest.raises(CertkitError, match="--amp bf16 on CPU needs bfloat16 instructions"):
        trainer(method, mlp(), amp="bf16")
    monkeypatch.setattr("certkit.precision.cpu_has_native_bf16", lambda: True)
    full, half = trainer(method, mlp()), trainer(method, mlp(), amp="bf16")
    first, second = full.train_epoch(0), half.train_epoch(0)
    assert second["loss"] == pytest.approx(first["loss"], rel=0.02, abs=1e-4)  # CRT: a student at its teacher, ~0
    moved = [not torch.equal(a, b) for a, b in zip(weights(full).values(), weights(half).values())]
    assert all(v.dtype == torch.float32 for v in weights(half).values()) and all(moved)


def test_unknown_compile_mode_is_refused() -> None:
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


# --- captured steps (certkit.stepgraph) ------------------------------------------------------------------
GRAPH_SAFE = [m for m in list_objectives() if get_objective(m).graph_safe]


class RollbackCapture:
    """A CPU stand-in for ``cuda_graph`` with a real capture's semantics: capturing runs the step's Python
    (its hooks count once) but changes no state -- weights, optimizer state, sums and RNG are put back --
    and a replay does the step's work without running its hooks."""

    def __init__(self, t: Trainer) -> None:
        self.t = t
        self.captures = 0

    def __call__(self, fn: Any) -> Any:
        t = self.t
        saved = (
            copy.deepcopy(t.model.state_dict()),
            copy.deepcopy(t.optimizer.state_dict()),
            {k: v.clone() for k, v in t.runner.totals.items()},
            torch.get_rng_state(),
        )
        fn()
        t.model.load_state_dict(saved[0])
        t.optimizer.load_state_dict(saved[1])
        for k, v in saved[2].items():
            t.runner.totals[k].copy_(v)
        torch.set_rng_state(saved[3])
        self.captures += 1

        def replay() -> None:
            counted = [c.pop() for c in t.counters]
            fn()
            for c, n in zip(t.counters, counted):
                c.pop()
                c.add(n)

        return replay


def captured(method: str, n: int = 64, **settings: Any) -> tuple[Trainer, RollbackCapture]:
    t = trainer(method, mlp(), n=n, compile="off", **settings)
    capture = RollbackCapture(t)
    t.runner.capture = capture  # the runner of --compile graph, with the stand-in for the CUDA capture
    return t, capture


@pytest.mark.parametrize("method", GRAPH_SAFE)
def test_a_captured_step_trains_the_eager_weights_and_counts_every_pass(method: str) -> None:
    """Warm-up steps, one capture per epoch and shape, replays: the same weights, sums and ledger as eager."""
    eager = trainer(method, mlp(), n=64, compile="off", epochs=2)
    graph, capture = captured(method, epochs=2)
    for epoch in range(2):
        first, second = eager.train_epoch(epoch), graph.train_epoch(epoch)
        assert second == pytest.approx({**first, "seconds": second["seconds"]}, rel=1e-5, abs=1e-7)
        assert eager.ledger.epochs[epoch] == {
            **graph.ledger.epochs[epoch],
            "seconds": eager.ledger.epochs[epoch]["seconds"],
        }
    chunks = get_objective(method)(0.25).num_chunks if method != "crt" else 1
    assert graph.runner.steps == eager.ledger.epochs[1]["steps"] == 4 * chunks
    # every chunk has one shape: one capture, and one more per change of the numbers a step bakes in (the
    # warm-up weights of SmoothMix and Consistency change between the two epochs; nothing else does)
    assert capture.captures == (2 if method in ("smoothmix", "consistency") else 1)
    assert graph.step_mode == "off" and graph.runner.eager_steps == 3  # then replays only
    for (k, a), b in zip(weights(eager).items(), weights(graph).values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), k


def test_each_batch_shape_gets_its_own_capture() -> None:
    """40 images in batches of 16 without dropping the last: shapes 16 and 8, two captures an epoch."""
    graph, capture = captured("gaussian", n=40)
    eager = trainer("gaussian", mlp(), n=40, compile="off")
    graph.runner.warmup = 1
    first, second = eager.train_epoch(0), graph.train_epoch(0)
    assert capture.captures == 2 and graph.ledger.epochs[0]["forward"] == 40
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-5)


def test_auto_captures_only_certkit_architectures() -> None:
    lenet = create_model("lenet", 10, SHAPE)
    assert own_networks({"arch": "lenet"}, objective("gaussian"))
    assert not own_networks({"arch": "custom:Sequential"}, objective("gaussian"))
    crt = build_objective("crt", 0.25, "mnist", None, lenet, None, 10)  # its teacher: a module, not a run
    assert not own_networks({"arch": "lenet"}, crt)


def test_a_new_learning_rate_is_a_new_capture() -> None:
    eager = trainer("gaussian", mlp(), n=64, compile="off", epochs=3, lr_step=2)
    graph, capture = captured("gaussian", epochs=3, lr_step=2)
    for epoch in range(3):
        eager.train_epoch(epoch), graph.train_epoch(epoch)
    assert capture.captures == 2  # lr 0.05 for two epochs, then 0.005
    for (k, a), b in zip(weights(eager).items(), weights(graph).values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), k


def test_fit_drops_its_captures_before_moving_the_weights() -> None:
    """fit() ends by putting the weights back in the contiguous layout: new tensors, so a capture of the old
    ones must never be replayed again."""
    graph, capture = captured("gaussian", epochs=1)
    graph.fit()
    assert capture.captures == 1
    graph.train_epoch(1)
    assert capture.captures == 2


def test_step_mode_captures_on_cuda_only_what_it_can() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert step_mode("auto", cuda, objective("smoothmix"), 1) == "graph"
    assert step_mode("auto", cuda, objective("smoothadv"), 1) == "on"  # decides on the host
    assert step_mode("auto", cuda, objective("gaussian"), 2) == "on"  # torchrun: DDP's collectives
    assert step_mode("auto", cpu, objective("gaussian"), 1) == "off"
    assert step_mode("off", cuda, objective("gaussian"), 1) == "off"
    assert step_mode("auto", cuda, objective("gaussian"), 1, known_networks=False) == "on"  # a user's module
    assert step_mode("graph", cuda, objective("gaussian"), 1, known_networks=False) == "graph"  # when asked
    with pytest.raises(CertkitError, match="--compile graph: the smoothadv step decides on the host"):
        step_mode("graph", cuda, objective("smoothadv"), 1)
    with pytest.raises(CertkitError, match="--compile graph: CUDA graphs need a CUDA device"):
        trainer("gaussian", mlp(), compile="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("method", GRAPH_SAFE)
def test_a_cuda_graph_step_trains_the_eager_weights(method: str) -> None:
    """The real capture on a GPU: the same data order and RNG stream (graph-safe Philox offsets), so the
    same weights as the eager step, up to the order of floating-point sums."""

    def run(mode: str) -> Trainer:
        t = trainer(method, mlp(), n=96, device="cuda", compile=mode, epochs=2)
        t.fit()
        return t

    eager, graph = run("off"), run("graph")
    assert graph.step_mode == "graph"
    assert graph.history[-1]["loss"] == pytest.approx(eager.history[-1]["loss"], rel=1e-3)
    for (k, a), b in zip(weights(eager).items(), weights(graph).values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), k
