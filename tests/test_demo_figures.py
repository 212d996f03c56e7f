"""The demo's printed comparison, from hand-made figures (no training): every figure that carries a claim is
rounded down."""

from __future__ import annotations

from pathlib import Path

from certkit import report
from certkit.experiments.crt_demo import CompareConfig, render, with_ratios
from certkit.results import ResultWriter


def _student(path: Path, radii: list[float], seconds: float, passes: int, clean_acc: float | None) -> dict:
    with ResultWriter(path, "certify", {"sigma": 0.25, "n": 1000, "alpha": 0.001}) as w:
        for i, r in enumerate(radii):
            w.write_certify(i, 0, 0, r, 0.1)
    return {
        "arch": "lenet",
        "method": "smoothmix",
        "seconds": seconds,
        "clean_acc": clean_acc,
        "tsv": str(path),
        "acr": report.exact_acr(path),
        "passes": passes,
        "epoch_seconds": [seconds / 2, seconds / 2],
    }


def test_ratios_and_figures_are_rounded_down(tmp_path: Path) -> None:
    figures = {
        "teacher": _student(tmp_path / "t.tsv", [0.5, 0.5, 0.5], 300.8, 172_800, 0.9),
        # ACR 0.3 against the direct student's 0.303122: 0.9897, which to nearest would read 0.990
        "crt": _student(tmp_path / "c.tsv", [0.375, 0.25, 0.275], 15.0, 16_200, None),
        # 848 of 1,000 test images, stored as the float 0.848 (a hair below 0.848): 84.8%, not 84.7%
        "direct": _student(tmp_path / "d.tsv", [0.375, 0.25, 0.284366], 160.0, 172_800, 848 / 1000),
    }
    text = render(CompareConfig(), with_ratios(figures, 3))
    assert "crt_speedup: 10.66x (wall clock; epoch pairs 10.6–10.6x)" in text  # 160 / 15 = 10.666...
    assert "crt_pass_ratio: 10.66x" in text  # 172,800 / 16,200 = 10.666...
    assert "acr_ratio: 0.989" in text
    assert "| 15.0 | 10.66x | 16,200 | 10.66x | – |" in text  # no clean accuracy recorded: "–", not 0.0%
    assert "| 84.8% |" in text
    figures["direct"]["clean_acc"] = 0.8999  # 8,999 of 10,000: 89.9%, rounded down
    assert "| 89.9% |" in render(CompareConfig(), with_ratios(figures, 3))
    # 1 - (300.8 + 3 x 15) / (3 x 160) = 27.958...% saved
    assert "27.9% cumulative cost reduction" in text
