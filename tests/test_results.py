"""The standard TSV: exact bytes, reading other code bases' files, resume, merge, summaries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from certkit.errors import CertkitError
from certkit.results import (
    CERTIFY_COLUMNS,
    ResultWriter,
    format_radius,
    format_time,
    merge_results,
    parse_time,
    planned_indices,
    read_results,
    sidecar_path,
    summary_path,
    write_sidecar,
)
from certkit.summary import write_summary

SETTINGS = {"sigma": 0.25, "n0": 100, "n": 100_000, "alpha": 0.001, "skip": 1, "max": -1, "shard": None}


def test_radius_is_floored_to_six_digits_and_time_printed_like_the_reference():
    # 3.8114 as a float is 3.81139999...: the floor of its exact value keeps the last digit below
    assert [format_radius(r) for r in [0.9533, 1.9066, 3.8114, 1.0, 0.0, 0.0277, 2.7e-05, 0.95311119]] == [
        "0.9533",
        "1.9066",
        "3.81139",
        "1.0",
        "0.0",
        "0.0276999",
        "2.69999e-05",
        "0.953111",
    ]
    assert format_time(0.694666) == "0:00:00.694666"
    assert format_time(2.0) == "0:00:02"
    assert format_time(3725.5) == "1:02:05.500000"
    assert parse_time("0:00:00.694666") == pytest.approx(0.694666)
    assert parse_time("15.4") == pytest.approx(15.4)
    assert parse_time("1 day, 0:00:01") == pytest.approx(86401)


def test_published_radius_never_exceeds_the_proved_one():
    from certkit.smoothing.statistics import max_radius

    # all votes unanimous: CERTIFY proves 0.799644... (sigma 0.25) and 1.599289... (sigma 0.5) at n = 10,000;
    # the reference's {:.3} publishes 0.8 and 1.6
    for sigma in (0.25, 0.5):
        proved = max_radius(sigma, 10_000, 0.001)
        shown = format_radius(proved)
        assert float(shown) <= proved and proved - float(shown) < 1e-5 * proved and float(shown) != round(proved, 1)
    rng = np.random.default_rng(0)
    radii = np.concatenate(
        [rng.uniform(0, 4, 20_000), 10.0 ** rng.uniform(-8, 2, 20_000), rng.integers(0, 5, 100) + 0.0]
    )
    for r in radii.tolist():
        assert float(format_radius(r)) <= r
        assert float(format_radius(r)) >= r * (1 - 1e-5)


def test_certify_file_byte_for_byte(tmp_path: Path):
    path = tmp_path / "out.tsv"
    with ResultWriter(path, "certify", SETTINGS) as out:
        out.write_certify(0, 9, 9, 0.59912, 0.694666)
        out.write_certify(1, 2, -1, 0.0, 1.5)
        out.write_certify(2, 1, 3, 0.95311, 2.0)
    assert path.read_bytes() == (
        b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
        b"0\t9\t9\t0.599119\t1\t0:00:00.694666\n"
        b"1\t2\t-1\t0.0\t0\t0:00:01.500000\n"
        b"2\t1\t3\t0.95311\t0\t0:00:02\n"
    )
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["settings"] == SETTINGS and meta["kind"] == "certify"


def test_predict_file_and_extra_columns(tmp_path: Path):
    path = tmp_path / "p.tsv"
    with ResultWriter(path, "predict", {"n": 1000}) as out:
        out.write_predict(0, 3, 3, 0.25)
        out.write_predict(5, 4, -1, 0.5)
    assert path.read_text().splitlines() == [
        "idx\tlabel\tpredict\tcorrect\ttime",
        "0\t3\t3\t1\t0:00:00.250000",
        "5\t4\t-1\t0\t0:00:00.500000",
    ]
    res = read_results(path)
    assert (
        res.kind == "predict" and res.radius is None and res.idx.tolist() == [0, 5] and res.correct.tolist() == [1, 0]
    )

    extra = tmp_path / "a.tsv"
    with ResultWriter(extra, "certify", {}, extra_columns=("samples",)) as out:
        out.write_certify(0, 1, 1, 0.5, 1.0, samples=12600)
    assert extra.read_text().splitlines()[0].endswith("time\tsamples")
    assert read_results(extra).samples.tolist() == [12600]


def test_read_accepts_plain_seconds_and_a_complete_last_line_without_newline(tmp_path: Path):
    path = tmp_path / "cifar.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.5\t1\t15.4\n20\t8\t-1\t0.0\t0\t16.1")
    res = read_results(path)
    assert res.idx.tolist() == [0, 20] and res.time_seconds.tolist() == pytest.approx([15.4, 16.1])
    assert res.settings == {}


def test_read_drops_a_partial_last_row(tmp_path: Path):
    path = tmp_path / "partial.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\t0.5\t1\t0:00:01\n1\t3\t3\t0.9")
    assert read_results(path).idx.tolist() == [0]


@pytest.mark.parametrize("content", [b"hello\tworld\n1\t2\n", b"\x89PNG\r\n\x1a\n\x00\x00", b""])
def test_not_a_results_file(tmp_path: Path, content: bytes):
    path = tmp_path / "junk.tsv"
    path.write_bytes(content)
    with pytest.raises(CertkitError, match=r"junk\.tsv"):
        read_results(path)
    with pytest.raises(CertkitError, match=r"junk\.tsv"):
        read_results(tmp_path / "missing" / "junk.tsv")


def test_bad_row_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\tabc\t1\t0:00:01\n")
    with pytest.raises(CertkitError, match=r"bad\.tsv"):
        read_results(path)
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\n")
    with pytest.raises(CertkitError, match=r"bad\.tsv:2"):
        read_results(path)


def _write_rows(path: Path, indices, settings=SETTINGS, resume=True) -> ResultWriter:
    out = ResultWriter(path, "certify", settings, resume=resume)
    for i in indices:
        if i not in out.done_indices:
            out.write_certify(i, i % 10, i % 10, 0.1 * (i % 7), 1.0)
    return out


def test_resume_after_a_truncated_row_continues_without_duplicates_or_drops(tmp_path: Path):
    full = tmp_path / "full.tsv"
    _write_rows(full, range(8)).close()
    cut = tmp_path / "cut.tsv"
    _write_rows(cut, range(5)).close()
    with open(cut, "a") as f:
        f.write("5\t5\t5\t0.")  # killed mid-row
    out = _write_rows(cut, range(8))
    assert out.done_indices == set(range(8))
    out.close()
    assert cut.read_text() == full.read_text()


def test_resume_of_a_file_killed_before_its_header_was_complete(tmp_path: Path):
    path = tmp_path / "early.tsv"
    path.write_text("idx\tlab")
    _write_rows(path, range(2)).close()
    assert read_results(path).idx.tolist() == [0, 1]


def test_resume_refuses_different_settings_naming_the_keys(tmp_path: Path):
    path = tmp_path / "r.tsv"
    _write_rows(path, range(3)).close()
    with pytest.raises(CertkitError, match="alpha, sigma"):
        ResultWriter(path, "certify", {**SETTINGS, "sigma": 0.5, "alpha": 0.01})
    with pytest.raises(CertkitError, match="not a predict result file"):
        ResultWriter(path, "predict", SETTINGS)
    # resume=False starts over
    _write_rows(path, [7], settings={**SETTINGS, "sigma": 0.5}, resume=False).close()
    assert read_results(path).idx.tolist() == [7]


def test_resume_refuses_a_file_that_is_not_a_result_file(tmp_path: Path):
    path = tmp_path / "notes.tsv"
    path.write_text("some\tother\ttable\n")
    with pytest.raises(CertkitError, match="not a certify result file"):
        ResultWriter(path, "certify", SETTINGS)


def test_planned_indices_follow_skip_max_and_shards():
    assert planned_indices(10, skip=3) == [0, 3, 6, 9]
    assert planned_indices(10, skip=2, max_idx=7) == [0, 2, 4, 6]
    shards = [planned_indices(100, 7, -1, (i, 3)) for i in range(3)]
    assert sorted(i for shard in shards for i in shard) == planned_indices(100, 7)
    with pytest.raises(CertkitError):
        planned_indices(10, shard=(3, 3))


def test_merge_of_shards_equals_the_unsharded_rows(tmp_path: Path):
    settings = {**SETTINGS, "dataset_size": 20, "skip": 2}
    whole = tmp_path / "whole.tsv"
    _write_rows(whole, planned_indices(20, 2), settings).close()
    shards = []
    for i in range(3):
        p = tmp_path / f"shard{i}.tsv"
        _write_rows(p, planned_indices(20, 2, -1, (i, 3)), {**settings, "shard": [i, 3]}).close()
        shards.append(p)
    merged = merge_results(shards, tmp_path / "merged.tsv")
    assert merged.read_text() == whole.read_text()
    # the unsharded run's sidecar too ("shard": null), so the merged file resumes as that run's would
    assert sidecar_path(merged).read_text() == sidecar_path(whole).read_text()


def test_a_merged_file_resumes_and_grows_with_the_unsharded_settings(tmp_path: Path):
    settings = {**SETTINGS, "dataset_size": 20, "skip": 2, "max": 10}
    shards = []
    for i in range(2):
        p = tmp_path / f"shard{i}.tsv"
        _write_rows(p, planned_indices(20, 2, 10, (i, 2)), {**settings, "shard": [i, 2]}).close()
        shards.append(p)
    merged = merge_results(shards, tmp_path / "merged.tsv")
    before = merged.read_text()
    with ResultWriter(merged, "certify", settings) as out:
        assert out.done_indices == set(planned_indices(20, 2, 10))
    assert merged.read_text() == before
    grown = _write_rows(merged, planned_indices(20, 2), {**settings, "max": -1})
    grown.close()
    whole = tmp_path / "whole.tsv"
    _write_rows(whole, planned_indices(20, 2), {**settings, "max": -1}).close()
    assert merged.read_text() == whole.read_text()
    with pytest.raises(CertkitError, match="settings differ in shard"):  # it is the unsharded run's file
        ResultWriter(merged, "certify", {**settings, "max": -1, "shard": [0, 2]})


def test_a_file_merged_without_its_shard_setting_resumes_and_records_it(tmp_path: Path):
    # older versions dropped "shard" from a merged file's settings
    settings = {**SETTINGS, "dataset_size": 6}
    path = tmp_path / "merged.tsv"
    _write_rows(path, range(6), settings).close()
    meta = json.loads(sidecar_path(path).read_text())
    del meta["settings"]["shard"]
    sidecar_path(path).write_text(json.dumps(meta))
    # nothing vouches for the missing setting but the rows, each checked against the new run's plan
    with pytest.raises(CertkitError, match=r"merged\.tsv:3: index 1 is not in the run's plan"):
        ResultWriter(path, "certify", {**settings, "shard": [0, 2]})
    assert "shard" not in json.loads(sidecar_path(path).read_text())["settings"]  # a refusal rewrites nothing
    with ResultWriter(path, "certify", settings) as out:
        assert out.done_indices == set(range(6))
    assert json.loads(sidecar_path(path).read_text())["settings"] == json.loads(json.dumps(settings))


def test_the_file_torchrun_ranks_merge_is_resumed_and_grown_by_an_unsharded_run(tmp_path: Path):
    from certkit.cli import _merge_own_shards
    from certkit.smoothing.runner import RunPlan, certify_dataset
    from certkit.smoothing.smooth import Smooth

    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(1, 4, 4, generator=gen), i % 3) for i in range(12)]
    smoothed = Smooth(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)), 3, 0.25)

    def certify(out: Path, max_idx: int, shard: tuple[int, int] | None = None) -> dict | None:
        plan = RunPlan(n0=20, n=300, alpha=0.01, batch_size=200, max_idx=max_idx, shard=shard)
        return certify_dataset(smoothed, data, plan, out=out, progress=False)

    out = tmp_path / "r.tsv"
    shards = [f"{out}.shard{r}of2" for r in range(2)]  # what each rank writes under torchrun
    for r, shard in enumerate(shards):
        certify(Path(shard), 6, (r, 2))
    _merge_own_shards(shards, str(out))
    before = out.read_text()
    assert (certify(out, 6) or {}).get("N") == 6 and out.read_text() == before
    assert (certify(out, 12) or {}).get("N") == 12
    certify(tmp_path / "whole.tsv", 12)
    grown, whole = read_results(out), read_results(tmp_path / "whole.tsv")
    for column in ("idx", "predict", "radius"):
        assert getattr(grown, column).tolist() == getattr(whole, column).tolist()


def test_merge_takes_no_cut_last_line_for_a_row(tmp_path: Path):
    """A shard killed mid-row ends in an unterminated line; as resuming does, merge does not take it for a row
    (a cut number would pass as a smaller one), so the row is missing and the merge refused."""
    settings = {**SETTINGS, "dataset_size": 4}
    shards = [tmp_path / f"s{i}.tsv" for i in range(2)]
    for i, p in enumerate(shards):
        _write_rows(p, planned_indices(4, 1, -1, (i, 2)), {**settings, "shard": [i, 2]}).close()
    # the newline and the last character: "0:00:01" cut to "0:00:0", which still reads as a time (0 s)
    shards[1].write_bytes(shards[1].read_bytes()[:-2])
    with pytest.raises(CertkitError, match="1 planned indices are missing from the shards"):
        merge_results(shards, tmp_path / "m.tsv")


def test_an_existing_file_is_resumed_into_the_shards_that_plan_its_rows(tmp_path: Path):
    """Under torchrun an existing --out is resumed as one process resumes it: the same refusals, nothing
    written when refused; its rows go to the shard files whose plan holds them, with the sidecar each shard's
    own run writes, and merging those gives the file back; a shard left by an interrupted run is kept."""
    from certkit.results import resume_into_shards

    settings = {**SETTINGS, "dataset_size": 20, "skip": 2, "max": 13}
    out = tmp_path / "r.tsv"
    _write_rows(out, planned_indices(20, 2, 13), settings).close()
    shards = [tmp_path / f"r.tsv.shard{r}of3" for r in range(3)]
    with pytest.raises(CertkitError, match="settings differ in seed"):
        resume_into_shards(out, shards, "certify", {**settings, "seed": 4})
    assert not any(p.exists() for p in shards)
    resume_into_shards(out, shards, "certify", settings)
    assert merge_results(shards, tmp_path / "again.tsv").read_text() == out.read_text()
    for shard in shards:
        shard.unlink()
    grown = {**settings, "max": -1}  # a larger --max grows the file, as for one process
    resume_into_shards(out, shards, "certify", grown)
    for r, shard in enumerate(shards):
        assert read_results(shard).idx.tolist() == planned_indices(20, 2, 13, (r, 3))
        with ResultWriter(shard, "certify", {**grown, "shard": [r, 3]}) as w:  # its own run resumes it
            assert w.done_indices == set(planned_indices(20, 2, 13, (r, 3)))
    shards[0].write_text(shards[0].read_text().splitlines()[0] + "\n")  # an interrupted run's own shard
    resume_into_shards(out, shards, "certify", grown)
    assert read_results(shards[0]).idx.tolist() == []
    # a file killed before its header was complete starts afresh, as for one process
    early = tmp_path / "early.tsv"
    early.write_text("idx\tlab")
    resume_into_shards(early, [tmp_path / "e0", tmp_path / "e1"], "certify", settings)
    assert read_results(tmp_path / "e0").idx.tolist() == [] and read_results(early).idx.tolist() == []


@pytest.mark.parametrize(
    "row, message",
    [
        ("0\t3\t5\t2.0\t1", "correct must be 0 for predict 5 and label 3"),  # a wrong prediction marked correct
        ("0\t3\t-1\t0.0\t1", "correct must be 0 for predict -1 and label 3"),  # so is an abstention
        ("0\t3\t3\t0.5\t0", "correct must be 1 for predict 3 and label 3"),
        ("0\t3\t-1\t3.0\t0", r"an abstention \(predict -1\) certifies no radius"),
    ],
)
def test_a_row_that_contradicts_itself_is_refused(tmp_path: Path, row: str, message: str):
    """correct is predict == label in every format: a row that says otherwise would count in ACR and
    certified accuracy an image that was not certified correct, on reading and on resume."""
    path = tmp_path / "lie.tsv"
    path.write_text(f"idx\tlabel\tpredict\tradius\tcorrect\ttime\n{row}\t0:00:01\n")
    with pytest.raises(CertkitError, match=rf"lie\.tsv:2: {message}"):
        read_results(path)
    write_sidecar(path, "certify", CERTIFY_COLUMNS, SETTINGS)
    with pytest.raises(CertkitError, match=message):
        ResultWriter(path, "certify", SETTINGS)


@pytest.mark.parametrize(
    "shard, message",
    [
        ([0, 10**9], r"missing 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, \.\.\.\)"),  # no list of a billion shards
        (["b", 2], "malformed shard"),
        (3, "malformed shard"),
        ([1], "malformed shard"),
        ({"1": 2}, "malformed shard"),
        ([2, 2], "malformed shard"),
        ([0, 2**64], "malformed shard"),
    ],
)
def test_merge_checks_shard_settings_before_using_them(tmp_path: Path, shard: object, message: str):
    a = tmp_path / "a.tsv"
    _write_rows(a, [0], SETTINGS).close()
    side = json.loads(sidecar_path(a).read_text())
    side["settings"]["shard"] = shard
    sidecar_path(a).write_text(json.dumps(side))
    with pytest.raises(CertkitError, match=message):
        merge_results([a], tmp_path / "m.tsv")


def test_merge_refuses_a_plan_too_large_to_count(tmp_path: Path):
    a = tmp_path / "a.tsv"
    _write_rows(a, [0], {**SETTINGS, "dataset_size": 10**30}).close()
    with pytest.raises(CertkitError, match="malformed plan settings"):
        merge_results([a], tmp_path / "m.tsv")


def test_merge_refuses_a_shard_whose_header_is_not_its_settings_files(tmp_path: Path):
    settings = {**SETTINGS, "dataset_size": 2}
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    _write_rows(a, [0], {**settings, "shard": [0, 2]}).close()
    _write_rows(b, [1], {**settings, "shard": [1, 2]}).close()
    a.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\n0\t0\t0\t0.0\t1\t0:00:01\t100\n")
    with pytest.raises(CertkitError, match=r"a\.tsv: its header \(idx label predict radius correct time samples\)"):
        merge_results([a, b], tmp_path / "m.tsv")
    assert not (tmp_path / "m.tsv").exists()


def test_merge_refusals(tmp_path: Path):
    settings = {**SETTINGS, "dataset_size": 6}
    a, b, c = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "c.tsv"
    _write_rows(a, [0, 2, 4], {**settings, "shard": [0, 2]}).close()
    _write_rows(b, [1, 3, 5], {**settings, "shard": [1, 2], "sigma": 0.5}).close()
    with pytest.raises(CertkitError, match="settings differ in sigma"):
        merge_results([a, b], tmp_path / "m.tsv")
    _write_rows(c, [1, 2, 3, 5], {**settings, "shard": [1, 2]}).close()
    with pytest.raises(CertkitError, match=r"c\.tsv:3: index 2 is not in the run's plan"):
        merge_results([a, c], tmp_path / "m.tsv")
    whole_a, whole_c = tmp_path / "whole_a.tsv", tmp_path / "whole_c.tsv"
    _write_rows(whole_a, [0, 1, 2], settings).close()
    _write_rows(whole_c, [2, 3, 4, 5], settings).close()
    with pytest.raises(CertkitError, match="index 2 appears in both"):
        merge_results([whole_a, whole_c], tmp_path / "m.tsv")
    with pytest.raises(CertkitError, match=r"missing 1\)"):
        merge_results([a], tmp_path / "m.tsv")
    _write_rows(c, [1, 3], {**settings, "shard": [1, 2]}, resume=False).close()
    with pytest.raises(CertkitError, match="missing from the shards"):
        merge_results([a, c], tmp_path / "m.tsv")


def test_a_radius_above_what_n_allows_is_flagged_with_slack_only_for_other_tools_files(tmp_path: Path):
    """certkit floors its radii, so any excess in its own file is a bug; a reference file (no sidecar) may
    round to nearest at three significant digits."""
    from certkit.smoothing.statistics import max_radius

    bound = max_radius(0.25, 1000, 0.001)
    over = float(f"{bound * 1.003:.6f}")  # 0.3% above: inside the reference's rounding, not certkit's floor
    mine = tmp_path / "mine.tsv"
    with ResultWriter(mine, "certify", {"sigma": 0.25, "n": 1000, "alpha": 0.001}) as out:
        out.write_certify(0, 1, 1, over, 1.0)
    assert write_summary(mine)["radius_bound_violated"] is True
    theirs = tmp_path / "theirs.tsv"
    theirs.write_text(f"idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t{over}\t1\t0:00:01\n")
    settings = {"sigma": 0.25, "n": 1000, "alpha": 0.001}
    assert write_summary(theirs, settings=settings)["radius_bound_violated"] is False
    assert write_summary(mine, settings=settings)["radius_bound_violated"] is True


def test_summary_beside_the_file(tmp_path: Path):
    path = tmp_path / "run.tsv"
    with ResultWriter(path, "certify", {"sigma": 0.25, "n": 100_000, "alpha": 0.001}) as out:
        out.write_certify(0, 1, 1, 0.95, 1.0)  # below the largest radius n allows, 0.95286
        out.write_certify(1, 2, 2, 0.3, 1.0)
        out.write_certify(2, 3, 4, 0.7, 1.0)
        out.write_certify(3, 4, -1, 0.0, 3.0)
    summary = write_summary(path)
    assert summary_path(path) == tmp_path / "run.summary.json"
    on_disk = json.loads(summary_path(path).read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["N"] == 4 and on_disk["acr"] == pytest.approx((0.95 + 0.3) / 4, abs=1e-5)
    assert on_disk["certified_accuracy"] == {"0": 0.5, "0.25": 0.5, "0.5": 0.25, "0.75": 0.25}
    assert on_disk["abstain_rate"] == 0.25 and on_disk["radius_bound_violated"] is False
    assert on_disk["parameters"]["sigma"] == 0.25 and on_disk["seconds_per_image"] == pytest.approx(1.5)
    assert np.isfinite(on_disk["certified_accuracy_high_prob"]["0"])


@pytest.mark.parametrize(
    "plan, message",
    [
        ({"max_idx": -2}, "max must be -1 (all)"),
        ({"max_idx": 0}, "max must be -1 (all)"),
        ({"max_idx": 2**53 + 1}, "max must be"),
        ({"skip": 2**53 + 1}, "skip must be an integer from 1"),
        ({"shard": (0, 2**53 + 1)}, "shard must be i/k"),
    ],
)
def test_a_plan_no_settings_file_could_record_is_refused_before_any_row(plan: dict, message: str):
    """The bounds a settings file is read with (a resume) are the bounds a plan is made with: a run that
    starts can always be resumed by the same call. The command line's flag types hold the same bound."""
    from certkit import cli
    from certkit.results import MAX_INDEX
    from certkit.smoothing.runner import RunPlan

    with pytest.raises(CertkitError, match=re.escape(message)):
        planned_indices(10, **plan)
    with pytest.raises(CertkitError, match=re.escape(message)):
        RunPlan(**plan)
    assert cli._MAX_INDEX == MAX_INDEX
    assert planned_indices(10, max_idx=2**53, skip=3, shard=(1, 2**53)) == [3]
