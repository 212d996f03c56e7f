"""The main job's pipeline on a tiny budget: teacher → CRT student vs direct student, certified and compared."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from certkit.experiments.crt_demo import CompareConfig, compare, render
from certkit.report import floor_ratio

pytestmark = pytest.mark.slow  # the demo pipeline


def test_compare_trains_certifies_and_reports(fmnist_root: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        CompareConfig(),
        train_subset=256,
        test_subset=50,
        teacher_epochs=1,
        student_epochs=2,  # two epoch pairs, so the spread of their ratios is a real range
        batch_size=64,
        certify_images=6,
        n0=20,
        n=100,
        cert_batch=200,
        crt_batch_size=32,
        crt_alpha=0.5,
        crt_lr=0.02,
        teacher_seed=7,
    )
    figures = compare(cfg, tmp_path, log=lambda m: None)
    assert json.loads((tmp_path / "teacher" / "model.json").read_text())["train"]["seed"] == 7
    direct_meta = json.loads((tmp_path / "direct" / "model.json").read_text())
    assert direct_meta["train"]["seed"] == 0
    for name in ("teacher", "crt", "direct"):
        assert (tmp_path / name / "model.safetensors").exists()
        assert len((tmp_path / f"{name}.tsv").read_text().splitlines()) == 1 + 6
    # the CRT student's lineage names its teacher; its ledger counts teacher forwards, never backwards
    meta = json.loads((tmp_path / "crt" / "model.json").read_text())
    assert meta["teacher"]["method"] == "smoothmix" and meta["teacher"]["arch"] == cfg.teacher_arch
    assert meta["hparams"]["alpha"] == 0.5 and meta["train"]["batch_size"] == 32  # the CRT student's own settings
    assert meta["train"]["lr"] == 0.02
    direct_train = direct_meta["train"]
    assert direct_train["batch_size"] == 64 and direct_train["lr"] == cfg.lr
    cost = meta["cost"]["total"]
    assert cost["teacher_forward"] == cost["forward"] > 0 and cost.get("teacher_backward", 0) == 0
    assert figures["speedup"] == pytest.approx(figures["direct"]["seconds"] / figures["crt"]["seconds"])
    # each epoch pair's ratio comes from the two ledgers, and the whole runs' ratio lies between the extremes
    pairs = [d["seconds"] / c["seconds"] for d, c in zip(direct_meta["cost"]["epochs"], meta["cost"]["epochs"])]
    assert figures["speedup_epochs"] == pytest.approx((min(pairs), max(pairs)))
    assert min(pairs) <= figures["speedup"] * (1 + 1e-12) and figures["speedup"] <= max(pairs) * (1 + 1e-12)
    # passes are the ledger's image counts: the direct student's forwards and backwards against CRT's student
    # forwards and backwards plus its teacher's forwards
    direct = direct_meta["cost"]["total"]
    assert figures["direct"]["passes"] == direct["forward"] + direct["backward"]
    assert figures["crt"]["passes"] == cost["forward"] + cost["backward"] + cost["teacher_forward"]
    assert figures["pass_ratio"] == pytest.approx(figures["direct"]["passes"] / figures["crt"]["passes"])
    chain = figures["chain"]
    assert chain["crt_seconds"] == pytest.approx(figures["teacher"]["seconds"] + 3 * figures["crt"]["seconds"])

    text = render(cfg, figures, plot=tmp_path / "curves.png")
    assert text.splitlines()[-4].startswith("crt_speedup: ") and "acr_ratio: " in text
    lo, hi = figures["speedup_epochs"]
    assert f"(wall clock; epoch pairs {floor_ratio(lo, 1, 1)}–{floor_ratio(hi, 1, 1)}x)" in text
    assert "CRT: transfer weight 0.5, batch 32, lr 0.02;" in text
    assert f"crt_pass_ratio: {floor_ratio(figures['pass_ratio'], 1)}x" in text
    header, *rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "| image passes | pass ratio vs direct |" in header and len(rows) == 3
    crt_row = next(r for r in rows if "CRT" in r)
    assert f"| {figures['crt']['passes']:,} | {floor_ratio(figures['pass_ratio'], 1)}x |" in crt_row
    assert (tmp_path / "curves.png").stat().st_size > 0

    again = compare(cfg, tmp_path, log=lambda m: None)  # everything resumes: nothing is trained twice
    assert again["crt"]["seconds"] == figures["crt"]["seconds"]
