"""Where an fp32 LeNet training step spends its time on CPU: the floor below any trainer's step.

Five measurements, in one process with glibc's freed-memory setting:

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
4. What :class:`~certkit.models.layers.Pool2x2` (a max-pool without argmax indices where no gradient is
   taken) buys the no-grad forward passes: LeNet on a certification batch of 1,000 noisy samples, in both
   memory formats, and the CRT demo's SmallCNN teacher on a student batch of 64, against ``nn.MaxPool2d``.
5. What :class:`~certkit.models.layers.WideLinear` (LeNet's hidden layer on oneDNN's matmul instead of
   torch's BLAS) buys the training pass of (1) and LeNet's certification batch, against ``nn.Linear``.

    python benchmarks/lenet_floor.py [--sizes 64,256,1024] [--threads 2]

Last line: ``lenet_floor: <µs per noisy sample, best pass size> (<worst / best> across pass sizes)``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from certkit.allocator import keep_freed_memory
from certkit.models import create_model
from certkit.models.layers import FirstConv, Pool2x2, WideLinear, single_channel_input_gradient
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


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet", 10, (1, 28, 28)).to(memory_format=torch.channels_last)


def training_pass(model: nn.Module, pass_size: int) -> Callable[[], None]:
    """One step of the cheapest training there is on ``pass_size`` noisy samples."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(pass_size, 1, 28, 28), torch.randint(0, 10, (pass_size,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x + SIGMA * torch.randn_like(x)), y).backward()
        opt.step()

    return step


def step_seconds_per_sample(pass_size: int) -> float:
    return best_seconds(training_pass(lenet(), pass_size), reps=max(4, 4096 // pass_size)) / pass_size


def plain_linear(layer: nn.Module) -> nn.Module:
    assert isinstance(layer, nn.Linear)
    plain = nn.Linear(layer.in_features, layer.out_features)
    plain.load_state_dict(layer.state_dict())
    return plain


def wide_linear_passes(pass_size: int, rounds: int = 4) -> list[float]:
    """Seconds per noisy sample of the training pass with certkit's :class:`WideLinear` hidden layer and with
    ``nn.Linear`` (torch's BLAS), the same weights."""
    ours = lenet()
    plain = swap_modules(copy.deepcopy(ours), WideLinear, plain_linear)
    steps = [training_pass(model, pass_size) for model in (ours, plain)]
    return [t / pass_size for t in interleaved_best(steps, rounds, reps=max(4, 2048 // pass_size))]


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


def swap_modules(model: nn.Module, kind: type[nn.Module], plain: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``model`` with each module of exactly type ``kind`` replaced by ``plain(it)`` (the same parameters)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is kind:
                setattr(parent, name, plain(child))
    return model


def plain_conv(conv: nn.Module) -> nn.Module:
    assert isinstance(conv, nn.Conv2d)
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    plain.load_state_dict(conv.state_dict())
    return plain.to(memory_format=torch.channels_last)


def interleaved_best(fns: list[Callable[[], object]], rounds: int, reps: int) -> list[float]:
    """Best seconds per call of each function, the functions taking turns round by round."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], best_seconds(fn, reps, rounds=1))
    return best


def attack_steps(objective: Objective, rounds: int = 4, reps: int = 10) -> list[float]:
    """Seconds per step with certkit's LeNet and with a plain first convolution."""
    ours = lenet()
    plain = swap_modules(copy.deepcopy(ours), FirstConv, plain_conv)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    steps = []
    for model in (ours, plain):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            objective(model, x, y)[0].backward()
            opt.step()

        steps.append(step)
    return interleaved_best(steps, rounds, reps)


def inference_passes(
    arch: str,
    batch: int,
    memory_format: torch.memory_format,
    kind: type[nn.Module],
    plain_module: Callable[[nn.Module], nn.Module],
    rounds: int = 4,
) -> list[float]:
    """Seconds per noisy no-grad forward pass (a certification batch, a CRT teacher's) with certkit's layers
    and with each ``kind`` swapped for torch's own module (``plain_module``)."""
    torch.manual_seed(0)
    ours = create_model(arch, 10, (1, 28, 28)).to(memory_format=memory_format).eval()
    plain = swap_modules(copy.deepcopy(ours), kind, plain_module)
    x = torch.rand(batch, 1, 28, 28)

    def forward(model: nn.Module) -> Callable[[], object]:
        @torch.no_grad()
        def run() -> object:
            return model(x + SIGMA * torch.randn_like(x))

        return run

    return interleaved_best([forward(ours), forward(plain)], rounds, reps=max(4, 4096 // batch))


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
    cl, contiguous = torch.channels_last, torch.contiguous_format
    for arch, batch, fmt, kind, plain_module in (
        ("lenet", 1000, cl, Pool2x2, lambda _: nn.MaxPool2d(2)),
        ("lenet", 1000, contiguous, Pool2x2, lambda _: nn.MaxPool2d(2)),
        ("smallcnn", 64, cl, Pool2x2, lambda _: nn.MaxPool2d(2)),
        ("lenet", 1000, cl, WideLinear, plain_linear),
    ):
        ours, plain = inference_passes(arch, batch, fmt, kind, plain_module)
        layout = "channels-last" if fmt is cl else "contiguous"
        torchs = "nn.MaxPool2d" if kind is Pool2x2 else "nn.Linear"
        print(
            f"{arch} no-grad forward, {batch} noisy samples, {layout}: {ours * 1e3:.2f} ms with {kind.__name__}, "
            f"{plain * 1e3:.2f} ms with {torchs} ({ours / plain:.2f}x)"
        )
    for size in (64, 256):
        ours, plain = wide_linear_passes(size)
        print(
            f"training pass, {size} noisy samples: {ours * 1e6:.1f} µs per sample with WideLinear, "
            f"{plain * 1e6:.1f} µs with nn.Linear ({ours / plain:.2f}x)"
        )
    best, worst = min(per_sample.values()), max(per_sample.values())
    print(f"lenet_floor: {best * 1e6:.1f} us/sample ({worst / best:.2f}x worst / best across pass sizes)")


if __name__ == "__main__":
    main()
