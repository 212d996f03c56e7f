"""Metrics on hand-built files and on the field's published Fashion-MNIST result files."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from certkit import report
from certkit.errors import CertkitError

#: the field's published Fashion-MNIST result files (sigma_<s>/<method>.tsv), read from outside the repository
PEER_VARIABLE = "CERTKIT_PEER_RESULTS"
PEER = Path(os.environ.get(PEER_VARIABLE) or "/work/shared/peer-results/fashion-mnist")


def skip_without_peer_results(files: list[Path]) -> None:
    """Skip, naming where the files were looked for and how to point there, when any of ``files`` is missing."""
    missing = [f for f in files if not f.exists()]
    if missing:
        pytest.skip(
            f"peer results not available: {missing[0]} missing under {PEER} "
            f"(set {PEER_VARIABLE} to the folder holding sigma_<s>/<method>.tsv)"
        )


HAND_BUILT = (
    "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    "0\t1\t1\t0.953\t1\t0:00:01\n"
    "1\t2\t2\t0.25\t1\t0:00:01\n"
    "2\t3\t5\t0.8\t0\t0:00:01\n"  # certified, but the wrong class: counts as 0
    "3\t4\t-1\t0.0\t0\t0:00:01\n"  # abstain counts as wrong
    "4\t5\t5\t0.1\t1\t0:00:01\n"
)


@pytest.fixture
def hand_built(tmp_path: Path) -> Path:
    path = tmp_path / "hand.tsv"
    path.write_text(HAND_BUILT)
    return path


def test_acr_and_certified_accuracy_over_all_rows(hand_built: Path):
    assert report.acr(hand_built) == pytest.approx((0.953 + 0.25 + 0.1) / 5)
    assert report.certified_accuracy(hand_built, [0.0, 0.1, 0.25, 0.5, 1.0]).tolist() == [0.6, 0.6, 0.4, 0.2, 0.0]
    assert report.certified_accuracy(hand_built, 0.25) == pytest.approx(0.4)  # radius >= r, inclusive
    assert report.abstain_rate(hand_built) == pytest.approx(0.2)
    assert report.default_grid(hand_built) == [0.0, 0.25, 0.5, 0.75]
    results = report.load(hand_built)
    assert report.acr(results) == report.acr(hand_built)


def test_paired_difference_is_over_the_common_images_in_the_first_files_order(hand_built: Path, tmp_path: Path):
    other = tmp_path / "other.tsv"
    other.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
        "4\t5\t5\t0.3\t1\t0:00:01\n"  # the same images in another order, one missing, one extra
        "2\t3\t3\t0.5\t1\t0:00:01\n"
        "0\t1\t1\t0.9\t1\t0:00:01\n"
        "1\t2\t-1\t0.0\t0\t0:00:01\n"
        "9\t0\t0\t2.0\t1\t0:00:01\n"
    )
    pair = report.paired(hand_built, other)
    assert pair.rows_a.tolist() == [0, 1, 2, 4] and pair.rows_b.tolist() == [2, 3, 1, 0]
    mine, theirs = pair.certified()
    assert mine.tolist() == pytest.approx([0.953, 0.25, 0.0, 0.1]) and theirs.tolist() == pytest.approx(
        [0.9, 0, 0.5, 0.3]
    )
    d = [0.053, 0.25, -0.5, -0.2]
    diff, se = pair.acr_difference()
    assert diff == pytest.approx(sum(d) / 4)
    mean = sum(d) / 4
    assert se == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4))


def _shared_noise_file(path: Path, certified: list[float], skip: int, group: int) -> Path:
    """A certkit result file of images 0, skip, 2 skip, ... (label 0, all correct), certified on shared noise
    in groups of ``group`` when it is above 1."""
    from certkit.results import ResultWriter

    settings = {"sigma": 0.25, "n": 1000, "alpha": 0.001, "skip": skip, "shared_noise": group if group > 1 else 0}
    with ResultWriter(path, "certify", settings) as w:
        for k, r in enumerate(certified):
            w.write_certify(k * skip, 0, 0, r, 0.1)
    return path


def _cluster_se(d: list[float], clusters: list[int]) -> float:
    """The cluster-robust standard error of the mean of ``d``, written out from its definition."""
    mean = sum(d) / len(d)
    sums: dict[int, float] = {}
    for x, c in zip(d, clusters):
        sums[c] = sums.get(c, 0.0) + (x - mean)
    c = len(sums)
    return math.sqrt(c / (c - 1) * sum(v * v for v in sums.values())) / len(d)


def test_paired_error_counts_images_on_shared_noise_as_one_cluster(tmp_path: Path):
    """Images certified on one noise stream have correlated errors: the standard error of the difference is
    computed over their groups, which here (differences alike within a group) is larger than the
    independent-rows formula would claim."""
    rng = np.random.default_rng(0)
    shift = np.repeat(rng.normal(0, 0.1, 6), 4)  # 6 groups of 4 images that move together
    mine = [float(v) for v in np.round(0.5 + shift + rng.normal(0, 0.01, 24), 4)]
    theirs = [0.5] * 24
    a = _shared_noise_file(tmp_path / "a.tsv", mine, skip=3, group=4)
    b = _shared_noise_file(tmp_path / "b.tsv", theirs, skip=3, group=1)
    d = [x - 0.5 for x in report.paired(a, b).certified()[0].tolist()]
    diff, se = report.paired(a, b).acr_difference()
    assert diff == pytest.approx(sum(d) / 24)
    assert se == pytest.approx(_cluster_se(d, [k // 4 for k in range(24)]))
    mean = sum(d) / 24
    independent = math.sqrt(sum((x - mean) ** 2 for x in d) / 23 / 24)
    assert se > 1.5 * independent
    # the grouping is the certifier's: planned position over G, whichever file shares the noise
    assert report.paired(b, a).acr_difference()[1] == pytest.approx(se)
    # groups of either file join: G = 4 in one and G = 6 in the other leave clusters 0-11 and 12-23
    c = _shared_noise_file(tmp_path / "c.tsv", theirs, skip=3, group=6)
    assert report.paired(a, c).acr_difference()[1] == pytest.approx(_cluster_se(d, [k // 12 for k in range(24)]))
    # one group only: no spread to estimate the error from
    one = _shared_noise_file(tmp_path / "one.tsv", mine[:4], skip=3, group=4)
    assert math.isnan(report.paired(one, b).acr_difference()[1])


def test_paired_files_must_agree_on_labels(hand_built: Path, tmp_path: Path):
    other = tmp_path / "other.tsv"
    other.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.9\t1\t0:00:01\n1\t7\t7\t0.5\t1\t0:00:01\n")
    with pytest.raises(CertkitError, match=r"give image 1 labels 2 and 7 \(1 such images\)"):
        report.paired(hand_built, other)


def test_ratios_that_carry_a_claim_are_rounded_down():
    assert report.floor_ratio(32, 3) == "10.66" and report.floor_ratio(Fraction(32, 3), 1, 1) == "10.6"
    assert report.floor_ratio(0.99, 1, 3) == "0.989"  # the float 0.99 is 0.98999...: floored as it is
    assert report.floor_ratio(Fraction(99, 100), 1, 3) == "0.990"
    for undefined in [(1, 0), (1, -2), (float("nan"), 1), (1, float("inf"))]:
        assert report.floor_ratio(*undefined) == "–"


@pytest.mark.parametrize("rho", [0.001, 0.05])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.2])
@pytest.mark.parametrize("n", [100, 500, 1000, 10_000, 100_000])
def test_high_probability_bound_holds_at_its_level(n: int, alpha: float, rho: float):
    # independent rows: W ~ Binomial(n, alpha) wrong certificates; the bound fails when W / n > emp - bound
    deduction = 1.0 - report.high_prob_accuracy(1.0, alpha, rho, n)
    assert binom.sf(math.floor(deduction * n * (1 + 1e-12)), n, alpha) <= rho
    # shared noise in groups of 10, worst case: a group's wrong certificates all coincide (W = 10 Bin(n/10, alpha))
    grouped = 1.0 - (report.high_prob_accuracy(1.0, alpha, rho, n, group=10) or 0.0)
    assert binom.sf(math.floor(grouped * n / 10 * (1 + 1e-12)), n // 10, alpha) <= rho
    # a shard's rows fill their groups in part: n rows in n / 5 groups of 5 rows, each wrong together
    partial = 1.0 - (report.high_prob_accuracy(1.0, alpha, rho, n, group=10, groups=n // 5) or 0.0)
    assert binom.sf(math.floor(partial * n / 5 * (1 + 1e-12)), n // 5, alpha) <= rho


def test_high_probability_bound_is_clipped_and_omitted_when_vacuous():
    assert report.high_prob_accuracy(0.001, 0.001, 0.001, 10_000) == 0.0
    assert 0.9 - report.high_prob_accuracy(0.9, 0.001, 0.001, 10_000) == pytest.approx(0.0021)  # 21 of 10,000
    assert report.high_prob_accuracy(0.9, 0.2, 0.001, 3) is None
    assert report.high_prob_accuracy(0.9, 0.01, 0.001, 20, group=10) is None
    for impossible in (1, 21):  # 20 rows in groups of at most 10 form 2 to 20 groups
        with pytest.raises(CertkitError, match="form 2 to 20 groups"):
            report.false_certificate_bound(0.01, 0.001, 20, 10, impossible)


@pytest.mark.parametrize(
    "sigma,method,published",
    [
        ("0.25", "cohen", 0.670),
        ("0.25", "salman", 0.756),
        ("0.25", "macer", 0.727),
        ("0.25", "cat-rs", 0.757),
        ("0.5", "cohen", 1.056),
        ("0.5", "consistency", 1.212),
        ("1.0", "cohen", 1.316),
        ("1.0", "smoothmix", 1.534),
    ],
)
def test_peer_results_give_the_published_acr(sigma, method, published):
    path = PEER / f"sigma_{sigma}" / f"{method}.tsv"
    skip_without_peer_results([path])
    results = report.load(path)
    assert len(results) == 10_000
    assert round(report.acr(results), 3) == published
    # no radius above sigma * Phi^-1(alpha^(1/n)) at n = 100,000, alpha = 0.001 (printed to 3 digits)
    assert results.radius.max() <= round(3.811 * float(sigma), 3 if float(sigma) < 0.5 else 2)


def test_markdown_table_and_plot(hand_built: Path, tmp_path: Path):
    table = report.markdown_table({"hand": hand_built}, radii=[0.0, 0.5])
    assert table.splitlines()[0] == "| name | N | ACR | r=0 | r=0.5 | abstain |"
    # ACR 1.303 / 5 = 0.2606 is printed rounded down: 0.260, not 0.261
    assert table.splitlines()[2] == "| hand | 5 | 0.260 | 0.600 | 0.200 | 0.200 |"
    png = report.plot_curves({"hand": hand_built, "again": hand_built}, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_certified_figures_are_rounded_down_never_up(tmp_path: Path):
    # two of three images certified at 0.5: 0.6666..., which to nearest would read 0.667
    path = tmp_path / "thirds.tsv"
    rows = [f"{i}\t1\t1\t{r}\t1\t0:00:01" for i, r in enumerate((0.5, 0.5, 0.0))]
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + "\n".join(rows) + "\n")
    assert report.markdown_table({"t": path}, radii=[0.5]).splitlines()[2] == "| t | 3 | 0.333 | 0.666 | 0.000 |"
    assert "ACR 0.333" in report.curves({"t": path})[0].label
    # against integer arithmetic: every fraction k/N up to N = 1,000 at 3 places and as a percent at 1 place
    for n in range(1, 1001):
        for k in range(n + 1):
            assert report.floor_figure(Fraction(k, n)) == f"{k * 1000 // n / 1000:.3f}"
            assert report.floor_figure(Fraction(k, n) * 100, 1) == f"{k * 1000 // n / 10:.1f}"
    # a float is floored on its exact value: 0.29 is 0.28999..., which is why counts are given as fractions
    assert report.floor_figure(0.29) == "0.289" and report.floor_figure(Fraction(29, 100)) == "0.290"
    assert report.floor_figure(0.5) == "0.500" and report.floor_figure(-0.0005) == "-0.001"
    # an ACR 4e-10 below 0.26 is printed below it (rounding the mean at any precision coarser than that, before
    # flooring, would print 0.260)
    path = tmp_path / "acr.tsv"
    rows = [f"{i}\t1\t1\t0.26\t1\t0:00:01" for i in range(9999)] + ["9999\t1\t1\t0.259996\t1\t0:00:01"]
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n" + "\n".join(rows) + "\n")
    assert Fraction(26, 100) - Fraction(5, 10**10) < report.exact_acr(path) < Fraction(26, 100)
    assert report.markdown_table({"a": path}, radii=[0.26]).splitlines()[2] == "| a | 10000 | 0.259 | 0.999 | 0.000 |"


def test_column_labels_are_the_radii_their_figures_are_computed_at(tmp_path: Path):
    # one row certified at 0.127: at 0.126 it counts, at 0.13 it would not, so "r=0.13" would claim 1.000 falsely
    path = tmp_path / "r.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.127\t1\t0:00:01\n")
    radii = [0.126, 0.125, 0.121, 0.1234567, 1e-07]
    for latex in (False, True):
        head = report.report_files([str(path)], radii=radii, latex=latex).splitlines()[2 if latex else 0]
        labels = [cell.strip(" \\") for cell in head.replace("&", "|").split("|") if "r=" in cell]
        assert labels == ["r=0.126", "r=0.125", "r=0.121", "r=0.1234567", "r=1e-07"]
        assert [float(label[2:]) for label in labels] == radii
    assert report.radius_label(0.25) == "0.25" and report.radius_label(0.1 + 0.2) == "0.30000000000000004"
    # a float32 grid value is labelled as the float64 it widens to, the radius its column is computed at
    assert float(report.radius_label(np.float32(0.7))) == float(np.float32(0.7)) != 0.7


def test_predict_files_have_accuracy_but_no_radii(tmp_path: Path):
    path = tmp_path / "p.tsv"
    path.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:01\n1\t1\t-1\t0\t0:00:01\n")
    assert report.certified_accuracy(path, 0.0) == 0.5
    assert report.abstain_rate(path) == 0.5
    with pytest.raises(CertkitError, match="no radii"):
        report.acr(path)
    with pytest.raises(CertkitError, match="not a result file"):
        bad = tmp_path / "x.tsv"
        bad.write_text("a\tb\n")
        report.acr(bad)


# --- report_files: what `certkit report` prints --------------------------------------------------------


def test_report_files_table_default_grid_and_samples_column(hand_built: Path, tmp_path: Path):
    adaptive = tmp_path / "adaptive.tsv"
    adaptive.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples\n"
        "0\t1\t1\t0.5\t1\t0:00:01\t1100\n"
        "1\t2\t-1\t0.0\t0\t0:00:01\t300\n"
    )
    text = report.report_files([str(hand_built), str(adaptive)], radii=None, plot=None)
    lines = text.splitlines()
    # grid 0, 0.25, ... up to the largest radius present (0.953)
    assert lines[0] == "| name | N | ACR | samples/input | r=0 | r=0.25 | r=0.5 | r=0.75 | abstain |"
    assert lines[2] == "| hand | 5 | 0.260 | - | 0.600 | 0.400 | 0.200 | 0.200 | 0.200 |"
    assert lines[3] == "| adaptive | 2 | 0.250 | 700 | 0.500 | 0.500 | 0.500 | 0.000 | 0.500 |"
    assert "plot" not in text
    # without a samples column anywhere there is no samples column
    assert "samples" not in report.report_files([str(hand_built)], radii=[0.0, 0.5], plot=None)


def test_report_files_on_reference_files_with_a_plot(tmp_path: Path):
    files = [PEER / "sigma_0.25" / "cohen.tsv", PEER / "sigma_0.5" / "cohen.tsv", PEER / "sigma_0.5" / "smoothmix.tsv"]
    skip_without_peer_results(files)
    png = tmp_path / "plots" / "curves.png"
    with pytest.raises(CertkitError, match="does not exist"):  # checked before any file is read
        report.report_files([str(f) for f in files], radii=None, plot=str(png))
    png.parent.mkdir()
    text = report.report_files([str(f) for f in files], radii=None, plot=str(png))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[2:5]}
    # same stem in two folders: the folder tells them apart
    assert set(rows) == {"sigma_0.25/cohen", "sigma_0.5/cohen", "smoothmix"}
    assert " | 10000 | 0.670 | " in rows["sigma_0.25/cohen"]
    assert " | 10000 | 1.056 | " in rows["sigma_0.5/cohen"]
    # the largest radius present is 1.91 (sigma = 0.5, n = 100,000): grid up to 1.75; sigma 0.25 is 0 from r = 1
    assert text.splitlines()[0].split(" | ")[-2] == "r=1.75"
    assert rows["sigma_0.25/cohen"].split(" | ")[7] == "0.000"
    assert text.splitlines()[-1] == f"plot: {png}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "content",
    [
        b"epoch\ttime\tlr\n0\t2.0\t0.01\n",
        b"\x1f\x8b\x08\x00binary",
        b"",
        b"idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\tx\t1\t0:00:01\n",
    ],
)
def test_report_files_refuses_a_non_result_file_in_one_line(tmp_path: Path, hand_built: Path, content: bytes):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(content)
    with pytest.raises(CertkitError) as info:
        report.report_files([str(hand_built), str(bad)], radii=None, plot=None)
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


def test_report_command_errors_are_one_line(tmp_path: Path, hand_built: Path, capsys):
    from certkit.cli import main

    assert main(["report", str(hand_built), str(tmp_path / "missing.tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("certkit: error:") and "missing.tsv" in err and "\n" not in err
    assert main(["report", str(hand_built), "--plot", str(tmp_path / "c.xyz")]) == 2
    assert ".xyz" in capsys.readouterr().err
    assert main(["report", str(hand_built), "--radii", "0,0.5", "--plot", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| hand | 5 | 0.260 | 0.600 | 0.200 | 0.200 |" in out and f"plot: {tmp_path / 'c.png'}" in out
    with pytest.raises(CertkitError, match="radii"):
        report.report_files([str(hand_built)], radii=[-0.5], plot=None)


def test_file_labels_are_short_and_distinct():
    assert report.file_labels(["a/x.tsv", "b/x.tsv", "c/y.tsv", "c/y.tsv"]) == ["a/x", "b/x", "y", "y#2"]


# --- figures and tables for a paper ---------------------------------------------------------------------


def _certkit_file(path: Path, sigma: float, n: int, alpha: float, radii: list[float]) -> Path:
    from certkit.results import ResultWriter

    with ResultWriter(path, "certify", {"sigma": sigma, "n": n, "alpha": alpha}) as w:
        for i, r in enumerate(radii):
            w.write_certify(i, 1, 1, r, 0.1)
    return path


def test_curves_mark_the_largest_radius_n_allows_and_name_their_settings(tmp_path: Path, hand_built: Path):
    from certkit.smoothing.statistics import max_radius

    mine = _certkit_file(tmp_path / "m.tsv", 0.25, 2000, 0.001, [0.1, 0.3, 0.5])
    got = report.curves({"mine": mine, "reference": hand_built})
    assert got[0].max_radius == pytest.approx(max_radius(0.25, 2000, 0.001))
    # the file floors the float 0.3 (0.29999...) to 0.299999, so the mean is a hair under 0.3: 0.299
    assert got[0].label == "mine (ACR 0.299, σ=0.25, n=2,000, α=0.001, N=3)"
    # a reference file has no settings: no mark, and no settings it cannot vouch for in its label
    assert got[1].max_radius is None and got[1].label == "reference (ACR 0.260, N=5)"
    # one grid for all, reaching past every file's largest radius and its mark
    assert got[0].radii is got[1].radii and got[0].radii[-1] >= max(0.953, got[0].max_radius)
    assert got[0].accuracy[0] == 1.0 and got[0].accuracy[-1] == 0.0


def test_one_absurd_radius_does_not_make_the_grid_huge(tmp_path: Path):
    path = tmp_path / "huge.tsv"
    path.write_text(
        "idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t90000\t1\t0:00:01\n1\t1\t1\t0.5\t1\t0:00:01\n"
    )
    (curve,) = report.curves({"huge": path})
    assert len(curve.radii) <= report.MAX_PLOT_POINTS + 2


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_report_plots_pdf_and_svg_with_labels_and_title(hand_built: Path, tmp_path: Path, suffix: str, magic: bytes):
    out = tmp_path / f"c{suffix}"
    text = report.report_files([hand_built, hand_built], plot=out, labels=["ours", "theirs"], title="Fashion-MNIST")
    assert "| ours |" in text and "| theirs |" in text
    assert out.read_bytes().startswith(magic)
    if suffix == ".svg":
        svg = out.read_text()
        assert "Fashion-MNIST" in svg and "L2 radius (pixels in [0, 1])" in svg
    with pytest.raises(CertkitError, match="2 files"):
        report.report_files([hand_built, hand_built], labels=["one"])


def test_latex_table(hand_built: Path):
    tex = report.report_files([hand_built], radii=[0.0, 0.5], labels=["Gaussian_σ"], latex=True)
    lines = tex.splitlines()
    assert lines[0] == "\\begin{tabular}{lrrrrr}" and lines[-1] == "\\end{tabular}"
    assert "Gaussian\\_σ & 5 & 0.260 & 0.600 & 0.200 & 0.200 \\\\" in lines


def test_a_file_without_rows_reports_no_figure(hand_built: Path, tmp_path: Path):
    """A mean over no image is undefined: "-", never 0 (which would read as a measured zero)."""
    empty = tmp_path / "empty.tsv"
    empty.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n")
    table = report.markdown_table({"empty": empty, "full": hand_built}, radii=[0.0, 0.5])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert rows["empty"] == "| empty | 0 | - | - | - | - |"
    assert "- |" not in rows["full"].split(" | ", 2)[2]
