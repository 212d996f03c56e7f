"""benchmarks/profile_gpu.py, run on the CPU at a tiny size: both parts measure and the last line reads."""

from __future__ import annotations

import re
import sys

import pytest

from helpers import benchmark_module


@pytest.mark.slow  # a profiled certification and a three-epoch training
def test_profile_runs_on_the_cpu_and_prints_its_figures(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["profile_gpu.py", "--device", "cpu", "--inputs", "2", "--n", "300", "--batch", "200", "--batches", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--no-compile"])
    with benchmark_module("profile_gpu") as module:
        module.main()
    out = capsys.readouterr().out
    assert "aten::" in out  # the profiler's table of host time by operator
    assert re.search(r"training \(off\): epochs [0-9.]+, [0-9.]+, [0-9.]+ s", out)
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(
        r"profile_gpu: certify ([0-9.]+) ms/batch wall, nan ms/batch device; first epoch [+-][0-9.]+ s "
        r"\(warm-up 0\.000 s, captures 0\.000 s\)",
        last,
    )
    assert m and float(m.group(1)) > 0
