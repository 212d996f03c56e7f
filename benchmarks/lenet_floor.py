"""Where an fp32 LeNet training step spends its time on CPU: the floor below any trainer's step.

Three measurements, in one process with glibc's freed-memory setting:

1. The cheapest training pass there is (noise, forward, cross-entropy, backward, SGD step; channels-last, the
   ReLU after the pool as certkit's LeNet) timed per noisy sample at several pass sizes. A method that trains
   on k noisy copies per image cannot train below k times this per image, whatever its trainer does; it is
   the floor ``vs_official.py`` compares the official code's seconds with.
2. The input gradient of the first convolution (one input channel), which every attack step of SmoothAdv and
   SmoothMix needs: oneDNN's ``convolution_backward`` against certkit's
   :func:`~certkit.models.layers.single_channel_input_gradient` (one batched matrix product and k² shifted
   additions; what LeNet's first layer uses in attacks on CPU; equal up to rounding, printed).
3. What that buys a whole step: SmoothMix and SmoothAdv steps (64 images, the Fashion-MNIST defaults at
   σ = 0.25) of certkit's LeNet against the same weights with a plain ``nn.Conv2d`` first, interleaved.

    python benchmarks/lenet_floor.py [--sizes 64,256,1024] [--threads 2]

Last line: ``lenet_floor: <µs per noisy sample, best pass size> (<worst / best> across pass sizes)``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from certkit.allocator import keep_freed_memory
from certkit.models import create_model
from certkit.models.layers import FirstConv, single_channel_input_gradient
from certkit.objectives import Objective, SmoothAdv, SmoothMix

SIGMA = 0.25


def best_seconds(fn: Callable[[], object], reps: int, rounds: int = 3) -> float:
    """Fastest mean time of ``reps`` calls over ``rounds`` rounds, after a warm-up (the machine is shared)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def step_seconds_per_sample(pass_size: int) -> float:
    torch.manual_seed(0)
    model = create_model("lenet", 10, (1, 28, 28)).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(pass_size, 1, 28, 28), torch.randint(0, 10, (pass_size,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x + SIGMA * torch.randn_like(x)), y).backward()
        opt.step()

    return best_seconds(step, reps=max(4, 4096 // pass_size)) / pass_size


def first_conv_input_gradient(pass_size: int) -> tuple[float, float, float]:
    """(oneDNN seconds, shifted-sum seconds, largest difference) for LeNet's first convolution."""
    model = create_model("lenet", 10, (1, 28, 28)).to(memory_format=torch.channels_last)
    weight = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).weight.detach()
    x = torch.rand(pass_size, 1, 28, 28)
    grad_out = torch.randn(pass_size, 20, 24, 24).contiguous(memory_format=torch.channels_last)

    def onednn() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, [20], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
        )[0]

    diff = float((onednn() - single_channel_input_gradient(grad_out, weight, 0)).abs().max())
    return best_seconds(onednn, 10), best_seconds(lambda: single_channel_input_gradient(grad_out, weight, 0), 10), diff


def with_plain_first_conv(model: nn.Module) -> nn.Module:
    """``model`` with each :class:`FirstConv` swapped for an ``nn.Conv2d`` holding the same parameters."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is FirstConv:
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, padding=child.padding)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain.to(memory_format=torch.channels_last))
    return model


def attack_steps(objective: Objective, rounds: int = 4, reps: int = 10) -> tuple[float, float]:
    """Seconds per step (best round) with certkit's LeNet and with a plain first convolution, interleaved."""
    torch.manual_seed(0)
    ours = create_model("lenet", 10, (1, 28, 28)).to(memory_format=torch.channels_last)
    plain = with_plain_first_conv(create_model("lenet", 10, (1, 28, 28)).to(memory_format=torch.channels_last))
    plain.load_state_dict(ours.state_dict())
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    steps = []
    for model in (ours, plain):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            objective(model, x, y)[0].backward()
            opt.step()

        steps.append(step)
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, step in enumerate(steps):
            best[i] = min(best[i], best_seconds(step, reps, rounds=1))
    return best[0], best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,128,256,512,1024", help="pass sizes (noisy samples per pass)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    per_sample = {}
    for size in (int(s) for s in a.sizes.split(",")):
        per_sample[size] = step_seconds_per_sample(size)
        print(f"pass {size:5d}: {per_sample[size] * 1e6:6.1f} µs per noisy sample (noise, forward, backward, step)")
    onednn, shifted, diff = first_conv_input_gradient(256)
    print(
        f"first convolution's input gradient, 256 samples: oneDNN {onednn * 1e3:.2f} ms, batched product + "
        f"shifted sums {shifted * 1e3:.2f} ms ({shifted / onednn:.2f}x; largest difference {diff:.1e})"
    )
    for objective in (SmoothMix(sigma=SIGMA), SmoothAdv(sigma=SIGMA)):
        ours, plain = attack_steps(objective)
        print(
            f"{objective.name} step, 64 images: {ours * 1e3:.1f} ms with FirstConv, {plain * 1e3:.1f} ms with a plain "
            f"first convolution ({ours / plain:.2f}x)"
        )
    best, worst = min(per_sample.values()), max(per_sample.values())
    print(f"lenet_floor: {best * 1e6:.1f} us/sample ({worst / best:.2f}x worst / best across pass sizes)")


if __name__ == "__main__":
    main()
