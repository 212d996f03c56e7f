"""Edge cases of the statistics: a bound at level 0, and the adaptive schedule that spends all of alpha on
its last look (``final_share`` = 1, whose earlier looks have level 0)."""

from __future__ import annotations

import torch

from certkit.smoothing.samplers import input_generator
from certkit.smoothing.smooth import Certificate, Smooth
from certkit.smoothing.statistics import ABSTAIN, AdaptiveSchedule, lower_confidence_bound
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
