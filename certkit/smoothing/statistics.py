"""The statistics of randomized smoothing: pure functions of vote counts, and the adaptive schedule's maths.

Paper: Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019.
Nothing here runs a network or draws noise, so every number a certificate rests on can be checked by hand
(or against ``scipy``): the Clopper-Pearson bounds, the radius sigma * Phi^-1(pA_lower), PREDICT's binomial
test, and the stages and per-look levels of :class:`AdaptiveSchedule`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, binomtest, norm

from certkit.errors import CertkitError

#: the class returned when the smoothed classifier declines to answer
ABSTAIN = -1
#: relative widening of the tail 1 - pA_lower before the radius's quantile: 50 times the error of scipy's
#: beta quantile (see :func:`radius`)
TAIL_MARGIN = 1e-6
#: absolute widening of that tail: one ulp of a float64 in [1/2, 1), covering the rounding of pA_lower
TAIL_ULP = 2.0**-53

# ----------------------------------------------------------------------------------------------------------
# Statistics: pure functions of the vote counts.
# ----------------------------------------------------------------------------------------------------------


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from ``n_a`` successes in ``n`` trials.

    It is the alpha-quantile of Beta(n_a, n - n_a + 1); the reference gets the same number as the lower end
    of a *two-sided* interval at level 2*alpha. The quantile is undefined at n_a = 0 (bound 0), and at
    n_a = n it has the closed form alpha^(1/n), computed directly because it is the case that sets the
    maximum radius. At alpha = 0 the bound is 0 for every count (the 0-quantile, and the limit of
    alpha^(1/n)): a bound that may never fail can claim nothing. The adaptive schedule's early looks take
    that level when ``final_share`` is 1.
    """
    if n_a <= 0 or alpha <= 0:
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
    """Certified L2 radius sigma * Phi^-1(pA_lower), rounded down below the exact value of the bound.

    The general radius sigma/2 * (Phi^-1(pA) - Phi^-1(pB)) reduces to this with pB <= 1 - pA_lower. For
    p_lower near 1, ``norm.isf(1 - p)`` keeps the tail precision that ``norm.ppf(p)`` would lose.

    Why the tail is widened first: the computed ``p_lower`` is not a lower bound on the exact one. It is
    rounded to the *nearest* float64, half an ulp, which near 1 is a large share of a small tail (up to 8e-8
    of the tail 7e-10 of unanimous votes at n = 10^9, alpha = 1/2), and scipy's beta quantile (Boost's
    ``ibeta_inv``, whose iteration may stop at half the float digits) is off by up to about 2e-8 of the
    tail; either way the radius came out above the exact one in about half of the cases checked against
    40-digit arithmetic (``tests/test_statistics.py``). ``1 - p_lower`` is exact (p_lower >= 1/2), so the
    tail is raised by :data:`TAIL_ULP` (one ulp of any p in [1/2, 1), covering the rounding) and by the
    relative :data:`TAIL_MARGIN`, fifty times the quantile's error, which also covers the rounding of ``isf``
    and of the product (a relative tail change m moves Phi^-1 by about m / z^2 relative, and z stays below
    6.2 for every n <= :data:`MAX_SAMPLES`, so the margin lowers the radius by over 2e-8 relative, against
    roundings of 1e-15). The cost is at most 1.3e-6 sigma. Where the widened tail passes 1/2 (p_lower within
    about 1e-6 of 1/2) the radius is 0, which claims nothing.
    """
    tail = (1.0 - p_lower) * (1.0 + TAIL_MARGIN) + TAIL_ULP
    return max(0.0, float(sigma * norm.isf(tail)))


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius CERTIFY can ever return with n samples: all votes for one class give pA_lower =
    alpha^(1/n), so R_max = sigma * Phi^-1(alpha^(1/n)), through the same rounding as every radius. A radius
    above it is a bug."""
    return radius(sigma, lower_confidence_bound(n, n, alpha))


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
# Argument checks.
# ----------------------------------------------------------------------------------------------------------


#: most samples per input: 10^9 already takes hours per image on a GPU, and counts beyond it would be
#: accumulated into arrays and binomial bounds far from anything tested
MAX_SAMPLES = 10**9
#: seeds feed NumPy's SeedSequence and torch.manual_seed, which take non-negative 63-bit integers
MAX_SEED = 2**63 - 1
#: largest failure probability: above it the bound alpha^(1/n) of n unanimous votes rounds to 1 for large n
#: (at alpha = 1 - 1e-12 and n = 10^9), which would publish an infinite radius
MAX_ALPHA = 0.5
#: largest noise level: 100 times the [0, 1] pixel range, where noise already drowns any image and radii
#: (at most about 6 sigma) stay far inside what result files accept
MAX_SIGMA = 100.0
#: most noisy copies per forward pass: a million 224x224 colour copies are already 600 GB of float32
MAX_BATCH = 10**6


def check_sigma(sigma: float | None) -> float:
    """The one check of a smoothing noise level, for training and certification alike."""
    if sigma is None or isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= MAX_SIGMA:
        raise CertkitError(f"--sigma must be a number in (0, {MAX_SIGMA:g}] in [0, 1] pixel units (got {sigma})")
    return float(sigma)


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
        raise CertkitError(f"n = {n} can never certify at alpha = {alpha}: CERTIFY needs n >= {min_n_certify(alpha)}")


def check_batch_size(batch_size: int) -> None:
    if not 1 <= batch_size <= MAX_BATCH:
        raise CertkitError(f"--batch must be in 1..{MAX_BATCH:,} noisy copies per forward pass (got {batch_size})")


def check_predict_args(n: int, alpha: float) -> None:
    check_alpha(alpha)
    check_sample_count("n", n)
    if n < min_n_predict(alpha):
        raise CertkitError(f"n = {n} always abstains at alpha = {alpha}: PREDICT needs n >= {min_n_predict(alpha)}")


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

    ``final_share`` = 1 spends all of alpha on the last look: the earlier looks get level 0, where L_k = 0
    (:func:`lower_confidence_bound`) and E_k cannot happen. Such a look certifies nothing (R_k = 0), so it
    stops only inputs whose most favourable projection is R_best <= ``tolerance`` * sigma, as abstentions,
    which are never wrong; every other input runs to n and gets the fixed-n certificate at the full alpha.
    The guarantee is the one above with alpha_k = 0 for k < K, so no look needs refusing.

    Stopping rule (affects cost and radius, never soundness). At stage k < K, with projected vote
    fraction p_hi = the ``projection_alpha`` Clopper-Pearson upper bound (the default 0.5 is about the
    median estimate; smaller values are more optimistic and sample longer), the radius that fixed-n sampling at
    n would most favourably give is R_best = radius of L(p_hi * n, n, alpha_K). Stop when
    R_best - R_k <= ``tolerance`` * sigma, R_k being the radius certifiable now (0 if L_k < 1/2). This stops
    early both when the input will clearly abstain (p_hi < 1/2 gives R_best = 0) and when the attainable
    gain is small. Inputs whose votes are unanimous gain the most from more samples (R_max grows with n),
    so they run to n: that is the price of losing at most ``tolerance`` * sigma per input. The ACR cost is
    therefore at most ``tolerance`` * sigma per stopped input. Choose it relative to your ACR.

    What it buys on real models, and why no sound schedule can do much better when many inputs' votes are
    unanimous, is measured in the README ("Certification speed", ``benchmarks/adaptive.py``).
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
    p_lower = lower_confidence_bound(int(round(p * n)), n, alpha)  # noqa: RUF046 (a numpy float's round() is a float)
    return radius(sigma, p_lower) if p_lower >= 0.5 else 0.0
