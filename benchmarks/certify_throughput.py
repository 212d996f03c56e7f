"""Certification throughput: certkit's batched engine against a one-input-at-a-time loop in the style of the
reference implementation, and against the bare forward pass of the same network.

All three use the same model, the same n0, n and batch size, and count noisy samples per second (n0 + n per
input for the certifiers):

* **reference loop** -- CERTIFY as ``locuslab/smoothing`` ``code/core.py`` runs it: one input at a time under
  ``torch.no_grad``; the n0 selection samples and then the n estimation samples are drawn in chunks of at
  most ``batch`` copies (``x.repeat`` plus ``randn_like`` noise), each chunk's argmax votes are copied to the
  host and counted there. Written here from the paper's pseudocode, not imported.
* **certkit** -- :meth:`certkit.Smooth.certify_batch` on groups of inputs exactly as
  :func:`certkit.certify_dataset` forms them (:meth:`certkit.RunPlan.group_size`: the n0 copies of several
  inputs share one forward batch), per-input seeded noise written into one reused buffer, votes counted on the
  device. ``--channels-last``, ``--compile`` and ``--amp`` are certkit's speed options (amp: bf16 or fp16 on
  CUDA, bf16 on a CPU with AVX512-BF16 or AMX).
  ``--shared-noise G``: groups of G inputs vote on the same draws (one generator per group, as
  ``certkit certify --shared-noise G``), so the first layer runs once per input and once per draw
  (:mod:`certkit.smoothing.stem`); each certificate keeps its guarantee, certificates of a group are dependent.
* **bare forward** -- the network certkit votes with (same options), run on one fixed batch of ``batch``
  images, argmax included: no noise, no counting. certkit's throughput divided by this is the share of the
  machine the sampling machinery leaves to the network.

The three are measured in interleaved rounds and the ratios are medians over rounds, so that load from other
processes on a shared machine hits all three alike.

    python benchmarks/certify_throughput.py                       # LeNet / Fashion-MNIST, CPU, ~2-4 min
    python benchmarks/certify_throughput.py --channels-last       # certkit with its CPU speed option
    python benchmarks/certify_throughput.py --device cuda --n 100000 --amp bf16 --channels-last
    python benchmarks/certify_throughput.py --arch resnet20 --n 500 --ref-inputs 2 --inputs 4
    python benchmarks/certify_throughput.py --shared-noise 10 --channels-last --compile

The last line reads ``certify_throughput: <samples/s> (<x>x vs reference loop, <y> of bare forward)``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from scipy.stats import beta, norm
from torch import Tensor, nn

from certkit import RunPlan, Smooth
from certkit.allocator import keep_freed_memory
from certkit.errors import CertkitError
from certkit.models import create_model

SHAPES = {"lenet": (1, 28, 28), "smallcnn": (1, 28, 28), "resnet20": (3, 32, 32), "resnet110": (3, 32, 32)}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class ReferenceLoop:
    """CERTIFY one input at a time, shaped like the reference's ``Smooth`` class (selection draw, estimation
    draw, Clopper-Pearson bound, radius), with its per-chunk host round trip and host-side vote counting."""

    def __init__(self, model: nn.Module, num_classes: int, sigma: float, device: torch.device) -> None:
        self.model, self.num_classes, self.sigma, self.device = model, num_classes, sigma, device

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch: int) -> tuple[int, float]:
        self.model.eval()
        selection = self.sample_noise(x, n0, batch)
        guess = int(selection.argmax())
        estimation = self.sample_noise(x, n, batch)
        n_a = int(estimation[guess])
        if n_a == 0:
            p_lower = 0.0
        elif n_a == n:
            p_lower = alpha ** (1.0 / n)
        else:
            p_lower = float(beta.ppf(alpha, n_a, n - n_a + 1))
        if p_lower < 0.5:
            return -1, 0.0
        return guess, self.sigma * float(norm.ppf(p_lower))

    def sample_noise(self, x: Tensor, num: int, batch: int) -> np.ndarray:
        counts = np.zeros(self.num_classes, dtype=np.int64)
        remaining = num
        with torch.no_grad():
            for _ in range(math.ceil(num / batch)):
                size = min(batch, remaining)
                remaining -= size
                copies = x.repeat((size, 1, 1, 1))
                noise = torch.randn_like(copies) * self.sigma
                votes = self.model(copies + noise).argmax(1).cpu().numpy()
                for v in votes:  # the reference counts on the host, vote by vote
                    counts[v] += 1
        return counts


def load_inputs(arch: str, count: int, data_dir: str | None) -> Tensor:
    """Fashion-MNIST test images for the 28x28 nets when the files are there, else uniform random images."""
    shape = SHAPES[arch]
    if shape == (1, 28, 28):
        try:
            from certkit.data import load_dataset

            test = load_dataset("fashion-mnist", "test", data_dir)
            return torch.stack([test[i][0] for i in range(count)])
        except CertkitError:
            pass
    return torch.rand((count, *shape), generator=torch.Generator().manual_seed(0))


def build_model(arch: str, device: torch.device) -> nn.Module:
    """Random weights: throughput does not depend on them, and the votes still vary between inputs."""
    torch.manual_seed(0)
    shape = SHAPES[arch]
    mean, std = (CIFAR_MEAN, CIFAR_STD) if shape[0] == 3 else (None, None)
    return create_model(arch, 10, shape, mean, std).to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_reference(ref: ReferenceLoop, xs: Tensor, args: argparse.Namespace) -> tuple[float, list[tuple[int, float]]]:
    sync(ref.device)
    start = time.perf_counter()
    out = [ref.certify(x.to(ref.device), args.n0, args.n, args.alpha, args.batch) for x in xs]
    sync(ref.device)
    return len(xs) * (args.n0 + args.n) / (time.perf_counter() - start), out


def time_certkit(
    smoothed: Smooth, xs: Tensor, first_idx: int, args: argparse.Namespace
) -> tuple[float, list[tuple[int, float]]]:
    plan = RunPlan(
        n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch, inputs_per_batch=args.inputs_per_batch
    )
    group = plan.group_size(args.shared_noise)
    out: list[tuple[int, float]] = []
    sync(smoothed.device)
    start = time.perf_counter()
    sampler = smoothed.sampler
    for g in range(0, len(xs), group):
        chunk = xs[g : g + group]
        if args.shared_noise:
            gens = [sampler.group_stream(args.seed, (first_idx + g) // group)]
        else:
            gens = [sampler.input_stream(args.seed, first_idx + g + i) for i in range(len(chunk))]
        certs = smoothed.certify_batch(chunk, args.n0, args.n, args.alpha, args.batch, gens)
        out += [(c.prediction, c.radius) for c in certs]
    sync(smoothed.device)
    return len(xs) * (args.n0 + args.n) / (time.perf_counter() - start), out


def time_forward(forward, batch: Tensor, samples: int, device: torch.device) -> float:
    """Forward passes plus argmax on one fixed batch, about ``samples`` images in all: samples per second."""
    passes = max(1, round(samples / len(batch)))
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        for _ in range(passes):
            forward(batch).argmax(1)
        sync(device)
    return passes * len(batch) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--arch", default="lenet", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument(
        "--n",
        type=int,
        default=1000,
        help="estimation samples (the reference's default is 100,000; on CPU that is ~1 min per input)",
    )
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass, for all three")
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--ref-inputs", type=int, default=4, help="inputs the reference loop certifies per round")
    p.add_argument(
        "--inputs", type=int, default=10, help="inputs certkit certifies per round (bare forward: as many samples)"
    )
    p.add_argument(
        "--inputs-per-batch", type=int, default=None, help="certkit group size (default: as certify_dataset)"
    )
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--shared-noise",
        type=int,
        default=0,
        metavar="G",
        help="certkit: groups of G inputs vote on the same noise draws "
        "(the first layer runs once per input and once per draw)",
    )
    p.add_argument(
        "--rng",
        choices=["torch", "philox"],
        default="torch",
        help="certkit's noise generator: per-block torch.randn, or counter-based Philox (one computation per batch)",
    )
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="certkit and the bare forward with cuDNN's autotuning on (fixed batch shapes); the reference loop "
        "always without, as published",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's malloc as it is, instead of keeping freed memory as the CLI does (certkit/allocator.py); "
        "either way all three loops run under the same setting",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.glibc_default:
        keep_freed_memory()
    device = torch.device(args.device)
    model = build_model(args.arch, device)
    xs = load_inputs(args.arch, max(args.inputs, args.ref_inputs), args.data_dir)
    smoothed = Smooth(
        model,
        10,
        args.sigma,
        channels_last=args.channels_last,
        amp=args.amp,
        compile=args.compile,
        shared_noise=args.shared_noise,
        rng=args.rng,
    )
    reference = ReferenceLoop(model, 10, args.sigma, device)
    noisy = (xs[:1].to(device) + args.sigma * torch.randn((args.batch, *xs.shape[1:]), device=device)).contiguous()
    options = {k: v for k, v in smoothed.speed_options.items() if v}
    print(
        f"{args.arch} on {device} ({torch.get_num_threads()} threads), n0={args.n0} n={args.n} batch={args.batch} "
        f"sigma={args.sigma}; certkit options: {options or 'none'}, rng {args.rng}; torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if options:
        agreement = smoothed.sampler.vote_agreement(xs[:4], num=1000, seed=args.seed, batch_size=args.batch)
        print(
            f"vote agreement with the plain fp32 model under {options}: {agreement.mean():.4%} "
            f"(lowest input {agreement.min():.4%})"
        )

    def tuned(on: bool) -> None:
        torch.backends.cudnn.benchmark = on and args.cudnn_benchmark

    # warm-up: allocator, oneDNN primitives, compilation
    tuned(True)
    time_certkit(smoothed, xs[:2], 0, args)
    time_forward(smoothed.voter.logits, noisy, args.batch, device)
    tuned(False)
    time_reference(reference, xs[:1], args)
    samples = args.inputs * (args.n0 + args.n)

    rows = []
    decisions_ref: list[tuple[int, float]] = []
    decisions_certkit: list[tuple[int, float]] = []
    for r in range(args.rounds):
        tuned(False)
        ref_rate, out_ref = time_reference(reference, xs[: args.ref_inputs], args)
        plain_rate = time_forward(model, noisy, samples, device) if options else 0.0
        tuned(True)
        kit_rate, out_kit = time_certkit(smoothed, xs[: args.inputs], 0, args)
        fwd_rate = time_forward(smoothed.voter.logits, noisy, samples, device)
        plain_rate = plain_rate or fwd_rate
        rows.append((ref_rate, kit_rate, fwd_rate, plain_rate))
        decisions_ref, decisions_certkit = out_ref, out_kit
        print(
            f"round {r + 1}/{args.rounds}: reference {ref_rate:8.0f}/s  certkit {kit_rate:8.0f}/s  "
            f"bare forward {fwd_rate:8.0f}/s" + (f"  (plain fp32 NCHW forward {plain_rate:8.0f}/s)" if options else "")
        )
        sys.stdout.flush()

    speedup = statistics.median(k / ref for ref, k, _, _ in rows)
    share = statistics.median(k / f for _, k, f, _ in rows)
    kit = statistics.median(k for _, k, _, _ in rows)
    print(
        f"median samples/s: reference {statistics.median(r[0] for r in rows):.0f}, certkit {kit:.0f}, "
        f"bare forward {statistics.median(r[2] for r in rows):.0f}"
        + (f", plain forward {statistics.median(r[3] for r in rows):.0f}" if options else "")
    )
    agree = sum(a[0] == b[0] for a, b in zip(decisions_ref, decisions_certkit))
    print(f"same predicted class (independent noise) on {agree}/{len(decisions_ref)} inputs certified by both")
    print(
        f"load average at the end {os.getloadavg()[0]:.1f} (other processes share the CPU: compare ratios, not rates)"
    )
    print(f"certify_throughput: {kit:.0f} ({speedup:.2f}x vs reference loop, {share:.2f} of bare forward)")


if __name__ == "__main__":
    main()
