"""Helpers that tests import: writers of small files in the real dataset formats, and a classifier whose
smoothed version is known in closed form. Fixtures stay in ``conftest.py``, which tests never import."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import pickle
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from certkit import ABSTAIN, checkpoint
from certkit.data import ArrayDataset, dataset_info
from certkit.models import create_model
from certkit.objectives import Objective
from certkit.train import TrainConfig, Trainer

# --- dataset files ------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_idx_dataset(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """A tiny MNIST-format dataset (gzipped IDX) with random images and labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return root


def make_cifar_dataset(root: Path, per_batch: int = 8, seed: int = 0) -> Path:
    """A tiny ``cifar-10-batches-py`` folder in the real (pickled dict) format."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return root


# --- in-memory datasets -------------------------------------------------------------------------------------


def tiny_data(n: int = 64, seed: int = 0) -> ArrayDataset:
    """A learnable synthetic MNIST-shaped set: the class is encoded as a bright block."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, 2 * y : 2 * y + 6, 4:24] = 250
    return ArrayDataset(dataset_info("mnist"), images, labels)


# --- command lines -------------------------------------------------------------------------------------------


def train_argv(data_dir: str | Path, *switches: str, epochs: int = 1, **flags: object) -> list[str]:
    """``certkit train`` arguments for a short run on the test data in ``data_dir``: one epoch unless told,
    on the CPU unless told (the expectations, bit-for-bit resumption among them, are the CPU's, also where a
    GPU is visible), each keyword as ``--its-name value`` in the order given, then ``switches`` as they are,
    so that a test spells only what sets its run apart."""
    argv = ["train", "--data-dir", str(data_dir), "--epochs", str(epochs), "--device", "cpu"]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return [*argv, *switches]


# --- a closed-form smoothed classifier -----------------------------------------------------------------------


class HalfSpace(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0, as two logits: the smoothed classifier is known in closed form.

    P(f(x + eta) = 1) = Phi((w.x + b) / (sigma ||w||)), and the true robust radius of g at x is the
    distance to the hyperplane, |w.x + b| / ||w||.
    """

    def __init__(self, w: list[float], b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w), requires_grad=False)
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], dim=1)


def halfspace_input(p_class1: float, sigma: float, w: list[float]) -> tuple[torch.Tensor, float]:
    """An input (1, 1, d) at which the smoothed probability of class 1 is ``p_class1``; also its true radius."""
    w_norm = float(np.linalg.norm(w))
    margin = norm.ppf(p_class1) * sigma  # signed distance to the hyperplane
    x = torch.tensor(w, dtype=torch.float32) / w_norm * margin
    return x.view(1, 1, -1), abs(margin)


def false_certificates(certs, true_class: int, true_radius: float) -> int:
    return sum(1 for c in certs if c.prediction != ABSTAIN and (c.prediction != true_class or c.radius > true_radius))


@contextlib.contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as a module, with ``benchmarks/`` on ``sys.path`` as when the script
    runs (so it can import its sibling scripts); the path and the scripts' modules are removed afterwards
    (certkit's own modules stay: re-importing them would make a second ``CertkitError`` class)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # a dataclass in it looks its module up while being built
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(folder))
        for key, module in list(sys.modules.items()):
            if Path(getattr(module, "__file__", None) or "/").parent == folder or key == name:
                del sys.modules[key]


def quiet_trainer(
    arch: str,
    in_shape: tuple[int, ...],
    objective: Objective,
    train: Any,
    test: Any,
    cfg: TrainConfig,
    out: Any,
    normalization: tuple[Any, Any] = (None, None),
) -> Trainer:
    """A CPU trainer of certkit's ``arch`` (10 classes, input layer ``normalization`` = (mean, std)) that
    prints nothing, for the tests' small runs; the caller seeds the initial weights."""
    model = create_model(arch, 10, in_shape, *normalization)
    meta = checkpoint.make_meta(arch, "mnist", 0.25, "gaussian")
    return Trainer(
        model, objective, train, test, cfg, out_dir=out, meta=meta, device="cpu", progress=False, log=lambda m: None
    )
