"""Adaptive certification: the union-bound schedule keeps the (1 - alpha) guarantee and stops early."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy.stats import binom

from certkit.smoothing.samplers import input_generator
from certkit.smoothing.smooth import Smooth
from certkit.smoothing.statistics import ABSTAIN, AdaptiveSchedule, max_radius
from helpers import HalfSpace, false_certificates, halfspace_input

W = [0.6, -0.8, 0.0, 0.0]


def test_schedule_levels_sum_to_alpha_and_stages_double_to_n():
    schedule = AdaptiveSchedule(first_stage=1000)
    stages = schedule.stages(100_000)
    assert stages[-1] == 100_000 and stages[0] >= 1000
    assert all(b == 2 * a or b == 2 * a - 1 for a, b in pairwise(stages))
    alphas = schedule.alphas(0.001, len(stages))
    assert sum(alphas) == pytest.approx(0.001) and alphas[-1] == pytest.approx(0.0009)
    assert AdaptiveSchedule(first_stage=10**6).stages(1000) == [1000]


@pytest.mark.parametrize("p_class1,tolerance", [(0.8, 0.2), (0.6, 0.1)])
def test_adaptive_false_certification_rate_within_alpha(p_class1, tolerance):
    sigma, alpha, runs = 0.5, 0.2, 600
    x, true_radius = halfspace_input(p_class1, sigma, W)
    smoothed = Smooth(HalfSpace(W, 0.0), num_classes=2, sigma=sigma)
    xs = x.unsqueeze(0).repeat(runs, 1, 1, 1)
    # a loose tolerance makes inputs stop at several different looks: the case the union bound must cover
    schedule = AdaptiveSchedule(first_stage=25, tolerance=tolerance, projection_alpha=0.5)
    certs = smoothed.certify_batch(xs, 10, 400, alpha, 4000, [input_generator(5, i) for i in range(runs)], schedule)
    assert len({c.samples for c in certs}) >= 3  # inputs did stop at different looks
    assert false_certificates(certs, 1, true_radius) <= binom.ppf(1 - 1e-4, runs, alpha)
    # not vacuous: many runs certify, with radii near the truth (so failures are possible at all)
    certified = [c.radius for c in certs if c.prediction == 1]
    assert len(certified) > runs / 3
    assert np.median(certified) > 0.5 * true_radius


def test_adaptive_false_certification_check_has_power(monkeypatch):
    """The check above fails on a broken certifier: a point estimate in place of the lower bound."""
    import certkit.smoothing.statistics as statistics_module

    sigma, alpha, runs = 0.5, 0.2, 600
    x, true_radius = halfspace_input(0.6, sigma, W)
    smoothed = Smooth(HalfSpace(W, 0.0), num_classes=2, sigma=sigma)
    xs = x.unsqueeze(0).repeat(runs, 1, 1, 1)
    monkeypatch.setattr(statistics_module, "lower_confidence_bound", lambda n_a, n, a: n_a / n)
    schedule = AdaptiveSchedule(first_stage=25, tolerance=0.1, projection_alpha=0.5)
    certs = smoothed.certify_batch(xs, 10, 400, alpha, 4000, [input_generator(5, i) for i in range(runs)], schedule)
    assert false_certificates(certs, 1, true_radius) > binom.ppf(1 - 1e-4, runs, alpha)


def test_adaptive_stops_early_on_clear_abstains_and_runs_unanimous_inputs_to_n():
    sigma, n = 0.5, 20_000
    smoothed = Smooth(HalfSpace(W, 0.0), num_classes=2, sigma=sigma)
    on_plane = torch.zeros(1, 1, 4)
    far, _ = halfspace_input(1 - 1e-12, sigma, W)
    xs = torch.stack([on_plane, far])
    schedule = AdaptiveSchedule(first_stage=500)
    abstain, unanimous = smoothed.certify_batch(
        xs, 100, n, 0.001, 5000, [input_generator(0, i) for i in range(2)], schedule
    )
    assert abstain.prediction == ABSTAIN and abstain.samples < 100 + n / 4
    assert unanimous.prediction == 1 and unanimous.samples == 100 + n
    final_alpha = schedule.alphas(0.001, len(schedule.stages(n)))[-1]
    assert unanimous.radius == pytest.approx(max_radius(sigma, n, final_alpha))


def test_adaptive_batched_equals_one_at_a_time():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    smoothed = Smooth(model, num_classes=4, sigma=0.5)
    xs = torch.rand(6, 1, 4, 4)
    schedule = AdaptiveSchedule(first_stage=100, tolerance=0.1)
    together = smoothed.certify_batch(xs, 50, 2000, 0.01, 1000, [input_generator(1, i) for i in range(6)], schedule)
    alone = [
        smoothed.certify_batch(xs[i : i + 1], 50, 2000, 0.01, 300, [input_generator(1, i)], schedule)[0]
        for i in range(6)
    ]
    assert together == alone
    assert np.mean([c.samples for c in together]) <= 2050


def _any_look_fails(p: float, stages: list[int], alphas: list[float], runs: int, seed: int = 0) -> float:
    """Fraction of runs in which *some* look's lower bound exceeds the true p: what a worst-case stopping
    rule (stop exactly when the bound is wrong) would turn into false certificates."""
    from certkit.smoothing.statistics import lower_confidence_bound

    rng = np.random.default_rng(seed)
    fails = 0
    for _ in range(runs):
        n_a, drawn, failed = 0, 0, False
        for n_k, alpha_k in zip(stages, alphas):
            n_a += rng.binomial(n_k - drawn, p)
            drawn = n_k
            failed |= lower_confidence_bound(n_a, n_k, alpha_k) > p
        fails += failed
    return fails / runs


def test_union_bound_holds_for_a_worst_case_stopping_rule_where_naive_peeking_fails():
    alpha, runs, p = 0.1, 1500, 0.8
    schedule = AdaptiveSchedule(first_stage=25)
    stages = schedule.stages(800)
    assert len(stages) == 6
    split = _any_look_fails(p, stages, schedule.alphas(alpha, len(stages)), runs)
    naive = _any_look_fails(p, stages, [alpha] * len(stages), runs)
    assert split <= binom.ppf(1 - 1e-4, runs, alpha) / runs
    assert naive > binom.ppf(1 - 1e-4, runs, alpha) / runs  # testing every look at alpha breaks the level
