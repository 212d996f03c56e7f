"""``--batch auto``: a forward-batch size for a smoothed classifier, found once per run by a short probe.

The batch size never changes a certificate (noise is drawn per input in blocks of
:data:`~certkit.smoothing.samplers.NOISE_BLOCK`, see :mod:`certkit.smoothing.samplers`), so it can be chosen
for speed alone, as long as it is at least one block: every size tried here is a power of two no smaller than
:data:`MIN_AUTO_BATCH`, so an automatic run draws the same noise as any explicit ``--batch`` of 100 or more,
and resumes its files.

* CUDA: memory is the limit. Powers of two from :data:`CUDA_START` go through the network until one raises
  ``torch.cuda.OutOfMemoryError`` (caught, the cache emptied); the answer is half the largest that fitted,
  the other half being headroom for what a certification pass holds beside the network's activations (the
  noise buffer, the vote counts, a shared-noise pass's noise and pair sums, allocator fragmentation).
* CPU (and any other device): a too-large batch does not fail, it swaps, so the answer is the fastest power
  of two of a short timing probe: each size is timed ``repeats`` times (best of), doubling until throughput
  has failed to improve by :data:`MIN_GAIN` twice in a row, the cap is reached or the probe's time budget
  would be exceeded.

Either way the answer is capped by :func:`batch_cap`: no forward pass ever needs more copies than one group
of inputs draws in one call.

The probe runs the voting network as certification runs it (eval mode, ``torch.inference_mode``, channels-last
and autocast when the :class:`~certkit.smoothing.voter.Voter` uses them) on noisy copies of a grey image drawn
from a private generator: no certification stream (nor torch's global generator) is touched. A compiled voter
is probed uncompiled: with one fixed shape per graph, every size tried would be a compilation of its own, and
inference graphs that the compiler fuses hold no more activations than the eager network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from certkit.errors import CertkitError
from certkit.smoothing.samplers import NOISE_BLOCK
from certkit.smoothing.smooth import Smooth

#: the smallest automatic batch: the first power of two that holds a whole noise block, so an automatic run
#: draws its noise in the same blocks as any explicit batch of at least NOISE_BLOCK
MIN_AUTO_BATCH = 1 << (NOISE_BLOCK - 1).bit_length()
#: the largest automatic batch: a bound on what the probe allocates and how long it runs
MAX_AUTO_BATCH = 2**17
#: the first size the CUDA probe tries; its half is MIN_AUTO_BATCH
CUDA_START = 2 * MIN_AUTO_BATCH
#: the largest size the CPU timing probe tries
MAX_CPU_BATCH = 2**14
#: a doubling counts as faster only if throughput grows by at least this fraction
MIN_GAIN = 0.05

#: ``run(rows)`` makes one forward pass of ``rows`` noisy copies and returns when it has finished
ForwardPass = Callable[[int], None]


def batch_cap(samples: int, inputs: int = 1) -> int:
    """The largest batch worth having: the power of two that holds ``inputs`` inputs' ``samples`` copies each
    (a certification run samples several inputs together), within MIN_AUTO_BATCH..MAX_AUTO_BATCH."""
    need = max(1, samples) * max(1, inputs)
    return min(MAX_AUTO_BATCH, max(MIN_AUTO_BATCH, 1 << (need - 1).bit_length()))


def auto_batch_size(
    smoothed: Smooth,
    input_shape: Sequence[int],
    cap: int,
    *,
    probe: str | None = None,
    repeats: int = 3,
    budget_s: float = 10.0,
) -> int:
    """A power of two in MIN_AUTO_BATCH..``cap`` for ``smoothed`` on inputs of ``input_shape`` (C, H, W).

    ``probe`` is ``"memory"`` (the largest that fits, halved; the default on CUDA) or ``"speed"`` (the
    fastest of a short timing probe; the default elsewhere); ``repeats`` and ``budget_s`` (seconds) bound
    the speed probe. Raises :class:`CertkitError` when not even CUDA_START copies fit.
    """
    cap = max(MIN_AUTO_BATCH, min(int(cap), MAX_AUTO_BATCH))
    device = smoothed.device
    probe = probe or ("memory" if device.type == "cuda" else "speed")
    run = _forward_pass(smoothed, tuple(input_shape))
    if probe == "memory":
        fitted = largest_fitting(run, CUDA_START, 2 * cap)
        if fitted is None:
            raise CertkitError(
                f"--batch auto: not even {CUDA_START} noisy copies fit on {device}; pass a smaller --batch"
            )
        return min(cap, fitted // 2)
    if probe != "speed":
        raise CertkitError(f"probe must be 'memory' or 'speed' (got {probe!r})")

    def seconds(rows: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            run(rows)
            best = min(best, time.perf_counter() - began)
        return best

    return fastest(seconds, MIN_AUTO_BATCH, min(cap, MAX_CPU_BATCH), budget_s / repeats)


def largest_fitting(run: ForwardPass, start: int, limit: int) -> int | None:
    """The largest power of two in ``start``..``limit`` that ``run`` passes without running out of CUDA
    memory, trying upward from ``start`` and stopping at the first that does not fit (None: not even
    ``start``). The caching allocator is emptied after a failure, so the memory it took is given back."""
    fitted = None
    rows = start
    while rows <= limit:
        try:
            run(rows)
        except torch.cuda.OutOfMemoryError:
            failed = True
        else:
            failed = False
        # after the except block, so the traceback's frames (and the tensors they hold) are gone
        torch.cuda.empty_cache()
        if failed:
            break
        fitted, rows = rows, 2 * rows
    return fitted


def fastest(seconds: Callable[[int], float], start: int, limit: int, budget_s: float) -> int:
    """The power of two in ``start``..``limit`` with the highest throughput ``rows / seconds(rows)``,
    doubling from ``start`` until two doublings in a row fail to beat the best by MIN_GAIN, ``limit`` is
    reached, or the next size (assumed to take twice as long as the last) would take the time spent past
    ``budget_s``."""
    best_rows, best_rate = start, 0.0
    misses, spent, rows = 0, 0.0, start
    while rows <= limit:
        took = seconds(rows)
        spent += took
        rate = rows / max(took, 1e-12)
        if rate >= best_rate * (1 + MIN_GAIN):
            misses = 0
        else:
            misses += 1
        if rate > best_rate:
            best_rows, best_rate = rows, rate
        if misses >= 2 or spent + 2 * took > budget_s:
            break
        rows *= 2
    return best_rows


def _forward_pass(smoothed: Smooth, shape: tuple[int, ...]) -> ForwardPass:
    """One forward pass of ``rows`` noisy copies as certification makes it, on a grey image with noise from
    a generator of its own (seeded, so two probes see the same inputs)."""
    voter, sigma = smoothed.voter, smoothed.sigma

    def run(rows: int) -> None:
        gen = torch.Generator(device=voter.device)
        gen.manual_seed(0)
        with voter.eval_mode(), torch.inference_mode():
            batch = torch.randn((rows, *shape), generator=gen, device=voter.device).mul_(sigma).add_(0.5)
            voter.class_votes(voter.logits(batch, eager=True), rows)
            voter.check_finite()
        if voter.device.type == "cuda":
            torch.cuda.synchronize(voter.device)

    return run
