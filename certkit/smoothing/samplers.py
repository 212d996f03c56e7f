"""Samplers: SAMPLEUNDERNOISE for several inputs at once, turning inputs and sample counts into vote counts.

:meth:`Sampler.counts` is the one public entry: ``counts(xs, nums, batch_size, generators)`` gives the
hard-vote counts (B, K) of ``nums[i]`` noisy copies ``xs[i] + sigma * eps`` for each input. Two samplers:

* :class:`PerInputNoise`: every input draws from its own generator (:func:`input_generator`, seeded from
  ``(seed, idx)``) in fixed blocks of :data:`NOISE_BLOCK` copies, in the same order whether it is sampled
  alone or together with others. Counts therefore do not depend on how many inputs share a forward batch, on
  sharding or on the resume point, nor on ``batch_size`` as long as it is at least ``NOISE_BLOCK``. Noise is
  written into one preallocated buffer and votes are added to the counts on the device, per forward batch.
* :class:`SharedNoise`: up to G inputs vote on the *same* draws from one generator
  (:func:`shared_generator`). Each input's draws are still i.i.d. N(0, sigma^2 I), so every certificate keeps
  its (1 - alpha) guarantee; what is given up is independence *between* the certificates of one group. The
  gain: the first layer is affine, so it runs once per input and once per draw instead of once per pair
  (:mod:`certkit.smoothing.stem`).

Either sampler draws from one of two generators (``rng``): ``"torch"`` (default), a ``torch.Generator`` per
stream with one ``randn`` call per block of copies, or ``"philox"``, a counter-based
:class:`~certkit.smoothing.philox.PhiloxStream` per stream, with which a whole forward batch's noise, whatever
inputs and stream positions it mixes, is one elementwise computation (one fused kernel when compiled). The
two give different draws of the same distribution, so a result file records which one it used.

How the network itself is run (eval mode, speed options, the logit-shape check) is the :class:`Voter`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

from certkit.data import check_pixels
from certkit.errors import CertkitError
from certkit.smoothing.philox import PhiloxStream, standard_normal
from certkit.smoothing.statistics import check_batch_size, check_sigma
from certkit.smoothing.stem import StemSplit, outer_sum, split_stem, structure_key
from certkit.smoothing.voter import Voter

#: noise is drawn per input in blocks of this many copies; 100 divides the usual n0 and n exactly
NOISE_BLOCK = 100

#: the noise generators a sampler can draw from (see the module docstring)
RNGS = ("torch", "philox")

NoiseStream = torch.Generator | PhiloxStream | None
Generators = Sequence[NoiseStream]


#: how the noise streams are derived from (run seed, index), recorded in every result file's settings: a
#: file certified under another derivation cannot be continued (its rows and the new ones would come from
#: two families of streams). 2: streams of one run are distinct by construction (2026-11-29); before, a CPU
#: generator kept 32 bits of a hashed seed, so two inputs of one run could draw the same noise.
NOISE_STREAMS = 2

#: each stream of a run is ``base + offset`` in its generator's seed space: the vote check 0, input ``i``
#: 1 + 2i, shared-noise group ``g`` 2 + 2g, so no two streams of a run coincide
_CHECK, _INPUT, _GROUP = 0, 1, 2


@dataclass(frozen=True)
class StreamKey:
    """Names one noise stream of a run: the run ``seed`` and the stream's ``offset`` (see above).

    A stream's seed is ``(base(seed) + offset) mod 2^w``, with ``base`` hashed from the run seed (NumPy's
    SeedSequence of its two 32-bit words, so neighbouring run seeds get unrelated bases) and ``w`` the
    generator's seed width: 32 for a CPU ``torch.Generator`` (an mt19937, which keeps 32 bits of its seed),
    63 for a CUDA one, 64 for a Philox key. Within a run the streams are therefore distinct by construction
    (for indices below 2^31 on CPU), which the summary's high-probability bound over independent rows needs;
    seeding per input rather than one stream per run is what makes a result independent of batch size,
    shard count and resume point. Two runs of different seeds may share a stream on CPU (2^32 seeds in
    all); ``--rng philox`` keys streams by 64 bits.
    """

    seed: int
    offset: int

    def value(self, bits: int) -> int:
        """The stream's seed in a space of ``2^bits`` values."""
        return (_base(self.seed) + self.offset) % (1 << bits)


@functools.lru_cache(maxsize=64)
def _base(seed: int) -> int:
    """The 64-bit base of run seed ``seed``'s streams (hashed once per seed, not once per input)."""
    words = [seed & 0xFFFF_FFFF, seed >> 32]  # fixed width: seed 2^32 is not seed 0's input 1
    low, high = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


def input_seeds(seed: int, idx: int) -> StreamKey:
    """The noise stream of dataset index ``idx`` under run seed ``seed``."""
    return StreamKey(int(seed), _INPUT + 2 * int(idx))


def group_seeds(seed: int, group: int) -> StreamKey:
    """The noise stream of shared-noise group ``group`` under run seed ``seed`` (``Smooth(shared_noise=G)``):
    never the stream of a single input of the run."""
    return StreamKey(int(seed), _GROUP + 2 * int(group))


def input_generator(seed: int, idx: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The torch generator of dataset index ``idx`` under run seed ``seed`` (:func:`input_seeds`)."""
    return _seeded_generator(input_seeds(seed, idx), device)


def shared_generator(seed: int, group: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The torch generator of shared-noise group ``group`` under run seed ``seed`` (:func:`group_seeds`)."""
    return _seeded_generator(group_seeds(seed, group), device)


def check_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the speed-option vote check (:meth:`Smooth.vote_agreement`) under run seed ``seed``.

    A stream of its own (offset 0), so the check never replays the draws that certify an input: a speed
    option tuned, or lucky, on those draws would otherwise pass on exactly the votes that count.
    """
    return _seeded_generator(StreamKey(int(seed), _CHECK), device)


def _seeded_generator(key: StreamKey, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(key.value(32 if gen.device.type == "cpu" else 63))
    return gen


class Sampler:
    """Draws noise around inputs and has the :class:`Voter` vote on it (base of the two samplers).

    ``sigma`` (> 0) is the noise level in [0, 1] pixel units. ``group`` is how many inputs share one noise
    stream: 0 when every input has its own.
    """

    group = 0

    def __init__(self, voter: Voter, sigma: float, rng: str = "torch") -> None:
        if rng not in RNGS:
            raise CertkitError(f"unknown noise generator {rng!r}; choose one of {', '.join(RNGS)}")
        self.voter = voter
        self.sigma = check_sigma(sigma)
        self.rng = rng
        self._buffer: Tensor | None = None

    def input_stream(self, seed: int, idx: int) -> torch.Generator | PhiloxStream:
        """The noise stream of dataset index ``idx`` under run seed ``seed``, from this sampler's ``rng``."""
        return self._stream(input_seeds(seed, idx))

    def group_stream(self, seed: int, group: int) -> torch.Generator | PhiloxStream:
        """The one noise stream of shared-noise group ``group`` under run seed ``seed``."""
        return self._stream(group_seeds(seed, group))

    def _stream(self, key: StreamKey) -> torch.Generator | PhiloxStream:
        if self.rng == "philox":
            return PhiloxStream.from_key(key.value(64))
        return _seeded_generator(key, self.voter.device)

    @property
    def speed_options(self) -> dict[str, object]:
        """The voter's options and whether the stem split is in use: what :meth:`vote_agreement` checks."""
        return {**self.voter.speed_options, "stem_split": False}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.voter!r}, sigma={self.sigma}, group={self.group}, rng={self.rng!r})"

    def counts(
        self, xs: Tensor, nums: Sequence[int], batch_size: int, generators: Generators | None = None
    ) -> np.ndarray:
        """Hard-vote counts (B, K): ``nums[i]`` noisy copies of ``xs[i]`` (B, C, H, W), at most ``batch_size``
        per forward pass. Per-input noise takes one generator per input, shared noise one for them all (None:
        torch's global generator)."""
        check_batch_size(batch_size)
        xs, gens = self.prepare(xs, generators)
        if len(nums) != len(xs):
            raise CertkitError(f"{len(xs)} inputs but {len(nums)} sample counts")
        counts = self._counts(xs, nums, batch_size, gens)
        self.voter.check_finite()
        return counts

    def prepare(self, xs: Tensor, generators: Generators | None) -> tuple[Tensor, list[NoiseStream]]:
        """Check a batch of inputs and their generators; return them on the voter's device as float32."""
        if not isinstance(xs, Tensor) or xs.dim() != 4:
            got = f"shape {tuple(xs.shape)}" if isinstance(xs, Tensor) else f"a {type(xs).__name__}"
            raise CertkitError(f"expected a batch of images (B, C, H, W) as a torch.Tensor, got {got}")
        check_pixels(xs, "input")
        if not torch.isfinite(xs).all():
            raise CertkitError("input contains NaN or inf values")
        gens = self._generators(len(xs), generators)
        if self.rng == "philox":
            # no stream given: a fresh key from torch's global generator, as a torch sampler would draw from it
            gens = [PhiloxStream.from_global_rng() if g is None else g for g in gens]
        kind = PhiloxStream if self.rng == "philox" else (torch.Generator, type(None))
        if not all(isinstance(g, kind) for g in gens):
            wanted = "PhiloxStream" if self.rng == "philox" else "torch.Generator (or None)"
            raise CertkitError(f"a sampler with rng={self.rng!r} draws from {wanted} streams")
        return xs.to(self.voter.device, torch.float32), gens

    def vote_agreement(self, xs: Tensor, num: int = 1000, seed: int = 0, batch_size: int | None = None) -> np.ndarray:
        """Per input of ``xs`` (B, C, H, W): the fraction of ``num`` noisy copies whose vote as sampled here
        (speed options, the stem split) equals the vote of the plain fp32 model (:meth:`Voter.vote_agreement`).

        The copies come from :func:`check_generator` (``seed``), not from any input's certification stream,
        in forward batches of ``batch_size`` (default: the size already in use, so a compiled model sees no
        new shape); inputs are checked one noise group at a time, as a run samples them.
        """
        xs = torch.cat([self.prepare(part, None)[0] for part in xs.split(self.group or max(1, len(xs)))])
        if batch_size is None:
            batch_size = len(self._buffer) if self._buffer is not None else min(num, 1000)
        agreement = self._vote_agreement(xs, num, batch_size, check_generator(seed, self.voter.device))
        self.voter.check_finite()
        return agreement

    # --- what each sampler does its own way ----------------------------------------------------------------

    def _generators(self, count: int, generators: Generators | None) -> list[NoiseStream]:
        raise NotImplementedError

    def _counts(self, xs: Tensor, nums: Sequence[int], batch_size: int, gens: list[NoiseStream]) -> np.ndarray:
        raise NotImplementedError

    def _vote_agreement(self, xs: Tensor, num: int, batch_size: int, gen: torch.Generator) -> np.ndarray:
        raise NotImplementedError

    # --- shared machinery ----------------------------------------------------------------------------------

    def _noise_buffer(self, rows: int, shape: tuple[int, ...]) -> Tensor:
        """One (rows, C, H, W) buffer reused by every forward batch (no allocation per batch)."""
        buf = self._buffer
        if buf is None or buf.shape != (rows, *shape):
            # zeros, not empty: a compiled model runs the whole buffer, stale tail included
            buf = torch.zeros((rows, *shape), device=self.voter.device)
            self._buffer = buf
        return buf


class PerInputNoise(Sampler):
    """Every input draws its noise from its own generator, in blocks of ``min(NOISE_BLOCK, batch_size)``."""

    def __init__(self, voter: Voter, sigma: float, rng: str = "torch") -> None:
        super().__init__(voter, sigma, rng)
        # x + sigma * eps for a whole forward batch of counter-based noise, compiled as one graph
        self._philox_copies = voter.compile_fn(_philox_copies)

    def _generators(self, count: int, generators: Generators | None) -> list[NoiseStream]:
        gens: list[NoiseStream] = list(generators) if generators is not None else [None] * count
        if len(gens) != count:
            raise CertkitError(f"{count} inputs but {len(gens)} generators")
        return gens

    def _counts(self, xs: Tensor, nums: Sequence[int], batch_size: int, gens: list[NoiseStream]) -> np.ndarray:
        """Each input's copies are cut into blocks (the last one shorter); forward batches are filled with
        whole blocks, so memory is bounded by ``batch_size`` whatever the ``nums`` are, and an input's noise
        never depends on which other inputs share its batches."""
        voter, k = self.voter, self.voter.num_classes
        num_inputs = len(xs)
        block = min(NOISE_BLOCK, batch_size)
        blocks = [(i, size) for i, num in enumerate(nums) for size in block_sizes(num, block)]
        counts = torch.zeros(num_inputs * k, dtype=torch.int64, device=voter.device)
        with voter.eval_mode(), torch.inference_mode():
            if self.rng == "philox":
                streams = cast(list[PhiloxStream], gens)  # prepare() checked the kind
                keys = to_device(torch.tensor([s.key for s in streams], dtype=torch.int64), voter.device)
                for batch_blocks in _pack(blocks, batch_size):
                    voter.new_step()
                    owners, noisy, used = self._philox_batch(xs, batch_blocks, streams, keys, batch_size)
                    add_votes(counts, owners * k + voter.votes(noisy, used))
            else:
                generators = cast(list[torch.Generator | None], gens)
                buffer = self._noise_buffer(batch_size, tuple(xs.shape[1:]))
                for batch_blocks in _pack(blocks, batch_size):
                    voter.new_step()
                    owners, used = self._torch_batch(xs, batch_blocks, generators, buffer)
                    add_votes(counts, owners * k + voter.votes(buffer, used))
        return counts.view(num_inputs, k).cpu().numpy().astype(np.int64)

    def _torch_batch(
        self, xs: Tensor, batch_blocks: list[tuple[int, int]], generators: list[torch.Generator | None], buffer: Tensor
    ) -> tuple[Tensor, int]:
        """(owner of each used row, rows used) of one forward batch written into ``buffer``: standard normal
        noise block by block from each input's own generator, then scaled and shifted. An input's blocks are
        consecutive in the batch, so it owns one run of rows."""
        used = 0
        runs: list[list[int]] = []  # [input, first row, end row]
        for i, size in batch_blocks:
            torch.randn((size, *xs.shape[1:]), generator=generators[i], out=buffer[used : used + size])
            if runs and runs[-1][0] == i:
                runs[-1][2] = used + size
            else:
                runs.append([i, used, used + size])
            used += size
        # x + sigma * noise with one scaling for the whole batch and one shift per input: few, large
        # operations (each small one costs a kernel launch, or a thread hand-off on CPU)
        buffer[:used].mul_(self.sigma)
        for i, start, end in runs:
            buffer[start:end].add_(xs[i])
        owners = torch.repeat_interleave(
            torch.tensor([i for i, _, _ in runs]), torch.tensor([end - start for _, start, end in runs])
        )
        return to_device(owners, self.voter.device), used

    def _philox_batch(
        self,
        xs: Tensor,
        batch_blocks: list[tuple[int, int]],
        streams: list[PhiloxStream],
        keys: Tensor,
        batch_size: int,
    ) -> tuple[Tensor, Tensor, int]:
        """(owner of each used row, the noisy copies, rows used) of one forward batch: every row's owner and
        draw number are laid out on the host, run by run (a handful of array operations per batch, not a few
        per block of copies), its key is its owner's, and the noise of all rows is made in one
        computation. Compiled, the rows are padded to ``batch_size`` (one shape per graph; the padding rows are
        never counted)."""
        runs: list[list[int]] = []  # [input, first draw, rows]: an input's consecutive blocks are one run
        for i, size in batch_blocks:
            first = streams[i].take(size)
            if runs and runs[-1][0] == i:
                runs[-1][2] += size
            else:
                runs.append([i, first, size])
        inputs, firsts, sizes = np.array(runs, dtype=np.int64).T
        used = int(sizes.sum())
        table = np.zeros((2, batch_size if self.voter.compiled else used), dtype=np.int64)
        table[0, :used] = np.repeat(inputs, sizes)
        # row r of a run starting at batch row b draws first + (r - b)
        table[1, :used] = np.arange(used) + np.repeat(firsts - (np.cumsum(sizes) - sizes), sizes)
        owner, draw = to_device(torch.from_numpy(table), self.voter.device)
        row_keys = keys[owner]
        # the gathers stay outside the compiled graph, whose shapes then do not depend on how many inputs
        noisy = self._philox_copies(xs[owner], row_keys[:, 0], row_keys[:, 1], draw, self.sigma)
        return owner[:used], noisy, used

    def _vote_agreement(self, xs: Tensor, num: int, batch_size: int, gen: torch.Generator) -> np.ndarray:
        """Input by input, ``num`` copies in blocks of ``batch_size`` from the one check stream."""
        shape = tuple(xs.shape[1:])
        noisy = self._noise_buffer(batch_size, shape)
        eps = torch.zeros((batch_size, *shape), device=self.voter.device)

        def fast_votes(x: Tensor, draws: Tensor) -> Tensor:
            self.voter.new_step()
            torch.add(draws * self.sigma, x[0], out=noisy[: len(draws)])
            return self.voter.votes(noisy, len(draws)).unsqueeze(0)

        return np.concatenate(
            [self.voter.vote_agreement(x[None], self.sigma, _draw_blocks(gen, num, eps), fast_votes) for x in xs]
        )


class SharedNoise(Sampler):
    """Up to ``group`` (>= 2) inputs of one call vote on the same draws, from one generator.

    When the network starts with an affine stem that the split computes exactly
    (:func:`~certkit.smoothing.stem.split_stem`: known classes only, no forward hooks; checked again on every
    call, so a hook added later turns the split off), its first layer runs once per input and once per draw
    instead of once per (input, draw) pair; on LeNet-sized nets that is most of the forward pass. Certificates
    of inputs in one group are not independent *of each other* (a group's wrong certificates, each of
    probability <= alpha, may coincide). The split path is rounded differently from the plain model, so it
    counts as a speed option for :meth:`vote_agreement`.
    """

    def __init__(self, voter: Voter, sigma: float, group: int, rng: str = "torch") -> None:
        super().__init__(voter, sigma, rng)
        if group < 2:
            raise CertkitError(f"--shared-noise must be 0 (off) or a group of at least 2 inputs (got {group})")
        self.group = int(group)
        self._stem: StemSplit | None = None
        self._stem_key: object = None
        self._refresh_stem()
        # the votes come from _combine(image part, noise part), compiled as one graph; a pass's counter-based
        # draws from one more
        self._combine_fn = voter.compile_fn(self._combine)
        self._philox_normal = voter.compile_fn(standard_normal)

    @property
    def speed_options(self) -> dict[str, object]:
        self._refresh_stem()
        return {**self.voter.speed_options, "stem_split": self._stem is not None}

    def _generators(self, count: int, generators: Generators | None) -> list[NoiseStream]:
        gens: list[NoiseStream] = list(generators) if generators is not None else [None]
        if len(gens) != 1:
            raise CertkitError(f"with shared noise, pass one generator for all inputs (got {len(gens)})")
        if count > self.group:
            raise CertkitError(f"shared_noise={self.group} allows at most that many inputs per call, got {count}")
        return gens

    def _counts(self, xs: Tensor, nums: Sequence[int], batch_size: int, gens: list[NoiseStream]) -> np.ndarray:
        """Every input votes on the same ``nums[0]`` draws, taken in the same blocks of
        ``min(NOISE_BLOCK, batch_size)`` as an unshared input's, so an input's noise is the stream's first
        draws whatever the group. A forward pass holds several blocks for a few inputs, or one block for as
        many inputs as fit."""
        if len(set(nums)) > 1:
            raise CertkitError("inputs that share noise must draw the same number of samples")
        voter, k = self.voter, self.voter.num_classes
        num_inputs = len(xs)
        self._refresh_stem()
        block, members, per_pass = self._shape(batch_size)
        sizes = block_sizes(nums[0], block)
        counts = torch.zeros(num_inputs * k, dtype=torch.int64, device=voter.device)
        owners = torch.arange(num_inputs, device=voter.device).unsqueeze(1) * k
        with voter.eval_mode(), torch.inference_mode():
            images = self._image_part(xs)
            eps = self._noise_buffer(per_pass * block, tuple(xs.shape[1:]))
            stream = gens[0]
            if isinstance(stream, PhiloxStream):  # copied to the device once, not per pass
                key0, key1 = stream.key_tensors(voter.device)
            for start in range(0, len(sizes), per_pass):
                used = sum(sizes[start : start + per_pass])
                voter.new_step()
                if isinstance(stream, PhiloxStream):  # the pass's draws in one computation
                    rows = len(eps) if voter.compiled else used  # compiled: one shape, the tail never counted
                    first = stream.take(used)
                    draws = torch.arange(first, first + rows, device=voter.device)
                    eps[:rows] = self._philox_normal(key0, key1, draws, eps[0].numel()).view(rows, *eps.shape[1:])
                else:
                    filled = 0
                    for size in sizes[start : start + per_pass]:
                        torch.randn((size, *xs.shape[1:]), generator=stream, out=eps[filled : filled + size])
                        filled += size
                votes = self._votes(images, eps, used, members)
                add_votes(counts, (owners + votes).flatten())
        return counts.view(num_inputs, k).cpu().numpy().astype(np.int64)

    def _vote_agreement(self, xs: Tensor, num: int, batch_size: int, gen: torch.Generator) -> np.ndarray:
        """Group by group, in the shapes a run with ``batch_size`` uses."""
        self._refresh_stem()
        block, members, per_pass = self._shape(batch_size)
        eps = self._noise_buffer(per_pass * block, tuple(xs.shape[1:]))

        def fast_votes(group: Tensor, draws: Tensor) -> Tensor:
            self.voter.new_step()
            return self._votes(self._image_part(group), eps, len(draws), members)

        return np.concatenate(
            [
                self.voter.vote_agreement(group, self.sigma, _draw_blocks(gen, num, eps), fast_votes)
                for group in xs.split(self.group)
            ]
        )

    def _refresh_stem(self) -> None:
        """Split the stem again (or give up the split) whenever the voting network's modules, their classes
        or any forward hook changed since the last split: a hook registered after construction would
        otherwise be skipped by the split, and the votes would no longer be the model's."""
        key = structure_key(self.voter.network)
        if key != self._stem_key:
            self._stem, self._stem_key = split_stem(self.voter.network), key

    def _shape(self, batch_size: int) -> tuple[int, int, int]:
        """(block, inputs per forward pass, blocks per forward pass): fixed by the group width and batch
        size only, so a compiled graph sees the same shapes in every call."""
        block = min(NOISE_BLOCK, batch_size)
        members = min(self.group, max(1, batch_size // block))
        return block, members, max(1, batch_size // (members * block))

    def _image_part(self, xs: Tensor) -> Tensor:
        """What the clean inputs contribute to every noisy copy: the stem's output, or the images."""
        if self.voter.channels_last:  # a convolution keeps its input's layout, so the stem's output is too
            xs = xs.contiguous(memory_format=torch.channels_last)
        return self._stem.image_part(xs) if self._stem is not None else xs

    def _votes(self, images: Tensor, eps: Tensor, used: int, members: int) -> Tensor:
        """Votes (len(images), used): every image's class on each of the first ``used`` draws of ``eps``,
        ``members`` images per forward pass."""
        voter = self.voter
        draws = eps if voter.compiled else eps[:used]  # a compiled graph sees one shape: run the stale tail too
        noise = self._stem.noise_part(draws, self.sigma) if self._stem is not None else draws * self.sigma
        if voter.channels_last and noise.dim() == 4:
            noise = noise.contiguous(memory_format=torch.channels_last)
        out = []
        for first in range(0, len(images), members):
            part = images[first : first + members]
            count = len(part)
            part = voter.pad(part, members)
            votes = voter.class_votes(self._combine_fn(part, noise), len(part) * len(noise))
            out.append(votes.view(len(part), -1)[:count, :used])
        return torch.cat(out)

    def _combine(self, images: Tensor, noise: Tensor) -> Tensor:
        """Logits of every (image, draw) pair, image-major: the rest of the network on their sums."""
        voter = self.voter
        channels_last = voter.channels_last and not voter.compiled  # compiled: the compiler picks layouts
        with voter.autocast():
            if self._stem is None:
                return voter.network(outer_sum(images, noise, channels_last))
            return self._stem.rest(self._stem.pair_sum(images, noise, channels_last))


def sampler_for(voter: Voter, sigma: float, shared_noise: int = 0, rng: str = "torch") -> Sampler:
    """:class:`PerInputNoise` for ``shared_noise`` 0, else :class:`SharedNoise` with groups of that size; both
    drawing from ``rng`` (:data:`RNGS`)."""
    if shared_noise == 0:
        return PerInputNoise(voter, sigma, rng)
    return SharedNoise(voter, sigma, shared_noise, rng)


def _philox_copies(images: Tensor, key0: Tensor, key1: Tensor, draw: Tensor, sigma: float) -> Tensor:
    """Row r: ``images[r] + sigma * eps`` with eps draw ``draw[r]`` of the Philox stream keyed
    ``(key0[r], key1[r])``; the scaling and the shift round as the torch path's do."""
    eps = standard_normal(key0, key1, draw, images[0].numel()).view(images.shape)
    return images + eps * sigma


def add_votes(counts: Tensor, index: Tensor) -> None:
    """``counts[index[j]] += 1`` for every j, on the device (``bincount`` would read the largest index back to
    the host first: on CUDA a synchronisation per forward batch)."""
    counts.scatter_add_(0, index, torch.ones_like(index))


def to_device(table: Tensor, device: torch.device) -> Tensor:
    """A host-made table on ``device``; to a GPU from pinned memory and asynchronously, so that the host lays
    out the next forward batch while this one runs."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def block_sizes(num: int, block: int) -> list[int]:
    """``num`` cut into blocks of ``block``, the last one holding the remainder."""
    return [block] * (num // block) + ([num % block] if num % block else [])


def _draw_blocks(gen: torch.Generator, num: int, buffer: Tensor) -> Iterator[Tensor]:
    """``num`` standard-normal draws from ``gen`` in blocks of ``len(buffer)``, each written into the buffer's
    first rows and yielded as that view."""
    for used in block_sizes(num, len(buffer)):
        torch.randn((used, *buffer.shape[1:]), generator=gen, out=buffer[:used])
        yield buffer[:used]


def _pack(blocks: list[tuple[int, int]], capacity: int) -> Iterator[list[tuple[int, int]]]:
    """Group consecutive (input, size) blocks into forward batches of at most ``capacity`` copies."""
    batch: list[tuple[int, int]] = []
    used = 0
    for i, size in blocks:
        if used + size > capacity:
            yield batch
            batch, used = [], 0
        batch.append((i, size))
        used += size
    if batch:
        yield batch
