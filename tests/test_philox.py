"""Counter-based noise (``rng="philox"``): the generator against the published known answers, its normals
against N(0, 1), and the samplers and the runner drawing from it: same certificates whatever the batching,
sharding or resume point, votes on exactly the documented draws, and a guarantee that holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binom, kstest
from torch import nn

from certkit.errors import CertkitError
from certkit.results import merge_results, read_results
from certkit.smoothing.philox import PhiloxStream, philox4x32, standard_normal
from certkit.smoothing.runner import RunPlan, certify_dataset
from certkit.smoothing.samplers import input_seeds
from certkit.smoothing.smooth import Smooth
from certkit.smoothing.statistics import AdaptiveSchedule
from helpers import HalfSpace, false_certificates, halfspace_input

# Random123 (Salmon, Moraes, Dror & Shaw, SC'11), tests/kat_vectors, the three "philox4x32 10" lines
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_philox_gives_the_published_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox4x32(counter, key)) == expected
    # as tensors broadcast against each other, the same words
    rows = philox4x32([torch.tensor([c, c]) for c in counter], [torch.tensor([[k]]) for k in key])
    assert all(torch.equal(w, torch.full((1, 2), e)) for w, e in zip(rows, expected))


def stream_draws(key: tuple[int, int], first: int, count: int, width: int = 784) -> torch.Tensor:
    stream = PhiloxStream(key)
    return standard_normal(*stream.key_tensors(), torch.arange(first, first + count), width)


def test_a_draw_does_not_depend_on_the_rows_around_it():
    key = PhiloxStream.from_key(input_seeds(0, 3).value(64)).key
    whole = stream_draws(key, 0, 300)
    assert torch.equal(torch.cat([stream_draws(key, 0, 100), stream_draws(key, 100, 200)]), whole)
    other = PhiloxStream.from_key(input_seeds(0, 4).value(64)).key
    mixed = standard_normal(
        torch.tensor([key[0], other[0], key[0]]),
        torch.tensor([key[1], other[1], key[1]]),
        torch.tensor([7, 7, 250]),
        784,
    )
    assert torch.equal(mixed[0], whole[7]) and torch.equal(mixed[2], whole[250])
    assert not torch.equal(mixed[1], whole[7])
    # an odd width is the first elements of the wider draw
    assert torch.equal(stream_draws(key, 5, 3, width=6), whole[5:8, :6])


def test_the_normals_are_standard_normal_and_uncorrelated():
    key = PhiloxStream.from_key(input_seeds(0, 0).value(64)).key
    z = stream_draws(key, 0, 400).double()  # 313,600 draws
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    # each of the four Box-Muller lanes (radius from w0/w2, cos or sin) on its own, and all of them
    for lane in range(4):
        assert kstest(z[:, lane::4].flatten().numpy(), "norm").pvalue > 1e-3
    flat = z.flatten().numpy()
    assert kstest(flat, "norm").pvalue > 1e-3
    assert abs(flat.mean()) < 5 * 1 / np.sqrt(flat.size) and abs(flat.var() - 1) < 5 * np.sqrt(2 / flat.size)
    # neighbouring elements, neighbouring draws of a stream, and neighbouring inputs' streams
    tol = 5 / np.sqrt(z.numel())
    assert abs(np.corrcoef(z[:, :-1].flatten(), z[:, 1:].flatten())[0, 1]) < tol
    assert abs(np.corrcoef(z[:-1].flatten(), z[1:].flatten())[0, 1]) < tol
    neighbour = stream_draws(PhiloxStream.from_key(input_seeds(0, 1).value(64)).key, 0, 400).double()
    assert abs(np.corrcoef(z.flatten(), neighbour.flatten())[0, 1]) < tol
    # the tails are there: |z| > 4 has probability 6.3e-5, so about 20 of 313,600
    assert 5 <= int((z.abs() > 4).sum()) <= 45


def test_a_stream_reserves_consecutive_draws_and_rejects_bad_keys():
    stream = PhiloxStream((1, 2))
    assert (stream.take(100), stream.take(5), stream.position) == (0, 100, 105)
    with pytest.raises(ValueError, match="32-bit"):
        PhiloxStream((2**32, 0))
    torch.manual_seed(3)
    a = PhiloxStream.from_global_rng().key
    torch.manual_seed(3)
    assert PhiloxStream.from_global_rng().key == a


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()


def expected_counts(model: nn.Module, x: torch.Tensor, key: tuple[int, int], first: int, num: int, sigma: float):
    """The votes of ``model`` on draws first .. first+num-1 of the stream ``key``, made here directly."""
    eps = stream_draws(key, first, num, x.numel()).view(num, *x.shape)
    with torch.no_grad():
        return np.bincount(model(x + eps * sigma).argmax(1).numpy(), minlength=3)


def test_per_input_counts_are_the_votes_on_the_documented_draws_whatever_the_batching():
    model, sigma = linear_model(), 0.5
    smoothed = Smooth(model, 3, sigma, rng="philox")
    xs = torch.rand(3, 1, 4, 4)
    keys = [PhiloxStream.from_key(input_seeds(9, i).value(64)).key for i in range(3)]
    streams = [PhiloxStream(k) for k in keys]
    counts = smoothed.sampler.counts(xs, [250, 130, 40], 200, streams)
    for i, (num, key) in enumerate(zip((250, 130, 40), keys)):
        np.testing.assert_array_equal(counts[i], expected_counts(model, xs[i], key, 0, num, sigma))
    assert [s.position for s in streams] == [250, 130, 40]
    # a second call continues each stream
    again = smoothed.sampler.counts(xs[:1], [60], 1000, streams[:1])
    np.testing.assert_array_equal(again[0], expected_counts(model, xs[0], keys[0], 250, 60, sigma))
    # certify_batch: the same certificates one input at a time, in other batch sizes, and beside other inputs
    batched = smoothed.certify_batch(xs, 50, 400, 0.01, 1000, [PhiloxStream(k) for k in keys])
    for batch_size in (100, 250, 4096):
        assert smoothed.certify_batch(xs, 50, 400, 0.01, batch_size, [PhiloxStream(k) for k in keys]) == batched
    single = [smoothed.certify(xs[i], 50, 400, 0.01, 300, PhiloxStream(keys[i])) for i in range(3)]
    assert single == [(c.prediction, c.radius) for c in batched]
    adaptive = AdaptiveSchedule(first_stage=100)
    assert smoothed.certify_batch(xs, 50, 400, 0.01, 1000, [PhiloxStream(k) for k in keys], adaptive) == [
        smoothed.certify_batch(xs[i : i + 1], 50, 400, 0.01, 128, [PhiloxStream(keys[i])], adaptive)[0]
        for i in range(3)
    ]


def test_shared_noise_votes_on_the_group_streams_draws():
    model, sigma = linear_model(), 0.25
    smoothed = Smooth(model, 3, sigma, shared_noise=4, rng="philox")
    xs = torch.rand(4, 1, 4, 4)
    key = (12345, 678)
    counts = smoothed.sampler.counts(xs, [350] * 4, 1000, [PhiloxStream(key)])
    for i in range(4):
        np.testing.assert_array_equal(counts[i], expected_counts(model, xs[i], key, 0, 350, sigma))
    batched = smoothed.certify_batch(xs, 50, 300, 0.01, 1000, [PhiloxStream(key)])
    assert smoothed.certify_batch(xs, 50, 300, 0.01, 100, [PhiloxStream(key)]) == batched
    assert [smoothed.certify_batch(x[None], 50, 300, 0.01, 1000, [PhiloxStream(key)])[0] for x in xs] == batched


def test_the_guarantee_holds_with_counter_based_noise():
    """Inputs of a half-space classifier at a known margin, each certified on its own stream: the false
    certificates stay within what alpha allows, and the certificates are not vacuous."""
    sigma, alpha, trials, w = 0.5, 0.2, 300, [0.6, -0.8, 0.0, 0.0]
    x, true_radius = halfspace_input(0.8, sigma, w)
    smoothed = Smooth(HalfSpace(w, 0.0), 2, sigma, rng="philox")
    xs = x.unsqueeze(0).expand(trials, -1, -1, -1)
    certs = smoothed.certify_batch(
        xs, 10, 100, alpha, 10_000, [PhiloxStream.from_key(input_seeds(1, i).value(64)) for i in range(trials)]
    )
    assert false_certificates(certs, 1, true_radius) <= binom.ppf(1 - 1e-4, trials, alpha)
    assert sum(c.prediction == 1 for c in certs) > trials / 2
    # the votes follow the closed form P(class 1) = 0.8 (a z-test over 50,000 votes)
    counts = smoothed.sampler.counts(xs[:50], [1000] * 50, 10_000, [PhiloxStream((7, i)) for i in range(50)])
    p = counts[:, 1].sum() / counts.sum()
    assert abs(p - 0.8) < 4 * np.sqrt(0.8 * 0.2 / counts.sum())


def test_streams_of_the_wrong_kind_and_unknown_generators_are_refused():
    with pytest.raises(CertkitError, match="unknown noise generator"):
        Smooth(linear_model(), 3, 0.5, rng="sobol")
    philox, plain = Smooth(linear_model(), 3, 0.5, rng="philox"), Smooth(linear_model(), 3, 0.5)
    x = torch.rand(1, 4, 4)
    with pytest.raises(CertkitError, match="PhiloxStream"):
        philox.certify(x, 10, 100, 0.01, 100, torch.Generator().manual_seed(0))
    with pytest.raises(CertkitError, match=r"torch\.Generator"):
        plain.certify(x, 10, 100, 0.01, 100, PhiloxStream((0, 0)))
    # no stream: a key from torch's global generator, reproducible under torch.manual_seed
    torch.manual_seed(5)
    first = philox.predict(x, 200, 0.01, 100)
    torch.manual_seed(5)
    assert philox.predict(x, 200, 0.01, 100) == first


class TinyDataset:
    def __init__(self) -> None:
        self.images = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i % 3


def rows(path: Path) -> list[tuple]:
    r = read_results(path)
    return list(zip(r.idx.tolist(), r.predict.tolist(), r.radius.tolist()))


@pytest.mark.parametrize("shared_noise", [0, 5])
def test_a_dataset_run_is_the_same_however_it_is_batched_sharded_or_resumed(tmp_path: Path, shared_noise: int):
    model, data = linear_model(), TinyDataset()

    def run(out: Path, rng: str = "philox", **plan: object) -> None:
        smoothed = Smooth(model, 3, 0.5, shared_noise=shared_noise, rng=rng)
        settings = {"n0": 20, "n": 300, "alpha": 0.01, "batch_size": 200, **plan}
        certify_dataset(smoothed, data, RunPlan(**settings), out=out, progress=False, resume=True)  # type: ignore[arg-type]

    run(tmp_path / "a.tsv", inputs_per_batch=5)
    reference = rows(tmp_path / "a.tsv")
    assert read_results(tmp_path / "a.tsv").settings["rng"] == "philox"
    run(tmp_path / "b.tsv", inputs_per_batch=5, batch_size=1000)
    assert rows(tmp_path / "b.tsv") == reference
    for i in range(2):
        run(tmp_path / f"s{i}.tsv", inputs_per_batch=5, shard=(i, 2))
    merge_results([tmp_path / "s0.tsv", tmp_path / "s1.tsv"], tmp_path / "merged.tsv")
    assert rows(tmp_path / "merged.tsv") == reference
    # a file cut after five rows resumes to the same rows; the torch generator may not continue it
    cut = tmp_path / "cut.tsv"
    lines = (tmp_path / "a.tsv").read_text().splitlines(keepends=True)
    cut.write_text("".join(lines[:6]))
    (tmp_path / "cut.tsv.json").write_text((tmp_path / "a.tsv.json").read_text())
    with pytest.raises(CertkitError, match="rng"):
        run(cut, rng="torch", inputs_per_batch=5)
    run(cut, inputs_per_batch=5)
    assert rows(cut) == reference
    # and the torch generator gives other draws of the same distribution: some radius differs
    run(tmp_path / "torch.tsv", rng="torch", inputs_per_batch=5)
    assert rows(tmp_path / "torch.tsv") != reference
    assert "rng" not in read_results(tmp_path / "torch.tsv").settings


@pytest.mark.slow  # torch.compile of the noise and of a small network (inductor's C++ build on CPU)
def test_compiled_counter_noise_equals_eager():
    key = (0xDEADBEEF, 0x12345678)
    stream = PhiloxStream(key)
    compiled = torch.compile(standard_normal, dynamic=False)
    draws = torch.arange(1000, 1500)
    assert torch.equal(compiled(*stream.key_tensors(), draws, 784), standard_normal(*stream.key_tensors(), draws, 784))
    model, xs = linear_model(), torch.rand(3, 1, 4, 4)
    keys = [(1, i) for i in range(3)]
    eager = Smooth(model, 3, 0.5, rng="philox").sampler.counts(xs, [300] * 3, 256, [PhiloxStream(k) for k in keys])
    fused = Smooth(model, 3, 0.5, rng="philox", compile=True)
    counts = fused.sampler.counts(xs, [300] * 3, 256, [PhiloxStream(k) for k in keys])
    assert np.abs(counts - eager).sum() <= 2  # the compiled network may round a boundary vote differently


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
@pytest.mark.parametrize("rng", ["torch", "philox"])
@pytest.mark.parametrize("shared_noise", [0, 4])
def test_cuda_graph_certification_counts_like_eager(rng: str, shared_noise: int):
    """Compiled on CUDA, every forward batch (noise and network) is a CUDA-graph replay; the votes are the
    eager ones, batch after batch (a replay overwriting a batch still in use would show here)."""
    from certkit.models import create_model

    torch.manual_seed(0)
    model = create_model("lenet", 10, (1, 28, 28)).cuda().eval()
    xs = torch.rand(4, 1, 28, 28)

    def counts(compile: bool) -> np.ndarray:
        smoothed = Smooth(model, 10, 0.25, compile=compile, shared_noise=shared_noise, rng=rng)
        sampler = smoothed.sampler
        if shared_noise:
            return sampler.counts(xs, [2500] * 4, 1000, [sampler.group_stream(0, 0)])
        return sampler.counts(xs, [2500, 1200, 700, 300], 1000, [sampler.input_stream(0, i) for i in range(4)])

    assert np.abs(counts(True) - counts(False)).sum() <= 4  # kernels may round a boundary vote differently
