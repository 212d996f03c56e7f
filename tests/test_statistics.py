"""Edge cases of the statistics: a bound at level 0, and the adaptive schedule that spends all of alpha on
its last look (``final_share`` = 1, whose earlier looks have level 0)."""

from __future__ import annotations

import mpmath
import pytest
import torch

from certkit.smoothing.samplers import input_generator
from certkit.smoothing.smooth import Certificate, Smooth
from certkit.smoothing.statistics import ABSTAIN, AdaptiveSchedule, lower_confidence_bound, radius
from helpers import HalfSpace, halfspace_input

W = [0.6, -0.8, 0.0, 0.0]


def test_a_bound_at_level_zero_claims_nothing() -> None:
    # the 0-quantile of Beta(n_a, n - n_a + 1) is 0, and alpha^(1/n) (unanimous votes) tends to 0 with alpha
    assert [lower_confidence_bound(n_a, 10, 0.0) for n_a in (0, 3, 10)] == [0.0, 0.0, 0.0]
    assert 0.0 < lower_confidence_bound(10, 10, 1e-300) < 1e-29


def test_all_of_alpha_on_the_last_look_certifies_as_fixed_n_and_still_stops_clear_abstains() -> None:
    sigma, n0, n, alpha = 0.5, 100, 4000, 0.001
    smoothed = Smooth(HalfSpace(W, 0.0), num_classes=2, sigma=sigma)
    far, _ = halfspace_input(1 - 1e-12, sigma, W)
    xs = torch.stack([torch.zeros(1, 1, 4), far])  # on the plane (votes 50/50), and unanimous for class 1
    schedule = AdaptiveSchedule(first_stage=500, final_share=1.0)
    stages = schedule.stages(n)
    assert len(stages) > 1 and schedule.alphas(alpha, len(stages)) == [0.0] * (len(stages) - 1) + [alpha]

    def certify(adaptive: AdaptiveSchedule | None) -> list[Certificate]:
        return smoothed.certify_batch(xs, n0, n, alpha, 5000, [input_generator(0, i) for i in range(2)], adaptive)

    abstain, unanimous = certify(schedule)  # the unanimous input's first look used to raise math domain error
    assert abstain.prediction == ABSTAIN and abstain.samples < n0 + n
    assert unanimous == certify(None)[1] and unanimous.prediction == 1


def _exact_tail(n_a: int, n: int, p: mpmath.mpf) -> mpmath.mpf:
    """P(Binomial(n, p) >= n_a) in 40-digit arithmetic: the sum of its n - n_a + 1 terms."""
    log_p, log_q, log_n = mpmath.log(p), mpmath.log1p(-p), mpmath.loggamma(n + 1)
    terms = (
        log_n - mpmath.loggamma(j + 1) - mpmath.loggamma(n - j + 1) + j * log_p + (n - j) * log_q
        for j in range(n_a, n + 1)
    )
    return mpmath.fsum(mpmath.exp(t) for t in terms)


@pytest.mark.parametrize("n", [100, 1000, 10**4, 10**5, 10**6, 10**8, 10**9])
def test_every_radius_is_below_the_exact_one(n: int) -> None:
    """The radius R is proved iff Phi(R/sigma) <= the exact Clopper-Pearson bound pe, i.e. iff
    P(Binomial(n, Phi(R/sigma)) >= n_a) <= alpha (the tail grows with p), checked in 40 digits. Rounding
    pA_lower to nearest put R above the exact radius in about half of these cases; scipy's beta quantile is also off
    by up to 2e-8 of the tail (the last case, which a tail margin of 1e-8 still let through)."""
    cases = [(n - gap, n, alpha) for alpha in (0.5, 1e-3, 1e-6, 1e-12) for gap in (0, 1, 2, 5, 30)]
    if n == 10**6:
        cases.append((2_027_933, 2_028_932, 2.508077803167719e-09))
    for n_a, trials, alpha in cases:
        p_lower = lower_confidence_bound(n_a, trials, alpha)
        if p_lower >= 0.5:
            r = radius(0.5, p_lower)
            with mpmath.workdps(40):
                assert _exact_tail(n_a, trials, mpmath.ncdf(mpmath.mpf(r) / 0.5)) <= alpha, (n_a, trials, alpha)
