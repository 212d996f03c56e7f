"""Randomized smoothing: Cohen et al.'s PREDICT and CERTIFY, batched over inputs, with an adaptive option.

Paper: Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019.
Reference code: ``locuslab/smoothing`` ``code/core.py``; this module keeps its shape on purpose so a reader
can check it against the paper's pseudocode line by line:

* :meth:`Smooth._sample_noise` is ``SAMPLEUNDERNOISE`` (hard-vote counts over noisy copies),
* :meth:`Smooth.predict` is ``PREDICT``, :meth:`Smooth.certify` is ``CERTIFY``,
* the statistics (:func:`lower_confidence_bound`, :func:`radius`, :func:`predict_from_counts`,
  :func:`certify_from_counts`) are small pure functions in plain sight.

Threat model: L2. The smoothed classifier is g(x) = argmax_c P(f(x + eta) = c), eta ~ N(0, sigma^2 I), with
noise added in [0, 1] pixel space (normalization is the model's first layer), so sigma and every radius are
pixel-space L2 distances.

Speed without changing the algorithm: several inputs are certified together by stacking their noisy copies
in one forward batch (:meth:`Smooth.certify_batch`), noise is written straight into one preallocated buffer,
votes are counted with one ``bincount`` per forward batch on the device and copied to the host once.

Reproducibility: each input draws its noise from its own generator (:func:`input_generator` seeds it from
``(seed, idx)``) in fixed blocks of :data:`NOISE_BLOCK` copies, in the same order whether it is certified
alone or together with others. Results therefore do not depend on how many inputs share a forward batch,
on sharding or on the resume point, nor on ``batch_size`` as long as it is at least ``NOISE_BLOCK`` (a smaller
batch size draws smaller blocks).

Shared noise (opt-in, ``Smooth(..., shared_noise=G)``): up to G inputs vote on the *same* noise draws, taken
from one generator. Each input's draws are still i.i.d. N(0, sigma^2 I) and its selection draws are still
independent of its estimation draws, so every certificate keeps its (1 - alpha) guarantee unchanged; what
is given up is independence *between* the certificates of one group. The gain: the first layer is affine,
so it runs once per input and once per draw instead of once per pair (:mod:`certkit.models.stem`).

Example::

    smoothed = Smooth(model, num_classes=10, sigma=0.25)
    label, r = smoothed.certify(x, n0=100, n=100_000, alpha=0.001, batch_size=1000)
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.objectives.base import check_sigma
from certkit.models.stem import StemSplit, outer_sum, split_stem, structure_key

#: the class returned when the smoothed classifier declines to answer
ABSTAIN = -1

#: noise is drawn per input in blocks of this many copies; 100 divides the usual n0 and n exactly
NOISE_BLOCK = 100

#: below this agreement with fp32 votes at any checked input, a run with speed options (amp, channels_last,
#: compile, the stem split) is refused
MIN_VOTE_AGREEMENT = 0.99


# ----------------------------------------------------------------------------------------------------------
# Statistics: pure functions of the vote counts.
# ----------------------------------------------------------------------------------------------------------


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from ``n_a`` successes in ``n`` trials.

    It is the alpha-quantile of Beta(n_a, n - n_a + 1); the reference gets the same number as the lower end
    of a *two-sided* interval at level 2*alpha. The quantile is undefined at n_a = 0 (bound 0), and at
    n_a = n it has the closed form alpha^(1/n), computed directly because it is the case that sets the
    maximum radius.
    """
    if n_a <= 0:
        return 0.0
    if n_a >= n:
        return math.exp(math.log(alpha) / n)
    return float(beta.ppf(alpha, n_a, n - n_a + 1))


def upper_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound: the (1 - alpha)-quantile of Beta(n_a + 1, n - n_a).

    Used only by the adaptive schedule to decide when sampling more cannot help; it never enters a
    certificate, so its level does not affect the guarantee.
    """
    if n_a >= n:
        return 1.0
    if n_a <= 0:
        return -math.expm1(math.log(alpha) / n)
    return float(beta.isf(alpha, n_a + 1, n - n_a))


def radius(sigma: float, p_lower: float) -> float:
    """Certified L2 radius sigma * Phi^-1(pA_lower).

    The general radius sigma/2 * (Phi^-1(pA) - Phi^-1(pB)) reduces to this with pB <= 1 - pA_lower. For
    p_lower near 1, ``norm.isf(1 - p)`` keeps the tail precision that ``norm.ppf(p)`` would lose.
    """
    return float(sigma * norm.isf(1.0 - p_lower))


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius CERTIFY can ever return with n samples: all votes for one class give pA_lower =
    alpha^(1/n), so R_max = sigma * Phi^-1(alpha^(1/n)). A radius above it is a bug."""
    return float(sigma * norm.isf(-math.expm1(math.log(alpha) / n)))


def min_n_certify(alpha: float) -> int:
    """Smallest n at which CERTIFY can certify at all: alpha^(1/n) >= 1/2  <=>  n >= log2(1/alpha)."""
    return max(1, math.ceil(math.log2(1.0 / alpha) - 1e-12))


def min_n_predict(alpha: float) -> int:
    """Smallest n at which PREDICT can answer: n unanimous votes give p-value 2 * 2^-n <= alpha  <=>
    n >= log2(2/alpha). Below it PREDICT always abstains (``locuslab/smoothing`` issue #8)."""
    return max(1, math.ceil(math.log2(2.0 / alpha) - 1e-12))


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT's test: top two classes c1, c2 with counts n1 >= n2; answer c1 iff the two-sided binomial
    test of n1 successes in n1 + n2 trials at p = 1/2 has p-value <= alpha (ties give p = 1: abstain)."""
    order = np.argsort(-np.asarray(counts), kind="stable")
    c1, c2 = int(order[0]), int(order[1])
    n1, n2 = int(counts[c1]), int(counts[c2])
    if binomtest(n1, n1 + n2, 0.5).pvalue > alpha:
        return ABSTAIN
    return c1


def certify_from_counts(c_hat: int, n_a: int, n: int, alpha: float, sigma: float) -> tuple[int, float, float]:
    """CERTIFY's test on the *estimation* counts: returns (class or ABSTAIN, radius, pA_lower).

    Abstains only when pA_lower < 1/2 (strict, as the reference); pA_lower = 1/2 certifies radius 0.
    """
    p_lower = lower_confidence_bound(n_a, n, alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0, p_lower
    return c_hat, radius(sigma, p_lower), p_lower


# ----------------------------------------------------------------------------------------------------------
# Argument checks and seeding.
# ----------------------------------------------------------------------------------------------------------


#: most samples per input: 10^9 already takes hours per image on a GPU, and counts beyond it would be
#: accumulated into arrays and binomial bounds far from anything tested
MAX_SAMPLES = 10**9
#: seeds feed NumPy's SeedSequence and torch.manual_seed, which take non-negative 63-bit integers
MAX_SEED = 2**63 - 1


#: largest failure probability: above it the bound alpha^(1/n) of n unanimous votes rounds to 1 for large n
#: (at alpha = 1 - 1e-12 and n = 10^9), which would publish an infinite radius
MAX_ALPHA = 0.5


def check_alpha(alpha: float) -> None:
    """alpha a normal float in (0, 1/2]: a denormal (e.g. 1e-320) overflows the bounds' 1/alpha terms."""
    if not (sys.float_info.min <= alpha <= MAX_ALPHA):
        raise CertkitError(
            f"--alpha must be a number in (0, {MAX_ALPHA}], at least {sys.float_info.min:.3g} (got {alpha})"
        )


def check_sample_count(name: str, value: int) -> None:
    if not 1 <= value <= MAX_SAMPLES:
        raise CertkitError(f"--{name} must be an integer in 1..{MAX_SAMPLES:,} samples per input (got {value})")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise CertkitError(f"--seed must be an integer in 0..2^63-1 (got {seed})")


def check_certify_args(n0: int, n: int, alpha: float) -> None:
    """Refuse settings under which CERTIFY could never return a certificate, before any sampling."""
    check_alpha(alpha)
    check_sample_count("n0", n0)
    check_sample_count("n", n)
    if n < min_n_certify(alpha):
        raise CertkitError(
            f"n = {n} can never certify at alpha = {alpha}: CERTIFY needs n >= {min_n_certify(alpha)}"
        )


def check_predict_args(n: int, alpha: float) -> None:
    check_alpha(alpha)
    check_sample_count("n", n)
    if n < min_n_predict(alpha):
        raise CertkitError(
            f"n = {n} always abstains at alpha = {alpha}: PREDICT needs n >= {min_n_predict(alpha)}"
        )


def input_generator(seed: int, idx: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for the noise of dataset index ``idx`` under run seed ``seed``.

    Seeding per input, rather than one stream for the run, is what makes a result independent of batch
    size, shard count and resume point. ``(seed, idx)`` goes through NumPy's SeedSequence so neighbouring
    indices get unrelated streams (``seed + idx`` would make run 1's input 0 equal run 0's input 1).
    """
    return _seeded_generator(np.random.SeedSequence([int(seed), int(idx)]), device)


def shared_generator(seed: int, group: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The one generator of shared-noise group ``group`` under run seed ``seed`` (``Smooth(shared_noise=G)``).

    A separate family from :func:`input_generator` (its own spawn key), so a group's stream is never the
    stream of some single input.
    """
    return _seeded_generator(np.random.SeedSequence([int(seed), int(group)], spawn_key=(1,)), device)


def check_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the speed-option vote check (:meth:`Smooth.vote_agreement`) under run seed ``seed``.

    A family of its own (spawn key 2), so the check never replays the draws that certify an input: a
    speed option tuned, or lucky, on those draws would otherwise pass on exactly the votes that count.
    """
    return _seeded_generator(np.random.SeedSequence([int(seed)], spawn_key=(2,)), device)


def _seeded_generator(seeds: np.random.SeedSequence, device: torch.device | str) -> torch.Generator:
    state = seeds.generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


# ----------------------------------------------------------------------------------------------------------
# Adaptive sampling.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptiveSchedule:
    """Stop sampling an input as soon as more samples cannot change its certificate much.

    Method (a union bound over a fixed schedule of looks). The estimation samples are examined at the
    stages n_1 < n_2 < ... < n_K = n (n_k = ceil(n / 2^(K-k)), the first at least ``first_stage``). At stage
    k the Clopper-Pearson lower bound L_k on the first n_k estimation samples is taken at level alpha_k, with
    alpha_K = ``final_share`` * alpha and the rest split evenly over the K - 1 earlier looks, so
    sum_k alpha_k = alpha. Proof of the (1 - alpha) guarantee: the failure events E_k = {L_k > pA} satisfy
    P(E_k) <= alpha_k (Clopper & Pearson 1934, exact for each fixed n_k, and the selection class comes from
    independent samples), hence P(some E_k) <= sum_k alpha_k = alpha (Boole/Bonferroni). Outside that event
    *every* L_k is a valid bound at once, so reporting the L_k of a data-dependent stopping stage is valid:
    the stopping rule may look at anything. This is the classical argument for repeated significance tests
    with a Bonferroni-split alpha; it needs no independence between looks.

    Stopping rule (affects cost and radius, never soundness). At stage k < K, with projected vote
    fraction p_hi = the ``projection_alpha`` Clopper-Pearson upper bound (the default 0.5 is about the
    median estimate; smaller values are more optimistic and sample longer), the radius that fixed-n sampling at
    n would most favourably give is R_best = radius of L(p_hi * n, n, alpha_K). Stop when
    R_best - R_k <= ``tolerance`` * sigma, R_k being the radius certifiable now (0 if L_k < 1/2). This stops
    early both when the input will clearly abstain (p_hi < 1/2 gives R_best = 0) and when the attainable
    gain is small. Inputs whose votes are unanimous gain the most from more samples (R_max grows with n),
    so they run to n: that is the price of losing at most ``tolerance`` * sigma per input. The ACR cost is
    therefore at most ``tolerance`` * sigma per stopped input. Choose it relative to your ACR.

    What to expect (n = 100,000, alpha = 0.001, default settings): 1.49x fewer samples at -0.52% ACR on a
    Gaussian-trained Fashion-MNIST MLP, sigma = 0.25, 150 test images (``benchmarks/adaptive.py``); replaying
    binomial votes drawn from the published Fashion-MNIST LeNet files: 1.38x at -0.47% (Cohen, sigma = 0.25),
    1.79x at -0.85% (Cohen, sigma = 0.5), 1.21x at -0.26% (SmoothMix, sigma = 0.25). A larger ``tolerance``
    buys more (0.1: about 1.6x at sigma = 0.25) at more than 1% ACR at sigma = 0.5. The ceiling is set by the
    unanimous inputs: an input whose n votes all agree certifies sigma * Phi^-1(alpha^(1/n)), and stopping it at
    n/2 already loses about 4.5% of its radius, so with 40-60% of the inputs unanimous (Fashion-MNIST at
    sigma = 0.25) no schedule keeps the ACR within 1% with 2x fewer samples; even an oracle that knows each
    input's vote probability and label reaches only ~1.9x (computed in ``benchmarks/adaptive.py``). On the
    21 published Fashion-MNIST certifications (``benchmarks/adaptive.py --published``) that oracle bound is
    1.5-1.8x at sigma = 0.25, 1.9-2.5x at 0.5 and 3.1-3.4x at 1.0, where almost no input is unanimous.
    """

    first_stage: int = 1000
    final_share: float = 0.9
    tolerance: float = 0.05
    projection_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.first_stage < 1:
            raise CertkitError(f"adaptive first stage must be >= 1 (got {self.first_stage})")
        if not (0.0 < self.final_share <= 1.0):
            raise CertkitError(f"adaptive final share must be in (0, 1] (got {self.final_share})")
        if self.tolerance < 0:
            raise CertkitError(f"adaptive tolerance must be >= 0 (got {self.tolerance})")
        check_alpha(self.projection_alpha)

    def stages(self, n: int) -> list[int]:
        """n_1 < ... < n_K = n, halving from n while the stage stays >= ``first_stage``."""
        stages = [n]
        while math.ceil(stages[0] / 2) >= self.first_stage and stages[0] > 1:
            stages.insert(0, math.ceil(stages[0] / 2))
        return stages

    def alphas(self, alpha: float, num_stages: int) -> list[float]:
        """Per-look levels summing to alpha: ``final_share`` of it on the last look, the rest shared evenly."""
        if num_stages == 1:
            return [alpha]
        early = alpha * (1.0 - self.final_share) / (num_stages - 1)
        return [early] * (num_stages - 1) + [alpha * self.final_share]

    def decide(
        self, c_hat: int, n_a: int, k: int, stages: Sequence[int], alphas: Sequence[float], sigma: float
    ) -> tuple[int, float, float] | None:
        """Look ``k`` (0-based) at an input with ``n_a`` of its first ``stages[k]`` estimation votes for the
        selected class ``c_hat``: its certificate (class or ABSTAIN, radius, pA_lower) if it stops here, None
        if it samples on. The last look always stops."""
        prediction, r, p_lower = certify_from_counts(c_hat, n_a, stages[k], alphas[k], sigma)
        if k < len(stages) - 1:
            p_hi = upper_confidence_bound(n_a, stages[k], self.projection_alpha)
            best = _projected_radius(p_hi, stages[-1], alphas[-1], sigma)
            if best - r > self.tolerance * sigma:
                return None
        return prediction, r, p_lower

    def as_dict(self) -> dict[str, float]:
        return {
            "first_stage": self.first_stage,
            "final_share": self.final_share,
            "tolerance": self.tolerance,
            "projection_alpha": self.projection_alpha,
        }


def _projected_radius(p: float, n: int, alpha: float, sigma: float) -> float:
    """The radius fixed-n CERTIFY would report if exactly a fraction p of its n votes went to the class."""
    p_lower = lower_confidence_bound(int(round(p * n)), n, alpha)
    return radius(sigma, p_lower) if p_lower >= 0.5 else 0.0


# ----------------------------------------------------------------------------------------------------------
# The smoothed classifier.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer for one input, with what it cost.

    ``prediction`` is the certified class or ABSTAIN; ``radius`` is 0.0 on abstain; ``samples`` counts every
    noisy forward pass spent on the input (n0 selection plus the estimation samples actually drawn).
    """

    prediction: int
    radius: float
    p_lower: float
    samples: int


class NonFiniteLogits(CertkitError):
    """The network returned NaN or inf on a noisy copy: its votes would be meaningless."""


class Smooth:
    """The smoothed classifier g of a base classifier ``model``.

    Args:
        model: maps a float batch (B, C, H, W) in [0, 1] to logits (B, num_classes); normalization must be
            its first layer. It is put in eval mode for each call and its mode is restored afterwards.
        num_classes: number of classes K.
        sigma: noise level (> 0), in [0, 1] pixel units.
        channels_last: feed the network channels-last batches through a channels-last *copy* of it, made
            here (the caller's model is left as it is, and stays the fp32 reference). Faster convolutions on
            CUDA tensor cores, and on CPU too for small convolutional nets (oneDNN: LeNet about 1.5x). The noise
            is drawn exactly as without it.
        amp: CUDA only; ``"bf16"`` or ``"fp16"`` autocast for the forward pass (``None`` or ``"off"``: fp32).
            The certificate is then about the reduced-precision base classifier, which is a fixed function
            like any other, so the (1 - alpha) guarantee holds for *it*; whether it is still the network you
            trained is what :meth:`vote_agreement` measures (:func:`certkit.certify.certify_dataset` runs it
            on a sample and refuses to go on below :data:`MIN_VOTE_AGREEMENT`). On CPU ``amp`` is refused
            with a :class:`CertkitError`: CPU autocast would change the classifier for little or no speed.
        compile: wrap the network in ``torch.compile``; the last, partial batch is padded so that every
            forward pass has one shape (the first call pays the compilation, tens of seconds on CPU).
        shared_noise: 0 (default) gives every input its own noise stream. G >= 1 lets up to G inputs of one
            call vote on the same draws from one generator (pass one generator for them all). When the model
            starts with an affine stem that the split computes exactly (:func:`~certkit.models.stem.split_stem`:
            known classes only, no forward hooks; checked again on every call, so a hook added later turns
            the split off), its first layer then runs once per input and once per draw instead of once per
            (input, draw) pair; on LeNet-sized nets that is most of the forward pass. Every certificate keeps its (1 - alpha) guarantee, since each
            input's draws are still i.i.d. and its selection and estimation draws independent; certificates
            of inputs in one group are no longer independent *of each other* (a group's wrong certificates,
            each of probability <= alpha, may coincide). The split path is rounded differently from the
            plain model, so it counts as a speed option for :meth:`vote_agreement`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        channels_last: bool = False,
        amp: str | None = None,
        compile: bool = False,
        shared_noise: int = 0,
    ) -> None:
        check_sigma(sigma)
        if num_classes < 2:
            raise CertkitError(f"num_classes must be >= 2 (got {num_classes})")
        self.model = model
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        param = next(iter(model.parameters()), None)
        self.device = param.device if param is not None else torch.device("cpu")
        if amp == "off":
            amp = None
        if amp not in (None, "bf16", "fp16"):
            raise CertkitError(f"amp must be 'off', 'bf16' or 'fp16' (got {amp!r})")
        if amp and self.device.type != "cuda":
            raise CertkitError(
                f"amp {amp} is a CUDA-only speed option, but the model is on {self.device}; certify without it "
                "(on CPU certkit votes in fp32)"
            )
        self.channels_last = channels_last
        self.amp_dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.compiled = compile
        # the network that votes; self.model stays untouched as the fp32 reference of vote_agreement
        self._voter = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model
        self._net: nn.Module = torch.compile(self._voter, dynamic=False) if compile else self._voter
        self._buffer: Tensor | None = None
        if shared_noise < 0:
            raise CertkitError(f"shared_noise must be >= 0 (got {shared_noise})")
        self.shared_noise = int(shared_noise)
        self._stem: StemSplit | None = None
        self._stem_key: object = None
        self._refresh_stem()
        # with shared noise the votes come from _combine(image part, noise part), compiled as one graph
        self._combine_fn = torch.compile(self._combine, dynamic=False) if compile and shared_noise else self._combine

    @property
    def speed_options(self) -> dict[str, object]:
        """The options that change how the network is run (not what is sampled)."""
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype)  # type: ignore[arg-type]
        self._refresh_stem()
        return {"channels_last": self.channels_last, "amp": amp, "compile": self.compiled, "stem_split": self._stem is not None}

    def __repr__(self) -> str:
        return (
            f"Smooth(model={type(self.model).__name__}, num_classes={self.num_classes}, sigma={self.sigma}, "
            f"channels_last={self.channels_last}, amp={self.amp_dtype}, compile={self.compiled}, "
            f"shared_noise={self.shared_noise})"
        )

    # --- Cohen et al.'s three procedures, one input at a time --------------------------------------------

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int, generator: torch.Generator | None = None) -> int:
        """PREDICT: the smoothed class of ``x`` (C, H, W), or ABSTAIN.

        With probability >= 1 - alpha it returns g(x) or abstains.
        """
        return self.predict_batch(x.unsqueeze(0), n, alpha, batch_size, [generator])[0]

    def certify(
        self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[int, float]:
        """CERTIFY: (class, radius) or (ABSTAIN, 0.0) for one input ``x`` (C, H, W) in [0, 1].

        With probability >= 1 - alpha, if it returns class c with radius R then g(x + delta) = c for every
        ||delta||_2 < R.
        """
        check_certify_args(n0, n, alpha)
        self._check_inputs(x.unsqueeze(0))
        # selection: guess the top class from n0 samples; no statistical test on these
        counts_selection = self._sample_noise(x, n0, batch_size, generator)
        c_hat = int(counts_selection.argmax())
        # estimation: n *new, independent* samples; reusing the n0 would void the guarantee
        counts_estimation = self._sample_noise(x, n, batch_size, generator)
        n_a = int(counts_estimation[c_hat])
        prediction, r, _ = certify_from_counts(c_hat, n_a, n, alpha, self.sigma)
        return prediction, r

    def _sample_noise(self, x: Tensor, num: int, batch_size: int, generator: torch.Generator | None = None) -> np.ndarray:
        """SAMPLEUNDERNOISE: hard-vote counts (K,) of f(x + eta) over ``num`` noisy copies of x."""
        return self._sample_noise_batch(x.unsqueeze(0), [num], batch_size, [generator])[0]

    # --- the same procedures for several inputs at once ----------------------------------------------------

    def predict_batch(
        self,
        xs: Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[int]:
        """PREDICT for each input of ``xs`` (B, C, H, W); input i draws its noise from ``generators[i]``."""
        check_predict_args(n, alpha)
        xs, generators = self._prepare(xs, generators)
        counts = self._sample_noise_batch(xs, [n] * len(xs), batch_size, generators)
        return [predict_from_counts(c, alpha) for c in counts]

    def certify_batch(
        self,
        xs: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generators: Sequence[torch.Generator | None] | None = None,
        adaptive: AdaptiveSchedule | None = None,
    ) -> list[Certificate]:
        """CERTIFY for each input of ``xs`` (B, C, H, W), their noisy copies sharing forward batches.

        Given the same per-input generators, the decisions equal those of :meth:`certify` called one input at
        a time: each input draws the same noise blocks from its own generator in the same order (all
        selection blocks, then all estimation blocks). With ``adaptive``, each input stops at the first stage
        of the schedule where its certificate is settled (see :class:`AdaptiveSchedule`); ``n`` is then the
        most estimation samples any input may use.
        """
        check_certify_args(n0, n, alpha)
        xs, generators = self._prepare(xs, generators)
        num_inputs = len(xs)

        # selection, from n0 samples per input
        counts_selection = self._sample_noise_batch(xs, [n0] * num_inputs, batch_size, generators)
        c_hat = counts_selection.argmax(axis=1)

        if adaptive is None:
            # estimation, from n independent samples per input
            counts_estimation = self._sample_noise_batch(xs, [n] * num_inputs, batch_size, generators)
            certificates = []
            for i in range(num_inputs):
                n_a = int(counts_estimation[i, c_hat[i]])
                prediction, r, p_lower = certify_from_counts(int(c_hat[i]), n_a, n, alpha, self.sigma)
                certificates.append(Certificate(prediction, r, p_lower, n0 + n))
            return certificates
        return self._certify_adaptive(xs, c_hat, n0, n, alpha, batch_size, generators, adaptive)

    def _certify_adaptive(
        self,
        xs: Tensor,
        c_hat: np.ndarray,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generators: list[torch.Generator | None],
        schedule: AdaptiveSchedule,
    ) -> list[Certificate]:
        """Estimation in stages; see :class:`AdaptiveSchedule` for the method and its proof."""
        stages = schedule.stages(n)
        alphas = schedule.alphas(alpha, len(stages))
        if stages[-1] < min_n_certify(alphas[-1]):
            raise CertkitError(
                f"n = {n} cannot certify at the adaptive final level {alphas[-1]:.3g}: "
                f"needs n >= {min_n_certify(alphas[-1])}"
            )
        num_inputs = len(xs)
        n_a = np.zeros(num_inputs, dtype=np.int64)
        drawn = 0
        active = list(range(num_inputs))
        results: list[Certificate | None] = [None] * num_inputs
        for k, n_k in enumerate(stages):
            # draw the next n_k - n_{k-1} estimation samples of every input still sampling
            # (shared noise: the inputs still sampling go on drawing from the one shared stream)
            gens = generators if self.shared_noise else [generators[i] for i in active]
            counts = self._sample_noise_batch(xs[active], [n_k - drawn] * len(active), batch_size, gens)
            drawn = n_k
            still_active = []
            for row, i in enumerate(active):
                n_a[i] += counts[row, c_hat[i]]
                decision = schedule.decide(int(c_hat[i]), int(n_a[i]), k, stages, alphas, self.sigma)
                if decision is None:
                    still_active.append(i)
                else:
                    prediction, r, p_lower = decision
                    results[i] = Certificate(prediction, r, p_lower, n0 + n_k)
            active = still_active
            if not active:
                break
        return [c for c in results if c is not None]

    # --- reduced-precision check ---------------------------------------------------------------------------

    def vote_agreement(self, xs: Tensor, num: int = 1000, seed: int = 0, batch_size: int | None = None) -> np.ndarray:
        """Per input of ``xs`` (B, C, H, W): the fraction of ``num`` noisy copies whose vote under this
        configuration (``amp``, ``channels_last``, ``compile``, the stem split) equals the vote of the plain
        fp32 model on the same copy.

        The copies come from :func:`check_generator` (``seed``), not from any input's certification stream,
        in forward batches of ``batch_size`` (default: the size already in use, so a compiled model sees no
        new shape). A certificate is about the classifier that actually votes; agreement below 1 at an
        input bounds how far the options moved its vote probabilities there (by at most the disagreement).
        """
        group = self.shared_noise or max(1, len(xs))  # checked as a run calls it: one noise group at a time
        xs = torch.cat([self._prepare(part, None)[0] for part in xs.split(group)])
        if batch_size is None:
            batch_size = len(self._buffer) if self._buffer is not None else min(num, 1000)
        gen = check_generator(seed, self.device)
        if self.shared_noise:
            return self._shared_vote_agreement(xs, num, batch_size, gen)
        agree = np.zeros(len(xs))
        with self._eval_mode(), torch.inference_mode():
            buffer = self._noise_buffer(batch_size, tuple(xs.shape[1:]))
            for i, x in enumerate(xs):
                for size in _block_sizes(num, batch_size):
                    noisy = buffer[:size]
                    torch.randn(noisy.shape, generator=gen, out=noisy)
                    noisy.mul_(self.sigma).add_(x)
                    reference = self.model(noisy).argmax(1)  # the caller's model: fp32, no autocast, as given
                    agree[i] += int((reference == self._votes(buffer, size)).sum())
        return agree / num

    def _shared_vote_agreement(self, xs: Tensor, num: int, batch_size: int, gen: torch.Generator) -> np.ndarray:
        """:meth:`vote_agreement` for the shared-noise path, in the shapes a run with ``batch_size`` uses."""
        self._refresh_stem()
        block, members, per_pass = self._shared_shape(batch_size)
        agree = np.zeros(len(xs))
        with self._eval_mode(), torch.inference_mode():
            eps = self._noise_buffer(per_pass * block, tuple(xs.shape[1:]))
            for first in range(0, len(xs), self.shared_noise):
                group = xs[first : first + self.shared_noise]
                images = self._image_part(group)
                for used in _block_sizes(num, len(eps)):
                    torch.randn((used, *xs.shape[1:]), generator=gen, out=eps[:used])
                    reference = torch.stack([self.model(eps[:used] * self.sigma + x).argmax(1) for x in group])
                    fast = self._shared_votes(images, eps, used, members)
                    agree[first : first + len(group)] += (reference == fast).sum(1).cpu().numpy()
        return agree / num

    # --- sampling engine ------------------------------------------------------------------------------------

    def _prepare(
        self, xs: Tensor, generators: Sequence[torch.Generator | None] | None
    ) -> tuple[Tensor, list[torch.Generator | None]]:
        if xs.dim() != 4:
            raise CertkitError(f"expected a batch of images (B, C, H, W), got shape {tuple(xs.shape)}")
        self._check_inputs(xs)
        if self.shared_noise:
            gens = list(generators) if generators is not None else [None]
            if len(gens) != 1:
                raise CertkitError(f"with shared noise, pass one generator for all inputs (got {len(gens)})")
            if len(xs) > self.shared_noise:
                raise CertkitError(f"shared_noise={self.shared_noise} allows at most that many inputs per call, got {len(xs)}")
            return xs.to(self.device, torch.float32), gens
        gens = list(generators) if generators is not None else [None] * len(xs)
        if len(gens) != len(xs):
            raise CertkitError(f"{len(xs)} inputs but {len(gens)} generators")
        return xs.to(self.device, torch.float32), gens

    @staticmethod
    def _check_inputs(xs: Tensor) -> None:
        if not torch.isfinite(xs).all():
            raise CertkitError("input contains NaN or inf values")

    def _sample_noise_batch(
        self, xs: Tensor, nums: Sequence[int], batch_size: int, generators: Sequence[torch.Generator | None]
    ) -> np.ndarray:
        """Hard-vote counts (B, K): ``nums[i]`` noisy copies of ``xs[i]``, noise from ``generators[i]``.

        Each input's copies are cut into blocks of ``min(NOISE_BLOCK, batch_size)`` (the last one shorter);
        forward batches are filled with whole blocks, so memory is bounded by ``batch_size`` whatever the
        ``nums`` are, and an input's noise never depends on which other inputs share its batches.
        """
        if batch_size < 1:
            raise CertkitError(f"batch size must be >= 1 (got {batch_size})")
        xs = xs.to(self.device, torch.float32)
        if self.shared_noise:
            return self._sample_shared(xs, nums, batch_size, generators[0])
        num_inputs, k = len(xs), self.num_classes
        block = min(NOISE_BLOCK, batch_size)
        blocks = [(i, size) for i, num in enumerate(nums) for size in _block_sizes(num, block)]
        counts = torch.zeros(num_inputs * k, dtype=torch.int64, device=self.device)
        with self._eval_mode(), torch.inference_mode():
            buffer = self._noise_buffer(batch_size, tuple(xs.shape[1:]))
            for batch_blocks in _pack(blocks, batch_size):
                # standard normal noise, block by block from each input's own generator; an input's blocks
                # are consecutive in the batch, so it owns one run of rows
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
                ).to(self.device)
                votes = self._votes(buffer, used)
                counts += torch.bincount(owners * k + votes, minlength=num_inputs * k)
        return counts.view(num_inputs, k).cpu().numpy().astype(np.int64)

    def _sample_shared(
        self, xs: Tensor, nums: Sequence[int], batch_size: int, generator: torch.Generator | None
    ) -> np.ndarray:
        """Hard-vote counts (B, K) when every input votes on the same ``nums[0]`` draws from ``generator``.

        The draws come in the same blocks of ``min(NOISE_BLOCK, batch_size)`` as an unshared input's, so an
        input's noise is the stream's first draws whatever the group. A forward pass holds several blocks for
        a few inputs, or one block for as many inputs as fit.
        """
        if len(set(nums)) > 1:
            raise CertkitError("inputs that share noise must draw the same number of samples")
        num_inputs, k = len(xs), self.num_classes
        self._refresh_stem()
        block, members, per_pass = self._shared_shape(batch_size)
        sizes = _block_sizes(nums[0], block)
        counts = torch.zeros(num_inputs * k, dtype=torch.int64, device=self.device)
        owners = torch.arange(num_inputs, device=self.device).unsqueeze(1) * k
        with self._eval_mode(), torch.inference_mode():
            images = self._image_part(xs)
            eps = self._noise_buffer(per_pass * block, tuple(xs.shape[1:]))
            for start in range(0, len(sizes), per_pass):
                used = 0
                for size in sizes[start : start + per_pass]:
                    torch.randn((size, *xs.shape[1:]), generator=generator, out=eps[used : used + size])
                    used += size
                votes = self._shared_votes(images, eps, used, members)
                counts += torch.bincount((owners + votes).flatten(), minlength=num_inputs * k)
        return counts.view(num_inputs, k).cpu().numpy().astype(np.int64)

    def _refresh_stem(self) -> None:
        """Split the stem again (or give up the split) whenever the voting network's modules, their classes
        or any forward hook changed since the last split: a hook registered after construction would
        otherwise be skipped by the split, and the votes would no longer be the model's."""
        if not self.shared_noise:
            return
        key = structure_key(self._voter)
        if key != self._stem_key:
            self._stem, self._stem_key = split_stem(self._voter), key

    def _shared_shape(self, batch_size: int) -> tuple[int, int, int]:
        """(block, inputs per forward pass, blocks per forward pass) under shared noise: fixed by the group
        width and batch size only, so a compiled graph sees the same shapes in every call."""
        block = min(NOISE_BLOCK, batch_size)
        members = min(self.shared_noise, max(1, batch_size // block))
        return block, members, max(1, batch_size // (members * block))

    def _image_part(self, xs: Tensor) -> Tensor:
        """What the clean inputs contribute to every noisy copy: the stem's output, or the images."""
        if self.channels_last:  # a convolution keeps its input's layout, so the stem's output is channels-last too
            xs = xs.contiguous(memory_format=torch.channels_last)
        return self._stem.image_part(xs) if self._stem is not None else xs

    def _shared_votes(self, images: Tensor, eps: Tensor, used: int, members: int) -> Tensor:
        """Votes (len(images), used): every image's class on each of the first ``used`` draws of ``eps``,
        ``members`` images per forward pass."""
        draws = eps if self.compiled else eps[:used]  # a compiled graph sees one shape: run the stale tail too
        noise = self._stem.noise_part(draws, self.sigma) if self._stem is not None else draws * self.sigma
        if self.channels_last and noise.dim() == 4:
            noise = noise.contiguous(memory_format=torch.channels_last)
        out = []
        for first in range(0, len(images), members):
            part = images[first : first + members]
            count = len(part)
            if self.compiled and count < members:
                part = torch.cat([part, part.new_zeros((members - count, *part.shape[1:]))])
            votes = self._class_votes(self._combine_fn(part, noise), len(part) * len(noise))
            out.append(votes.view(len(part), -1)[:count, :used])
        return torch.cat(out)

    def _combine(self, images: Tensor, noise: Tensor) -> Tensor:
        """Logits of every (image, draw) pair, image-major: the rest of the network on their sums."""
        channels_last = self.channels_last and not self.compiled  # compiled: the compiler picks layouts
        with self._autocast():
            if self._stem is None:
                logits = self._voter(outer_sum(images, noise, channels_last))
            else:
                logits = self._stem.rest(self._stem.pair_sum(images, noise, channels_last))
        return logits

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode for the caller's model and for the network that votes (a copy under channels_last),
        restored afterwards."""
        modules = [self.model] if self._voter is self.model else [self.model, self._voter]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def _noise_buffer(self, batch_size: int, shape: tuple[int, ...]) -> Tensor:
        """One (batch_size, C, H, W) buffer reused by every forward batch (no allocation per batch)."""
        buf = self._buffer
        if buf is None or buf.shape != (batch_size, *shape):
            # zeros, not empty: a compiled model runs the whole buffer, stale tail included
            buf = torch.zeros((batch_size, *shape), device=self.device)
            self._buffer = buf
        return buf

    def _votes(self, buffer: Tensor, used: int) -> Tensor:
        """argmax class of each of the first ``used`` rows of the buffer."""
        # a compiled model sees one shape only: run the full buffer and ignore the stale tail
        batch = buffer if self.compiled else buffer[:used]
        return self._class_votes(self._forward(batch), len(batch))[:used]

    def _class_votes(self, logits: Tensor, rows: int) -> Tensor:
        """argmax class of each row, once the logits are known to be (rows, K): a wrong shape would
        otherwise spill votes into another input's counts."""
        if logits.shape != (rows, self.num_classes):
            raise CertkitError(
                f"the model returned logits of shape {tuple(logits.shape)}, expected ({rows}, {self.num_classes})"
            )
        if not torch.isfinite(logits).all():  # argmax would count NaN rows as votes for class 0
            raise NonFiniteLogits("the model returned NaN or inf logits; certify only a network with finite outputs")
        return logits.argmax(1)

    def _forward(self, batch: Tensor) -> Tensor:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self._net(batch)


def _block_sizes(num: int, block: int) -> list[int]:
    """``num`` cut into blocks of ``block``, the last one holding the remainder."""
    return [block] * (num // block) + ([num % block] if num % block else [])


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

