"""Where the time goes, for the two GPU figures that trail their targets (docs/benchmarks.md, "On a GPU").

1. **A certification batch.** LeNet (random weights, as ``certify_throughput.py``), ``--inputs`` inputs
   certified with n0 = 100 and ``--n`` samples in forward batches of ``--batch``, with certkit's speed
   options; one ``certify_batch`` under ``torch.profiler``. Printed per forward batch: the wall time, the time
   the device was busy (the sum of its kernels), and the operators with the most host time. Wall time well
   above the device's busy time means the host is what the batch waits for.
2. **The first epoch of a short training run.** A LeNet trained with Gaussian noise (random images, so no
   data files are needed) for three epochs of ``--batches`` batches of 256, ``--compile`` as given: each
   epoch's wall time and, within the first, the time of its eager warm-up steps and of its captures (CUDA
   graphs; none on the CPU), so that the first epoch's surplus over the others is split into its parts.

    python benchmarks/profile_gpu.py --device cuda          # about a minute on a GPU
    python benchmarks/profile_gpu.py --device cpu --n 2000  # the same on a CPU (no captures there)

Last line: ``profile_gpu: certify <wall> ms/batch wall, <busy> ms/batch device; first epoch <±s> s (warm-up
<w> s, captures <c> s)``, where <±s> is the first epoch's time minus the mean of the other two, with its sign
(negative when the first epoch was the fastest).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from certkit import Smooth
from certkit.data import ArrayDataset, dataset_info
from certkit.models import create_model
from certkit.objectives.gaussian import Gaussian
from certkit.train import TrainConfig, Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_busy_ms(prof: Any) -> float:
    """The summed self time of the device's kernels, in ms (torch names the field by device since 2.4)."""
    # only the device's own events: in the kineto profiler a CPU operator's self device time is the time of
    # the kernels it launched, which appear again as events of their own (the table's total counts these alone)
    events = [
        e
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    if not events:
        return 0.0
    field = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return sum(getattr(e, field) for e in events) / 1e3


def profile_certification(args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_model("lenet", 10, (1, 28, 28)).to(device).eval()
    smoothed = Smooth(
        model, 10, 0.25, channels_last=args.channels_last, amp=args.amp, compile=args.compile, rng=args.rng
    )
    xs = torch.rand(args.inputs, 1, 28, 28)

    def certify(seed: int) -> None:
        gens = [smoothed.sampler.input_stream(seed, i) for i in range(args.inputs)]
        smoothed.certify_batch(xs, 100, args.n, 0.001, args.batch, gens)

    certify(1)  # warm-up: compilation, CUDA-graph recording, allocator
    sync(device)
    start = time.perf_counter()  # the wall time without the profiler's own per-operator cost
    certify(3)
    sync(device)
    unprofiled = time.perf_counter() - start
    voter, marks = smoothed.sampler.voter, []
    new_step = voter.new_step

    def counted_step() -> None:  # the samplers mark the start of every forward batch
        marks.append(1)
        new_step()

    voter.new_step = counted_step  # type: ignore[method-assign]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        certify(2)
        sync(device)
        wall = time.perf_counter() - start
    batches = len(marks)
    busy = device_busy_ms(prof) if device.type == "cuda" else float("nan")
    print(
        f"certification: {batches} forward batches of {args.batch}, wall {unprofiled * 1e3 / batches:.3f} ms/batch "
        f"({wall * 1e3 / batches:.3f} under the profiler), device busy {busy / batches:.3f} ms/batch"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return unprofiled * 1e3 / batches, busy / batches


def timed(fn: Callable[..., Any], device: torch.device, into: list[float]) -> Callable[..., Any]:
    """``fn``, adding each call's wall time to ``into`` (no synchronisation inside a capture)."""

    def wrapper(*a: Any, **k: Any) -> Any:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:
            sync(device)
        start = time.perf_counter()
        out = fn(*a, **k)
        if not capturing:
            sync(device)
        into.append(time.perf_counter() - start)
        return out

    return wrapper


def profile_training(args: argparse.Namespace, device: torch.device) -> tuple[float, float, float]:
    g = torch.Generator().manual_seed(0)
    n = args.batches * 256
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    data = ArrayDataset(dataset_info("fashion-mnist"), images, torch.randint(0, 10, (n,), generator=g))
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=3, batch_size=256, lr=0.01, compile=args.train_compile)
    model = create_model("lenet", 10, (1, 28, 28))
    # meta names the architecture: a module of unknown origin gets --compile auto's "on", not the captured step
    trainer = Trainer(
        model,
        Gaussian(0.25),
        data,
        None,
        cfg,
        device=device,
        progress=False,
        log=lambda m: None,
        meta={"arch": "lenet"},
    )
    runner = trainer.runner
    eager: list[float] = []
    captures: list[float] = []
    step = runner.step
    runner.step = timed(step, device, eager)  # every eager step, and the recording inside each capture
    if runner.capture is not None:
        runner.capture = timed(runner.capture, device, captures)
    epochs = [trainer.train_epoch(e)["seconds"] for e in range(3)]
    warmup = sum(eager[: runner.warmup]) if runner.capture is not None else 0.0  # eager runs have none
    surplus = epochs[0] - sum(epochs[1:]) / 2
    print(
        f"training ({trainer.step_mode}): epochs " + ", ".join(f"{s:.3f}" for s in epochs) + " s; in the first: "
        f"warm-up steps {warmup:.3f} s, {len(captures)} capture(s) {sum(captures):.3f} s"
    )
    return surplus, warmup, sum(captures)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--inputs", type=int, default=4)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=4000)
    p.add_argument("--amp", choices=("off", "bf16"), default="bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rng", choices=("torch", "philox"), default="philox")
    p.add_argument("--batches", type=int, default=40, help="training batches of 256 per epoch")
    p.add_argument("--train-compile", default="auto", help="the trainer's --compile")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        args.amp = "off"  # on a CPU, bf16 needs bf16 instructions (certkit/precision.py): profile it in fp32
    wall, busy = profile_certification(args, device)
    surplus, warmup, captures = profile_training(args, device)
    print(
        f"profile_gpu: certify {wall:.3f} ms/batch wall, {busy:.3f} ms/batch device; first epoch {surplus:+.3f} s "
        f"(warm-up {warmup:.3f} s, captures {captures:.3f} s)"
    )


if __name__ == "__main__":
    main()
