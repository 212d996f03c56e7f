"""Shared noise: the stem split computes the model, groups vote on one stream, and certificates stay sound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from certkit.errors import CertkitError
from certkit.models import Normalize, create_model
from certkit.results import read_results
from certkit.smoothing.samplers import input_generator, shared_generator
from certkit.smoothing.smooth import Smooth
from certkit.smoothing.statistics import ABSTAIN, AdaptiveSchedule
from certkit.smoothing.stem import split_stem
from test_certify_runner import run


def mlp() -> nn.Module:
    return nn.Sequential(Normalize([0.3], [0.4]), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3))


class Untraceable(nn.Module):
    """Control flow on a tensor property: fx cannot trace it, so it must fall back to whole noisy copies."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = Normalize([0.5], [0.5]), nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x)
        if z.dim() == 4:
            z = z.flatten(1)
        return self.fc(z)


CASES = [
    ("lenet", (1, 28, 28), (True, 2)),
    ("smallcnn", (1, 28, 28), (True, 2)),
    ("resnet20", (3, 32, 32), (False, 0)),  # conv -> BatchNorm: only the conv is split off
]


@pytest.mark.parametrize("arch,shape,absorbed", CASES)
def test_stem_split_computes_the_model(arch, shape, absorbed):
    torch.manual_seed(0)
    model = create_model(arch, 10, shape, [0.4] * shape[0], [0.3] * shape[0]).eval()
    stem = split_stem(model)
    assert stem is not None and (stem.relu, stem.pool) == absorbed
    xs, eps, sigma = torch.rand(3, *shape), torch.randn(5, *shape), 0.25
    with torch.no_grad():
        split = stem.rest(stem.pair_sum(stem.image_part(xs), stem.noise_part(eps, sigma)))
        plain = torch.cat([model(x + sigma * eps) for x in xs])  # image-major, like pair_sum
    assert split.shape == plain.shape
    torch.testing.assert_close(split, plain, atol=1e-4, rtol=1e-4)


def test_stem_split_of_an_mlp_and_what_cannot_be_split():
    torch.manual_seed(0)
    model = mlp()
    stem = split_stem(model)
    assert stem is not None and stem.flatten and (stem.relu, stem.pool) == (True, 0)
    xs, eps = torch.rand(2, 1, 8, 8), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            stem.rest(stem.pair_sum(stem.image_part(xs), stem.noise_part(eps, 0.5))),
            torch.cat([model(x + 0.5 * eps) for x in xs]),
            atol=1e-5,
            rtol=1e-5,
        )
    assert split_stem(nn.Sequential(nn.Flatten(), nn.Linear(64, 3))) is None  # no Normalize in front
    assert split_stem(Untraceable()) is None
    reflect = nn.Sequential(Normalize([0.5], [0.5]), nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"))
    assert split_stem(reflect) is None  # reflect padding is not linear in the way zero padding is


class OwnNormalize(Normalize):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 1.05


class OwnLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


def scale_output(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * 1.05


def scale_input(module: nn.Module, inputs: tuple) -> tuple:
    return (inputs[0] * 1.05,)


class InstanceForward:
    """Sets ``forward`` on a module instance to scale its output, as a hook would; ``remove`` deletes it. The split
    would compute the noise part without it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        module.forward = lambda x: type(module).forward(module, x) * 1.05

    def remove(self) -> None:
        del self.module.forward


HOOKS = {
    "hook on the layer": lambda m: m[2].register_forward_hook(scale_output),
    "pre-hook on the layer": lambda m: m[2].register_forward_pre_hook(scale_input),
    "hook on Normalize": lambda m: m[0].register_forward_hook(scale_output),
    "hook after the stem": lambda m: m[4].register_forward_hook(scale_output),
    "hook on the model": lambda m: m.register_forward_hook(scale_output),
    "global hook": lambda m: nn.modules.module.register_module_forward_hook(scale_output),
    "global pre-hook": lambda m: nn.modules.module.register_module_forward_pre_hook(scale_input),
    "forward set on the layer": lambda m: InstanceForward(m[2]),
    "forward set on Normalize": lambda m: InstanceForward(m[0]),
}


def assert_votes_are_the_models(smoothed: Smooth, model: nn.Module) -> None:
    xs = torch.rand(2, 1, 8, 8)
    counts = smoothed.sampler.counts(xs, [300, 300], 300, [torch.Generator().manual_seed(3)])
    draws = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = np.stack([np.bincount(model(draws * 0.5 + x).argmax(1).numpy(), minlength=3) for x in xs])
    assert (counts == expected).all()


@pytest.mark.parametrize("where", list(HOOKS))
def test_a_hooked_model_is_not_split_even_when_hooked_after_smooth_was_built(where: str):
    model = mlp()
    smoothed = Smooth(model, 3, 0.5, shared_noise=2)
    assert smoothed.speed_options["stem_split"]
    handle = HOOKS[where](model)
    try:
        assert split_stem(model) is None
        assert_votes_are_the_models(smoothed, model)
        assert not smoothed.speed_options["stem_split"]
    finally:
        handle.remove()
    assert smoothed.speed_options["stem_split"]  # split again once the hook is gone


@pytest.mark.parametrize("position,subclass", [(0, lambda: OwnNormalize([0.3], [0.4])), (2, lambda: OwnLinear(64, 16))])
def test_a_stem_module_of_a_subclass_is_not_split(position, subclass):
    model = mlp()
    model[position] = subclass()
    assert split_stem(model) is None
    smoothed = Smooth(model, 3, 0.5, shared_noise=2)
    assert not smoothed.speed_options["stem_split"]
    assert_votes_are_the_models(smoothed, model)


def counts_on_given_draws(model: nn.Module, xs: torch.Tensor, draws: torch.Tensor, sigma: float) -> np.ndarray:
    with torch.no_grad():
        return np.stack([np.bincount(model(draws * sigma + x).argmax(1).numpy(), minlength=10) for x in xs])


@pytest.mark.parametrize("split", [True, False])
def test_a_group_votes_on_one_stream_and_batching_does_not_matter(split):
    torch.manual_seed(0)
    model = create_model("lenet", 10, (1, 28, 28)).eval() if split else Untraceable()
    classes = 10 if split else 3
    smoothed = Smooth(model, classes, 0.25, shared_noise=5)
    assert smoothed.speed_options["stem_split"] == split
    xs = torch.rand(5, 1, 28, 28) if split else torch.rand(5, 1, 8, 8)
    counts = smoothed.sampler.counts(xs, [250] * 5, 1000, [shared_generator(0, 0)])
    # the same draws as one input's stream: blocks of NOISE_BLOCK from the group's generator
    gen = shared_generator(0, 0)
    draws = torch.cat([torch.randn((size, *xs.shape[1:]), generator=gen) for size in (100, 100, 50)])
    expected = counts_on_given_draws(model, xs, draws, 0.25)[:, :classes]
    assert np.abs(counts - expected).sum() <= 2  # split rounding may flip a vote on a boundary, no more
    # one input at a time from a fresh copy of the stream, or another batch size: the same certificates
    batched = smoothed.certify_batch(xs, 50, 300, 0.01, 1000, [shared_generator(1, 7)])
    single = [smoothed.certify_batch(x[None], 50, 300, 0.01, 1000, [shared_generator(1, 7)])[0] for x in xs]
    assert batched == single
    assert smoothed.certify_batch(xs, 50, 300, 0.01, 250, [shared_generator(1, 7)]) == batched
    adaptive = AdaptiveSchedule(first_stage=100)
    assert smoothed.certify_batch(xs, 50, 400, 0.01, 1000, [shared_generator(2, 0)], adaptive) == [
        smoothed.certify_batch(x[None], 50, 400, 0.01, 1000, [shared_generator(2, 0)], adaptive)[0] for x in xs
    ]


def test_shared_noise_argument_checks():
    smoothed = Smooth(mlp(), 3, 0.5, shared_noise=2)
    with pytest.raises(CertkitError, match="one generator"):
        smoothed.certify_batch(
            torch.rand(2, 1, 8, 8), 10, 100, 0.01, 100, [input_generator(0, 0), input_generator(0, 1)]
        )
    with pytest.raises(CertkitError, match="at most"):
        smoothed.certify_batch(torch.rand(3, 1, 8, 8), 10, 100, 0.01, 100, [shared_generator(0, 0)])
    with pytest.raises(CertkitError, match="--shared-noise must be"):
        Smooth(mlp(), 3, 0.5, shared_noise=-1)
    a = torch.randn(4, generator=shared_generator(0, 3))
    assert torch.equal(a, torch.randn(4, generator=shared_generator(0, 3)))
    assert not torch.equal(a, torch.randn(4, generator=input_generator(0, 3)))  # a family of its own


def halfspace_model(w: list[float]) -> nn.Module:
    """f(x) = [w.x > 0] behind a (trivial) Normalize: splittable, with a smoothed classifier in closed form."""
    linear = nn.Linear(len(w), 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[-v for v in w], w]))
        linear.bias.zero_()
    return nn.Sequential(Normalize([0.0], [1.0]), nn.Flatten(), linear)


def test_guarantee_holds_for_every_member_of_shared_groups():
    """Groups of inputs at different margins share noise; per member, false certificates stay within alpha."""
    sigma, alpha, groups, w = 0.5, 0.2, 400, [0.6, -0.8, 0.0, 0.0]
    probs = [0.6, 0.7, 0.8, 0.9]
    direction = torch.tensor(w) / float(np.linalg.norm(w))
    margins = [float(norm.ppf(p)) * sigma for p in probs]
    xs = torch.stack([(direction * m).view(1, 1, -1) for m in margins])
    smoothed = Smooth(halfspace_model(w), 2, sigma, shared_noise=len(probs))
    assert smoothed.speed_options["stem_split"]
    certs = [smoothed.certify_batch(xs, 10, 100, alpha, 1000, [shared_generator(5, g)]) for g in range(groups)]
    limit = binom.ppf(1 - 1e-4, groups, alpha)
    for member, margin in enumerate(margins):
        member_certs = [group[member] for group in certs]
        false = sum(1 for c in member_certs if c.prediction != ABSTAIN and (c.prediction != 1 or c.radius > margin))
        assert false <= limit
        assert sum(c.prediction == 1 for c in member_certs) > groups / 2  # not vacuous
    # and members of one group are dependent (same draws): their vote fractions move together
    fractions = np.array([[c.p_lower for c in group] for group in certs])
    assert np.corrcoef(fractions[:, 0], fractions[:, 1])[0, 1] > 0.2


def test_a_hooked_affine_model_is_certified_soundly_with_shared_noise():
    """A hook lowers the class-1 logit by 0.4: the hooked model is [w.x > 0.2], whose radius at x is known.
    A split that skipped the hook would certify the unhooked [w.x > 0] and overstate most radii."""
    sigma, alpha, groups, w = 0.5, 0.2, 300, [0.6, -0.8, 0.0, 0.0]
    model = halfspace_model(w)
    model[2].register_forward_hook(lambda m, i, o: o - torch.tensor([0.0, 0.4]))
    true_radius = float(norm.ppf(0.8)) * sigma
    x = (torch.tensor(w) * (true_radius + 0.2)).view(1, 1, -1)
    smoothed = Smooth(model, 2, sigma, shared_noise=4)
    assert not smoothed.speed_options["stem_split"]
    xs = x.unsqueeze(0).repeat(4, 1, 1, 1)
    certs = [smoothed.certify_batch(xs, 10, 100, alpha, 1000, [shared_generator(7, g)]) for g in range(groups)]
    limit = binom.ppf(1 - 1e-4, groups, alpha)
    for member in range(4):
        member_certs = [group[member] for group in certs]
        false = sum(
            1 for c in member_certs if c.prediction != ABSTAIN and (c.prediction != 1 or c.radius > true_radius)
        )
        assert false <= limit
        assert sum(c.prediction == 1 for c in member_certs) > groups / 2  # not vacuous


class Images:
    def __init__(self, size: int = 10) -> None:
        self.images = torch.rand(size, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i % 10


@pytest.mark.slow  # four shared-noise dataset runs, each with its vote-agreement check, and one without
def test_dataset_runs_with_shared_noise(tmp_path: Path):
    torch.manual_seed(0)
    model, data = create_model("lenet", 10, (1, 28, 28)), Images()
    common = dict(num_classes=10, sigma=0.25, n0=20, n=200, alpha=0.01, batch_size=200, shared_noise=4)
    summary = run(model, data, out=tmp_path / "whole.tsv", **common)
    assert summary is not None and summary["parameters"]["shared_noise"] == 4
    assert summary["high_prob_effective_n"] == 3  # 10 rows: groups 0-3, 4-7, 8-9
    assert summary["speed_check"]["options"] == {"stem_split": True}
    assert summary["speed_check"]["vote_agreement"] >= 0.99
    whole = read_results(tmp_path / "whole.tsv")
    # other loading groups and shards give the same rows: the group of an index is fixed by the index
    run(model, data, out=tmp_path / "small.tsv", inputs_per_batch=3, **common)
    assert read_results(tmp_path / "small.tsv").radius.tolist() == whole.radius.tolist()
    run(model, data, out=tmp_path / "s1.tsv", shard=(1, 2), **common)
    shard = read_results(tmp_path / "s1.tsv")
    assert shard.radius.tolist() == whole.radius[1::2].tolist()
    # it differs from independent noise (the same seed, each input drawing its own), and resuming without the
    # flag is refused
    run(model, data, out=tmp_path / "independent.tsv", **{**common, "shared_noise": 0})
    assert read_results(tmp_path / "independent.tsv").radius.tolist() != whole.radius.tolist()
    with pytest.raises(CertkitError, match="shared_noise"):
        run(model, data, out=tmp_path / "whole.tsv", **{**common, "shared_noise": 0})
    with pytest.raises(CertkitError, match="at least 2"):
        run(model, data, out=tmp_path / "one.tsv", **{**common, "shared_noise": 1})


def test_a_model_with_the_wrong_number_of_classes_is_refused():
    smoothed = Smooth(mlp(), 5, 0.5, shared_noise=2)  # the model has 3 outputs
    with pytest.raises(CertkitError, match=r"logits of shape \(20, 3\), expected \(20, 5\)"):
        smoothed.certify_batch(torch.rand(2, 1, 8, 8), 10, 100, 0.01, 1000, [shared_generator(0, 0)])
