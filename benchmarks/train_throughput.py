"""Training throughput of certkit's trainer against the usual PyTorch loop, Gaussian-noise training.

The baseline is what the public randomized-smoothing code does: a ``DataLoader`` over a dataset that turns
each image into a tensor one at a time (for CIFAR-10 through PIL with ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip``), then noise, forward, backward, step. certkit keeps the whole dataset as one uint8
tensor on the training device, augments whole batches, and logs without per-step synchronisation.

Both sides train the same architecture from the same initial weights, stored in the same memory format:
``--channels-last`` (default auto: channels-last for a network with 2-d convolutions, as ``certkit train``
does) applies to the baseline's model as to certkit's, so the ratio is not a layout effect; run the script
with ``--channels-last on`` and ``off`` to see that effect on its own. On CUDA certkit's step is what
``--compile auto`` picks (a captured CUDA graph), the baseline's eager.

Timing: one epoch of each side per round, in a fresh model; a first round is warm-up (allocator, oneDNN
primitives, first-use costs of the process) and dropped; then ``--rounds`` rounds, the order of the two
sides flipping each round. A side's rate is the median of its rounds; the ratio is the median of the rounds'
ratios (each round's two epochs follow each other), printed with the lowest and highest single-round ratio.

    python benchmarks/train_throughput.py [--device cuda] [--images 6000] [--rounds 3] [--channels-last off]

Last line: ``train_throughput: <certkit images/s on resnet20> (<ratio>x vs DataLoader loop, median of <R>
interleaved rounds, <layout>)``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from certkit.allocator import keep_freed_memory
from certkit.data import DATASETS, ArrayDataset
from certkit.models import create_model
from certkit.objectives.gaussian import Gaussian
from certkit.train import TrainConfig, Trainer, select_device, use_channels_last

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


def baseline(
    model: torch.nn.Module, data: PerImageDataset, batch: int, device: torch.device, layout: str = "auto"
) -> float:
    """Images per second of the plain loop over one epoch, the model stored as certkit's trainer stores it
    under ``channels_last=layout`` (the inputs stay as the loader makes them, as in the trainer)."""
    if use_channels_last(layout, model):
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=0, drop_last=False)
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
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


def certkit_rate(
    model: torch.nn.Module, data: ArrayDataset, batch: int, device: torch.device, layout: str = "auto"
) -> float:
    """Images per second of certkit's trainer over one epoch (the images it trained: a captured step drops the
    last, partial batch)."""
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, schedule="constant", channels_last=layout)
    trainer = Trainer(model, Gaussian(SIGMA), data, None, cfg, device=device, progress=False, log=lambda m: None)
    trainer.fit()
    epoch = trainer.ledger.epochs[-1]
    return float(epoch["forward"]) / epoch["seconds"]


def measure(
    arch: str, dataset: str, images: int, batch: int, device: torch.device, rounds: int, layout: str
) -> tuple[list[float], list[float]]:
    """Each side's images per second in each timed round (the warm-up round left out)."""
    info = DATASETS[dataset]
    c, h, w = info.in_shape
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(images, h, w, c), dtype=np.uint8)
    labels = rng.integers(0, info.num_classes, size=images)
    augment = dataset == "cifar10"
    arrays = ArrayDataset(
        info, torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), augment=augment
    ).to(device)
    per_image = PerImageDataset(pixels.squeeze(-1) if c == 1 else pixels, labels, augment)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model(arch, info.num_classes, info.in_shape, info.mean, info.std).to(device)

    sides = {
        "baseline": lambda: baseline(fresh(), per_image, batch, device, layout),
        "certkit": lambda: certkit_rate(fresh(), arrays, batch, device, layout),
    }
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for r in range(rounds + 1):  # round 0 is warm-up
        for side in ("baseline", "certkit") if r % 2 else ("certkit", "baseline"):
            rate = sides[side]()
            if r:
                rates[side].append(rate)
    return rates["baseline"], rates["certkit"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=6000, help="images per measured epoch (synthetic, real shapes)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of one epoch per side, after a warm-up round")
    p.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="memory format of both sides' models (auto: channels-last for 2-d convolutions, as certkit train)",
    )
    a = p.parse_args()
    if a.rounds < 1 or a.images < 3 or a.batch < 1:
        p.error("--rounds and --batch must be >= 1 and --images >= 3 (ResNet-20 trains on a third of them)")
    keep_freed_memory()  # as the CLI does, for both loops
    device = select_device(a.device)
    print(
        f"device: {device}, {torch.get_num_threads()} threads, batch {a.batch}, {a.images} images per LeNet "
        f"epoch ({a.images // 3} for ResNet-20), one warm-up and {a.rounds} timed round(s) per model, both sides "
        f"--channels-last {a.channels_last}"
    )
    print("| model | dataset shape | layout | DataLoader loop img/s | certkit img/s | ratio (rounds) |")
    print("|---|---|---|---|---|---|")
    last = (0.0, 0.0)
    layout = ""
    for arch, dataset, images in (("lenet", "fashion-mnist", a.images), ("resnet20", "cifar10", a.images // 3)):
        base, ours = measure(arch, dataset, images, a.batch, device, a.rounds, a.channels_last)
        ratios = [o / b for o, b in zip(ours, base)]
        info = DATASETS[dataset]
        probe = create_model(arch, info.num_classes, info.in_shape, info.mean, info.std)
        layout = "channels-last" if use_channels_last(a.channels_last, probe) else "contiguous"
        last = (statistics.median(ours), statistics.median(ratios))
        print(
            f"| {arch} | {dataset} | {layout} | {statistics.median(base):.0f} | {last[0]:.0f} | {last[1]:.2f}x "
            f"({min(ratios):.2f}–{max(ratios):.2f}x) |",
            flush=True,
        )
    print(
        f"train_throughput: {last[0]:.0f} img/s resnet20 ({last[1]:.2f}x vs DataLoader loop, median of "
        f"{a.rounds} interleaved round(s), both {layout})"
    )


if __name__ == "__main__":
    main()
