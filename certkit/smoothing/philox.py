"""Counter-based Gaussian noise: Philox4x32-10 (Salmon et al., SC'11) written in tensor operations.

torch's generators are *streams*: the only way to give every input its own noise, independent of which other
inputs share a forward batch, is one ``randn`` call per input and block of copies, which on a GPU is one kernel
launch per block. A counter-based generator has no state to advance: draw ``s`` of the stream with key ``k``
is a pure function ``philox(counter=(element group, s), key=k)``. A whole forward batch, mixing copies of many
inputs at arbitrary stream positions, is then one elementwise computation over (row key, row sample number,
element), and torch.compile fuses it (with the shift by the image and the scaling by sigma) into one kernel.

The certificate needs exactly what a stream gives: each input's copies i.i.d. N(0, sigma^2 I), and different
inputs' (or groups') noise independent. Philox4x32-10 is the generator behind cuRAND and torch's own CUDA
RNG; its authors report it passing TestU01's BigCrush, and for a fixed key it is a bijection of the counter, so
a stream never repeats a block. Here it is checked against the Random123 known-answer vectors, and its normals
against N(0, 1), in the tests.

Normals come from Box–Muller on pairs of 32-bit words in float64, then rounded to float32: the tail is cut at
sqrt(2 * 32 * ln 2) = 6.66 (torch's CPU ``randn`` draws float32 uniforms and cuts near 5.8), a total-variation
distance from N(0, 1) below 1e-10 per coordinate.

Integers are held in int64 tensors with values in [0, 2^32): the 32 x 32 -> 64-bit products are split into
16-bit halves so that no intermediate exceeds 2^50, which keeps every operation exact on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK = 0xFFFF_FFFF
_MULTIPLIERS = (0xD251_1F53, 0xCD9E_8D57)
_KEY_BUMPS = (0x9E37_79B9, 0xBB67_AE85)
ROUNDS = 10

Word = Tensor | int


def _mulhilo(a: Tensor, multiplier: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of ``a * multiplier`` for ``a`` in [0, 2^32), without 64-bit overflow."""
    low_part = a * (multiplier & 0xFFFF)  # < 2^48
    high_part = a * (multiplier >> 16)  # < 2^48, weight 2^16
    middle = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    return (high_part >> 16) + (middle >> 32), middle & _MASK


def philox4x32(counter: Sequence[Word], key: Sequence[Word], rounds: int = ROUNDS) -> tuple[Tensor, ...]:
    """The four 32-bit output words of Philox4x32 for (``counter``, ``key``), elementwise and broadcast.

    ``counter`` is four words and ``key`` two; each may be a Python int or an int64 tensor of values in
    [0, 2^32), and tensors broadcast against each other.
    """
    c0, c1, c2, c3 = (torch.as_tensor(w, dtype=torch.int64) for w in counter)
    k0, k1 = (torch.as_tensor(w, dtype=torch.int64) for w in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _KEY_BUMPS[0]) & _MASK, (k1 + _KEY_BUMPS[1]) & _MASK
        hi0, lo0 = _mulhilo(c0, _MULTIPLIERS[0])
        hi1, lo1 = _mulhilo(c2, _MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def standard_normal(key0: Tensor, key1: Tensor, sample: Tensor, width: int) -> Tensor:
    """Rows of ``width`` N(0, 1) float32 draws: row r is draw ``sample[r]`` of the stream keyed ``(key0[r],
    key1[r])``.

    ``key0``, ``key1`` and ``sample`` are int64 tensors of shape (R,) (a key may be (1,), shared by all rows),
    on the device the noise is wanted on.
    Element e of a draw comes from counter (e // 4, sample mod 2^32, sample // 2^32, 0), so a draw does not
    depend on which rows surround it, and a stream's first draws are the same however they are batched.
    """
    groups = torch.arange((width + 3) // 4, dtype=torch.int64, device=sample.device)
    words = philox4x32((groups, (sample & _MASK)[:, None], (sample >> 32)[:, None], 0), (key0[:, None], key1[:, None]))
    # Box–Muller on (w0, w1) and (w2, w3): u in (0, 1] so the logarithm is finite, angle in [0, 2 pi)
    scale = 1.0 / 2.0**32
    normals = []
    for radius_word, angle_word in ((words[0], words[1]), (words[2], words[3])):
        radius = torch.sqrt(-2.0 * torch.log((radius_word.double() + 1.0) * scale))
        angle = (2.0 * math.pi * scale) * angle_word.double()
        normals += [radius * torch.cos(angle), radius * torch.sin(angle)]
    return torch.stack(normals, dim=-1).flatten(1)[:, :width].float()


class PhiloxStream:
    """One input's (or one shared-noise group's) noise stream: a 64-bit Philox key and the number of draws
    taken so far, the counter-based stand-in for a ``torch.Generator`` in the samplers."""

    def __init__(self, key: tuple[int, int]) -> None:
        if not all(0 <= k <= _MASK for k in key):
            raise ValueError(f"Philox key words must be 32-bit, got {key}")
        self.key = (int(key[0]), int(key[1]))
        self.position = 0

    @classmethod
    def from_key(cls, key: int) -> PhiloxStream:
        """The stream of 64-bit key ``key`` (a run's streams are distinct keys:
        :class:`~certkit.smoothing.samplers.StreamKey`)."""
        return cls((key & 0xFFFF_FFFF, key >> 32))

    @classmethod
    def from_global_rng(cls) -> PhiloxStream:
        """A stream keyed from torch's global generator: what a call given no stream draws from (so
        ``torch.manual_seed`` makes it reproducible, as it does for the torch generators)."""
        k0, k1 = torch.randint(0, 2**32, (2,), dtype=torch.int64).tolist()
        return cls((k0, k1))

    def key_tensors(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """The key's two words as int64 tensors of shape (1,), broadcasting over any number of rows."""
        return tuple(torch.tensor([k], dtype=torch.int64, device=device) for k in self.key)  # type: ignore[return-value]

    def take(self, count: int) -> int:
        """Reserve the next ``count`` draws; returns the number of the first."""
        first = self.position
        self.position += int(count)
        return first

    def __repr__(self) -> str:
        return f"PhiloxStream(key=({self.key[0]:#010x}, {self.key[1]:#010x}), position={self.position})"
