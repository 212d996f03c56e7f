"""How noise streams are seeded: distinct within a run by construction (a certificate bound over independent
rows needs it), unrelated across neighbouring run seeds, and recorded so that a result file is never
continued from other streams or with the network run another way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from certkit.errors import CertkitError
from certkit.results import sidecar_path
from certkit.smoothing.philox import PhiloxStream
from certkit.smoothing.samplers import NOISE_STREAMS, group_seeds, input_generator, input_seeds, shared_generator
from test_certify_runner import COMMON, TinyDataset, run, tiny_model


def test_inputs_that_drew_the_same_cpu_noise_no_longer_do() -> None:
    """A CPU torch.Generator keeps 32 bits of its seed: under the old hashed seeds, inputs 1805 and 3645 of
    run seed 39 drew identical noise (one run in a hundred of 10,000 images had such a pair)."""
    assert not torch.equal(
        torch.randn(8, generator=input_generator(39, 1805)), torch.randn(8, generator=input_generator(39, 3645))
    )


@pytest.mark.parametrize("seed", [0, 39, 2**32, 2**63 - 1])
def test_the_streams_of_one_run_are_distinct_in_every_seed_space(seed: int) -> None:
    """Every input and group stream and the vote check's of one run have distinct 32-bit (CPU), 63-bit (CUDA)
    and 64-bit (Philox) seeds: checked over 100,000 inputs and groups, past the birthday bound of 2^32."""
    keys = [input_seeds(seed, i) for i in range(100_000)] + [group_seeds(seed, g) for g in range(100_000)]
    for bits in (32, 63, 64):
        values = {key.value(bits) for key in keys}
        assert len(values) == len(keys)


def test_a_cpu_generator_keeps_32_bits_so_the_stream_seed_fits_in_them() -> None:
    key = input_seeds(5, 7)
    assert 0 <= key.value(32) < 2**32
    assert torch.equal(
        torch.randn(4, generator=input_generator(5, 7)),
        torch.randn(4, generator=torch.Generator().manual_seed(key.value(32))),
    )


def test_run_seeds_are_read_at_full_width() -> None:
    """The old SeedSequence([seed, idx]) read seed 2^32's input 0 as seed 0's input 1 (trailing zero words
    are ignored); the run seed's two words now always count."""
    assert input_seeds(2**32, 0).value(64) != input_seeds(0, 1).value(64)
    assert not torch.equal(
        torch.randn(8, generator=input_generator(2**32, 0)), torch.randn(8, generator=input_generator(0, 1))
    )
    # neighbouring run seeds are unrelated, not shifted copies of each other
    assert abs(input_seeds(1, 0).value(64) - input_seeds(0, 0).value(64)) > 2**40
    assert (
        PhiloxStream.from_key(input_seeds(0, 3).value(64)).key != PhiloxStream.from_key(input_seeds(0, 4).value(64)).key
    )
    assert not torch.equal(
        torch.randn(4, generator=shared_generator(0, 3)), torch.randn(4, generator=input_generator(0, 3))
    )


def test_a_file_of_other_streams_or_speed_options_is_not_continued(tmp_path: Path) -> None:
    model, data = tiny_model(), TinyDataset()
    out = tmp_path / "r.tsv"
    run(model, data, out=out, max_idx=3, **COMMON)
    side = json.loads(sidecar_path(out).read_text())
    assert side["settings"]["noise_streams"] == NOISE_STREAMS
    assert side["settings"]["speed_options"] == {
        "amp": None,
        "channels_last": False,
        "compile": False,
        "stem_split": False,
    }
    # the same run resumes; with the network run channels-last it would hold two classifiers' certificates
    run(model, data, out=out, max_idx=3, **COMMON)
    with pytest.raises(CertkitError, match=r"speed_options \(--amp, --channels-last, --compile\)"):
        run(model, data, out=out, max_idx=3, smooth_options={"channels_last": True}, **COMMON)
    # a file certified before the streams were made distinct cannot be continued from the new ones
    del side["settings"]["noise_streams"]
    sidecar_path(out).write_text(json.dumps(side))
    with pytest.raises(CertkitError, match=r"noise_streams .*certify a file of an older certkit again"):
        run(model, data, out=out, max_idx=3, **COMMON)
