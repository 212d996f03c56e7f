"""Training throughput of certkit's trainer against the usual PyTorch loop, Gaussian-noise training.

The baseline is what the public randomized-smoothing code does: a ``DataLoader`` over a dataset that turns
each image into a tensor one at a time (for CIFAR-10 through PIL with ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip``), then noise, forward, backward, step. certkit keeps the whole dataset as one uint8
tensor on the training device, augments whole batches, and logs without per-step synchronisation.

    python benchmarks/train_throughput.py [--device cuda] [--images 6000]

Last line: ``train_throughput: <certkit images/s on resnet20> (<ratio>x vs DataLoader loop)``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from certkit.allocator import keep_freed_memory
from certkit.data import DATASETS, ArrayDataset
from certkit.models import create_model
from certkit.objectives.gaussian import Gaussian
from certkit.train import TrainConfig, Trainer, select_device

SIGMA = 0.25


class PerImageDataset(Dataset):
    """torchvision-style: uint8 HWC images, converted (and for CIFAR augmented) one image at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool) -> None:
        from torchvision import transforms

        self.images, self.labels = images, labels
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
        self.transform = transforms.Compose([transforms.ToPILImage(), *steps, transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def baseline(model: torch.nn.Module, data: PerImageDataset, batch: int, device: torch.device) -> float:
    """Images per second of the plain loop over one epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=0, drop_last=False)
    model.train()
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x + torch.randn_like(x) * SIGMA), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def certkit_rate(model: torch.nn.Module, data: ArrayDataset, batch: int, device: torch.device) -> float:
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, schedule="constant")
    trainer = Trainer(model, Gaussian(SIGMA), data, None, cfg, device=device, progress=False, log=lambda m: None)
    trainer.fit()
    return len(data) / trainer.ledger.seconds


def measure(arch: str, dataset: str, images: int, batch: int, device: torch.device) -> tuple[float, float]:
    info = DATASETS[dataset]
    c, h, w = info.in_shape
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(images, h, w, c), dtype=np.uint8)
    labels = rng.integers(0, info.num_classes, size=images)
    augment = dataset == "cifar10"
    arrays = ArrayDataset(
        info, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), augment=augment
    ).to(device)
    rates = []
    for run in ("baseline", "certkit"):
        torch.manual_seed(0)
        model = create_model(arch, info.num_classes, info.in_shape, info.mean, info.std).to(device)
        if run == "baseline":
            rates.append(
                baseline(
                    model, PerImageDataset(pixels.squeeze(-1) if c == 1 else pixels, labels, augment), batch, device
                )
            )
        else:
            rates.append(certkit_rate(model, arrays, batch, device))
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=6000, help="images per measured epoch (synthetic, real shapes)")
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args()
    keep_freed_memory()  # as the CLI does, for both loops
    device = select_device(a.device)
    print(f"device: {device}, {torch.get_num_threads()} threads, batch {a.batch}, {a.images} images per epoch")
    print("| model | dataset shape | DataLoader loop img/s | certkit img/s | ratio |")
    print("|---|---|---|---|---|")
    last = (0.0, 0.0)
    for arch, dataset, images in (("lenet", "fashion-mnist", a.images), ("resnet20", "cifar10", a.images // 3)):
        base, ours = measure(arch, dataset, images, a.batch, device)
        print(f"| {arch} | {dataset} | {base:.0f} | {ours:.0f} | {ours / base:.2f}x |", flush=True)
        last = (base, ours)
    print(f"train_throughput: {last[1]:.0f} img/s resnet20 ({last[1] / last[0]:.2f}x vs DataLoader loop)")


if __name__ == "__main__":
    main()
