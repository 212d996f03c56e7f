"""Shared fixtures: the real Fashion-MNIST files, and writers of small files in the real dataset formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from certkit.data import FASHION_MNIST_ROOT

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    """The Fashion-MNIST folder. Missing files fail the test under CI (they are part of the set-up) and skip it
    elsewhere, so a developer without the Debian package still runs the rest."""
    root = Path(FASHION_MNIST_ROOT)
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        msg = f"Fashion-MNIST missing from {root}: install the Debian package dataset-fashion-mnist (make test does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root


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
