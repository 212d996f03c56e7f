"""Shared fixtures: the real Fashion-MNIST files. Helpers that tests import live in ``helpers.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One CPU thread for a module of tiny models, then the count restored: they gain nothing from a second
    thread, and on a machine shared with other jobs an OpenMP op waits for its descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
