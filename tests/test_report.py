"""Metrics on hand-built files and on the field's published Fashion-MNIST result files."""

from __future__ import annotations

from pathlib import Path

import pytest

from certkit import report
from certkit.errors import CertkitError

PEER = Path("/work/shared/peer-results/fashion-mnist")

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


def test_high_probability_correction_matches_cohens_examples():
    # alpha = rho = 0.001 subtracts 0.21 percentage points at N = 10,000 and 0.93 at N = 500
    assert 0.9 - report.high_prob_accuracy(0.9, 0.001, 0.001, 10_000) == pytest.approx(0.0021, abs=5e-5)
    assert 0.9 - report.high_prob_accuracy(0.9, 0.001, 0.001, 500) == pytest.approx(0.0093, abs=5e-5)


@pytest.mark.parametrize(
    "sigma,method,published",
    [("0.25", "cohen", 0.670), ("0.25", "salman", 0.756), ("0.25", "macer", 0.727), ("0.25", "cat-rs", 0.757),
     ("0.5", "cohen", 1.056), ("0.5", "consistency", 1.212), ("1.0", "cohen", 1.316), ("1.0", "smoothmix", 1.534)],
)
def test_peer_results_give_the_published_acr(sigma, method, published):
    path = PEER / f"sigma_{sigma}" / f"{method}.tsv"
    if not path.exists():
        pytest.skip("peer results not available")
    results = report.load(path)
    assert len(results) == 10_000
    assert round(report.acr(results), 3) == published
    # no radius above sigma * Phi^-1(alpha^(1/n)) at n = 100,000, alpha = 0.001 (printed to 3 digits)
    assert results.radius.max() <= round(3.811 * float(sigma), 3 if float(sigma) < 0.5 else 2)


def test_markdown_table_and_plot(hand_built: Path, tmp_path: Path):
    table = report.markdown_table({"hand": hand_built}, radii=[0.0, 0.5])
    assert table.splitlines()[0] == "| name | N | ACR | r=0.00 | r=0.50 | abstain |"
    assert table.splitlines()[2] == "| hand | 5 | 0.261 | 0.600 | 0.200 | 0.200 |"
    png = report.plot_curves({"hand": hand_built, "again": hand_built}, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
