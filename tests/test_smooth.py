"""CERTIFY/PREDICT against the reference's statistics, closed-form models and the (1 - alpha) guarantee."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from torch import nn

from certkit.errors import CertkitError
from certkit.models import Normalize
from certkit.smoothing.samplers import PerInputNoise, SharedNoise, input_generator, shared_generator
from certkit.smoothing.smooth import Smooth
from certkit.smoothing.statistics import (
    ABSTAIN,
    certify_from_counts,
    lower_confidence_bound,
    max_radius,
    min_n_certify,
    min_n_predict,
    predict_from_counts,
    radius,
    upper_confidence_bound,
)
from certkit.smoothing.voter import Voter
from helpers import HalfSpace, false_certificates, halfspace_input

CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")


class Constant(nn.Module):
    """Always votes ``label`` (records the largest batch it saw)."""

    def __init__(self, label: int, num_classes: int = 3) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.label, self.num_classes, self.largest = label, num_classes, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, len(x))
        out = torch.zeros(len(x), self.num_classes)
        out[:, self.label] = 1.0
        return out


# --- statistics --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_a,n,alpha", [(1, 10, 0.1), (7, 10, 0.001), (60, 100, 0.05), (950, 1000, 0.001), (12345, 20000, 0.01)]
)
def test_clopper_pearson_is_the_beta_quantile_and_the_references_two_sided_interval(n_a, n, alpha):
    expected = beta.ppf(alpha, n_a, n - n_a + 1)
    assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(expected, rel=1e-10)
    # the reference: lower end of the two-sided exact interval at level 2 alpha
    two_sided = binomtest(n_a, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(two_sided, rel=1e-8)
    assert upper_confidence_bound(n_a, n, alpha) == pytest.approx(beta.ppf(1 - alpha, n_a + 1, n - n_a), rel=1e-8)


def test_clopper_pearson_edges():
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    assert upper_confidence_bound(100, 100, 0.001) == 1.0


@pytest.mark.parametrize(
    "n_a,p_lower,r_over_sigma",
    [
        (50_000, 0.49511, None),
        (50_500, 0.50011, 0.0003),
        (60_000, 0.59520, 0.241),
        (75_000, 0.74575, 0.661),
        (90_000, 0.89704, 1.265),
        (99_000, 0.98899, 2.290),
        (99_900, 0.99865, 3.000),
        (100_000, 0.99993, 3.811),
    ],
)
def test_worked_values_of_the_reference(n_a, p_lower, r_over_sigma):
    bound = lower_confidence_bound(n_a, 100_000, 0.001)
    assert round(bound, 5) == p_lower
    prediction, r, _ = certify_from_counts(3, n_a, 100_000, 0.001, sigma=0.5)
    if r_over_sigma is None:
        assert (prediction, r) == (ABSTAIN, 0.0)
    else:
        assert prediction == 3
        assert r / 0.5 == pytest.approx(r_over_sigma, abs=6e-4)


def test_radius_formula():
    for p in [0.5, 0.6, 0.9, 0.999]:  # rounded down, by at most 1.3e-6 sigma (statistics.TAIL_MARGIN)
        assert 0.25 * (norm.ppf(p) - 1.3e-6) <= radius(0.25, p) <= 0.25 * norm.ppf(p)
    # the general formula sigma/2 (Phi^-1(pA) - Phi^-1(pB)) with pB = 1 - pA
    assert radius(1.0, 0.8) == pytest.approx(0.5 * (norm.ppf(0.8) - norm.ppf(0.2)))


@pytest.mark.parametrize(
    "n,row",
    [
        (100, [2.000, 1.695, 1.500, 1.353]),
        (1000, [2.834, 2.605, 2.463, 2.359]),
        (10_000, [3.503, 3.314, 3.199, 3.115]),
        (100_000, [4.075, 3.911, 3.811, 3.740]),
        (1_000_000, [4.582, 4.435, 4.347, 4.283]),
    ],
)
def test_max_radius_table(n, row):
    for alpha, expected in zip([0.1, 0.01, 0.001, 0.0001], row):
        assert round(max_radius(1.0, n, alpha), 3) == expected
    assert round(max_radius(0.25, 100_000, 0.001), 3) == 0.953


def test_minimum_n():
    assert min_n_certify(0.001) == 10 and min_n_predict(0.001) == 11
    for alpha in [0.3, 0.1, 0.01, 0.001, 1e-5]:
        m = min_n_certify(alpha)
        assert lower_confidence_bound(m, m, alpha) >= 0.5 > lower_confidence_bound(m - 1, m - 1, alpha) or m == 1
        k = min_n_predict(alpha)
        assert predict_from_counts(np.array([k, 0]), alpha) == 0
        assert predict_from_counts(np.array([k - 1, 0]), alpha) == ABSTAIN


def test_abstain_is_strict():
    # alpha = 0.5, n = 1, one vote: pA_lower = 0.5 exactly, which certifies radius 0 (the reference uses <)
    assert certify_from_counts(2, 1, 1, 0.5, sigma=1.0)[:2] == (2, 0.0)
    assert certify_from_counts(2, 0, 1, 0.5, sigma=1.0)[:2] == (ABSTAIN, 0.0)


def test_abstain_boundary_on_both_sides_of_one_half():
    n, alpha = 100_000, 0.001
    threshold = next(n_a for n_a in range(50_000, 51_500) if lower_confidence_bound(n_a, n, alpha) >= 0.5)
    assert certify_from_counts(1, threshold - 1, n, alpha, 1.0)[0] == ABSTAIN
    pred, r, _ = certify_from_counts(1, threshold, n, alpha, 1.0)
    assert pred == 1 and 0 <= r < 1e-3


def test_predict_test_matches_binomtest():
    counts = np.array([3, 60, 40, 1])
    p = binomtest(60, 100, 0.5).pvalue
    assert predict_from_counts(counts, p + 1e-9) == 1
    assert predict_from_counts(counts, p - 1e-9) == ABSTAIN
    assert predict_from_counts(np.array([50, 50, 0]), 0.5) == ABSTAIN  # a tie has p = 1


def test_predict_with_n_10_at_alpha_0001_always_abstains():
    smoothed = Smooth(Constant(2), num_classes=3, sigma=0.5)
    assert predict_from_counts(np.array([0, 0, 10]), 0.001) == ABSTAIN
    with pytest.raises(CertkitError, match="needs n >= 11"):
        smoothed.predict(torch.zeros(1, 2, 2), n=10, alpha=0.001, batch_size=10)
    assert smoothed.predict(torch.zeros(1, 2, 2), n=11, alpha=0.001, batch_size=10) == 2


# --- the smoothed classifier -------------------------------------------------------------------------------


def test_constant_model_certifies_the_maximum_radius_and_batches_stay_bounded():
    model = Constant(1)
    smoothed = Smooth(model, num_classes=3, sigma=0.25)
    pred, r = smoothed.certify(torch.zeros(1, 3, 3), n0=100, n=1000, alpha=0.001, batch_size=64)
    assert pred == 1 and r == pytest.approx(max_radius(0.25, 1000, 0.001), rel=1e-12)
    assert model.largest <= 64


def test_votes_split_between_two_classes_abstain():
    w = [1.0, 0.0, 0.0, 0.0]
    smoothed = Smooth(HalfSpace(w, 0.0), num_classes=2, sigma=0.5)
    x = torch.zeros(1, 1, 4)  # on the hyperplane: pA = 1/2 for both classes
    assert smoothed.certify(x, 100, 2000, 0.001, 500, input_generator(0, 0)) == (ABSTAIN, 0.0)
    assert smoothed.predict(x, 2000, 0.001, 500, input_generator(0, 1)) == ABSTAIN


def test_argument_checks():
    model = Constant(0)
    with pytest.raises(CertkitError, match="sigma"):
        Smooth(model, 3, 0.0)
    smoothed = Smooth(model, 3, 0.5)
    x = torch.zeros(1, 2, 2)
    for kwargs, message in [
        (dict(n0=100, n=1000, alpha=0.0), "alpha"),
        (dict(n0=100, n=1000, alpha=1.0), "alpha"),
        (dict(n0=0, n=1000, alpha=0.001), "n0"),
        (dict(n0=100, n=0, alpha=0.001), "n must"),
        (dict(n0=100, n=9, alpha=0.001), "needs n >= 10"),
    ]:
        with pytest.raises(CertkitError, match=message):
            smoothed.certify(x, batch_size=10, **kwargs)
    with pytest.raises(CertkitError, match="NaN"):
        smoothed.certify(torch.full((1, 2, 2), float("nan")), 10, 100, 0.001, 10)


def test_certify_and_predict_take_one_image_with_or_without_a_batch_axis():
    smoothed = Smooth(HalfSpace([1.0, 0.0, 0.0, 0.0], 0.0), num_classes=2, sigma=0.5)
    x = torch.tensor([0.3, 0.0, 0.0, 0.0]).view(1, 1, 4)
    assert smoothed.certify(x[None], 100, 1000, 0.01, 300, input_generator(0, 0)) == smoothed.certify(
        x, 100, 1000, 0.01, 300, input_generator(0, 0)
    )
    assert smoothed.predict(x[None], 1000, 0.01, 300, input_generator(0, 1)) == smoothed.predict(
        x, 1000, 0.01, 300, input_generator(0, 1)
    )
    for shape in [(2, 1, 1, 4), (1, 4), (1, 1, 1, 1, 4)]:
        for call in (lambda z: smoothed.certify(z, 10, 100, 0.01, 100), lambda z: smoothed.predict(z, 100, 0.01, 100)):
            with pytest.raises(CertkitError, match=r"one image \(C, H, W\) or \(1, C, H, W\)") as err:
                call(torch.zeros(shape))
            assert "\n" not in str(err.value)


def test_smooth_built_from_its_parts_certifies_as_the_convenience_constructor():
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    xs = torch.rand(3, 1, 4, 4)
    plain = Smooth(model, 3, 0.25).certify_batch(xs, 50, 500, 0.01, 200, [input_generator(0, i) for i in range(3)])
    parts = Smooth.from_sampler(PerInputNoise(Voter(model, 3), 0.25))
    assert parts.certify_batch(xs, 50, 500, 0.01, 200, [input_generator(0, i) for i in range(3)]) == plain
    shared = Smooth(model, 3, 0.25, shared_noise=3)
    from_parts = Smooth.from_sampler(SharedNoise(Voter(model, 3), 0.25, group=3))
    assert shared.speed_options == from_parts.speed_options and from_parts.shared_noise == 3
    one = shared.certify_batch(xs, 50, 500, 0.01, 200, [shared_generator(0, 0)])
    assert from_parts.certify_batch(xs, 50, 500, 0.01, 200, [shared_generator(0, 0)]) == one
    # the public sampling step is SAMPLEUNDERNOISE: counts of each input's own noisy copies
    counts = parts.sampler.counts(xs, [120, 80, 0], 200, [input_generator(1, i) for i in range(3)])
    assert counts.shape == (3, 3) and counts.sum(1).tolist() == [120, 80, 0]
    with pytest.raises(CertkitError, match="at least 2 inputs"):
        SharedNoise(Voter(model, 3), 0.25, group=1)


def test_model_mode_is_restored():
    model = Constant(0)
    model.train()
    Smooth(model, 3, 0.5).certify(torch.zeros(1, 2, 2), 10, 100, 0.001, 50)
    assert model.training


def test_batched_equals_one_at_a_time_and_batch_size_does_not_matter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    smoothed = Smooth(model, num_classes=5, sigma=0.5)
    xs = torch.rand(7, 1, 4, 4)
    single = [smoothed.certify(xs[i], 30, 250, 0.01, 100, input_generator(3, i)) for i in range(len(xs))]
    batched = smoothed.certify_batch(xs, 30, 250, 0.01, 1000, [input_generator(3, i) for i in range(len(xs))])
    assert [(c.prediction, c.radius) for c in batched] == single
    assert all(c.samples == 280 for c in batched)
    other_batch = smoothed.certify_batch(xs, 30, 250, 0.01, 300, [input_generator(3, i) for i in range(len(xs))])
    assert other_batch == batched
    assert smoothed.predict_batch(xs, 250, 0.01, 700, [input_generator(4, i) for i in range(7)]) == [
        smoothed.predict(xs[i], 250, 0.01, 100, input_generator(4, i)) for i in range(7)
    ]


def test_input_generator_streams():
    a = torch.randn(5, generator=input_generator(0, 1))
    assert torch.equal(a, torch.randn(5, generator=input_generator(0, 1)))
    assert not torch.equal(a, torch.randn(5, generator=input_generator(0, 2)))
    assert not torch.equal(a, torch.randn(5, generator=input_generator(1, 0)))


@pytest.mark.parametrize("p_class1", [0.8, 0.6])
def test_guarantee_on_a_linear_classifier(p_class1):
    """Over many runs, certificates exceeding the true radius (or of the wrong class) stay within alpha."""
    sigma, alpha, runs, w = 0.5, 0.2, 600, [0.6, -0.8, 0.0, 0.0]
    x, true_radius = halfspace_input(p_class1, sigma, w)
    smoothed = Smooth(HalfSpace(w, 0.0), num_classes=2, sigma=sigma)
    xs = x.unsqueeze(0).repeat(runs, 1, 1, 1)
    certs = smoothed.certify_batch(xs, 10, 100, alpha, 4000, [input_generator(11, i) for i in range(runs)])
    failures = false_certificates(certs, 1, true_radius)
    # alpha bounds the failure probability; allow binomial sampling error at a 1e-4 false-alarm rate
    assert failures <= binom.ppf(1 - 1e-4, runs, alpha)
    # and the test is not vacuous: the bound is met with certificates that are usually close to the truth
    certified = [c.radius for c in certs if c.prediction == 1]
    assert len(certified) > runs / 2
    assert np.median(certified) > 0.3 * true_radius
    if p_class1 == 0.8:
        # power: the pitfall "one-sided bound at 2 alpha" breaks the same check
        loose = smoothed.certify_batch(xs, 10, 100, 2 * alpha, 4000, [input_generator(11, i) for i in range(runs)])
        assert false_certificates(loose, 1, true_radius) > binom.ppf(1 - 1e-4, runs, alpha)


# --- speed options (amp, channels_last, compile) ---------------------------------------------------------


def test_amp_is_refused_where_the_hardware_lacks_the_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    monkeypatch.setattr("certkit.precision.cpu_has_native_bf16", lambda: False)
    with pytest.raises(CertkitError, match=r"--amp bf16 on CPU needs bfloat16 instructions.*use --amp off"):
        Smooth(model, 3, 0.5, amp="bf16")
    monkeypatch.setattr("certkit.precision.cpu_has_native_bf16", lambda: True)
    assert Smooth(model, 3, 0.5, amp="bf16").voter.amp == "bf16"
    with pytest.raises(CertkitError, match="--amp fp16 runs on CUDA"):  # no CPU has native fp16 dot products
        Smooth(model, 3, 0.5, amp="fp16")
    with pytest.raises(CertkitError, match="--amp must be"):
        Smooth(model, 3, 0.5, amp="int8")
    plain = Smooth(model, 3, 0.5, amp="off")  # the CLI's spelling of "no amp"
    assert plain.voter.amp is None and plain.speed_options == {
        "channels_last": False,
        "amp": None,
        "compile": False,
        "stem_split": False,
    }
    assert (plain.sampler.vote_agreement(torch.rand(2, 1, 2, 2), num=300, batch_size=128) == 1.0).all()


def test_channels_last_votes_through_a_copy_and_agrees_with_fp32():
    from certkit.models import create_model

    torch.manual_seed(0)
    # three input channels: a (B, 1, H, W) batch would be channels-last and contiguous at once
    model = create_model("lenet", 10, (3, 28, 28))
    model.train()
    fast = Smooth(model, 10, 0.25, channels_last=True)
    conv = model[1].features[3].weight  # 20 input channels: the two layouts differ
    assert conv.is_contiguous() and not conv.is_contiguous(
        memory_format=torch.channels_last
    )  # caller's model untouched
    # the copy that votes has its convolutions in channels-last, and each batch reaches it in that layout
    voting = fast.voter.network
    assert voting is not model
    convs = [m.weight for m in voting.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    layouts: list[tuple[bool, bool]] = []
    voting.register_forward_pre_hook(
        lambda _, args: layouts.append(
            (args[0].is_contiguous(memory_format=torch.channels_last), args[0].is_contiguous())
        )
    )
    xs = torch.rand(3, 3, 28, 28)
    assert fast.sampler.vote_agreement(xs, num=300, batch_size=300).min() >= 0.99
    gens = lambda: [input_generator(0, i) for i in range(3)]  # noqa: E731
    plain = Smooth(model, 10, 0.25).certify_batch(xs, 20, 300, 0.01, 300, gens())
    quick = fast.certify_batch(xs, 20, 300, 0.01, 300, gens())
    assert layouts and set(layouts) == {(True, False)}
    assert [c.prediction for c in quick] == [c.prediction for c in plain]
    assert all(abs(a.radius - b.radius) < 0.02 for a, b in zip(quick, plain))
    assert model.training and fast.voter.network.training  # modes restored on both


@pytest.mark.parametrize(
    ("device", "amp"),
    [
        pytest.param("cuda", "bf16", marks=CUDA_ONLY),
        pytest.param("cuda", "fp16", marks=CUDA_ONLY),
        ("cpu", "bf16"),  # emulated where the CPU lacks bf16 instructions: slower, the same rounding
    ],
)
def test_amp_votes_agree_with_fp32_and_certify_batch_runs(device: str, amp: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("certkit.precision.cpu_has_native_bf16", lambda: True)
    torch.manual_seed(0)
    from certkit.models import create_model

    model = create_model("lenet", 10, (1, 28, 28)).to(device)
    xs = torch.rand(4, 1, 28, 28)
    fast = Smooth(model, 10, 0.25, amp=amp, channels_last=True)
    # the voting network runs in the reduced precision: its logits (the last linear layer's output) and
    # the output of every convolution have the autocast dtype, never float32
    dtypes: set[torch.dtype] = set()
    for module in [fast.voter.network, *(m for m in fast.voter.network.modules() if isinstance(m, nn.Conv2d))]:
        module.register_forward_hook(lambda _, __, out: dtypes.add(out.dtype))
    assert fast.sampler.vote_agreement(xs, num=2000, batch_size=1000).min() >= 0.99
    certs = fast.certify_batch(xs, 100, 1000, 0.001, 1000, [input_generator(0, i, device) for i in range(4)])
    assert dtypes == {torch.bfloat16 if amp == "bf16" else torch.float16}
    plain = Smooth(model, 10, 0.25)  # the caller's model was left contiguous
    reference = plain.certify_batch(xs, 100, 1000, 0.001, 1000, [input_generator(0, i, device) for i in range(4)])
    # same noise, votes nearly all equal: the radii stay close
    for a, b in zip(certs, reference):
        assert abs(a.radius - b.radius) < 0.05
