"""CRT's training speedup and the robustness it keeps, measured on Fashion-MNIST.

Same student architecture, data, epochs and sigma: a student trained with SmoothMix against the same student
trained with CRT from a SmoothMix teacher. Both are certified on the same test subset. The teacher is
trained once; its cost is printed on its own line, with the cumulative cost of a three-generation chain
(teacher + three CRT students) against three SmoothMix trainings.

    python benchmarks/crt_speedup.py        # the demo's sizes: re-reports `make demo` from demo-out/quick
    python benchmarks/crt_speedup.py --out bench-out/long --epochs 15 --teacher-epochs 16
    python benchmarks/crt_speedup.py --epochs 30 --teacher-epochs 30 --train-subset 0 --certify-images 1000 --n 10000

Training seconds are the training loops' wall time (the per-epoch test is excluded), from the runs' ledgers.
The wall-clock ratio is a comparison only when the two students trained in turns, an epoch each, in one call:
this script checks, from the epochs each run already held, what the call trained. The last line is one of

    crt_speedup: <SmoothMix s / CRT s>x (wall clock, students trained in turns in this call; epoch pairs
        <lo>-<hi>x; crt_pass_ratio <p>x; acr_ratio <r>)
    crt_speedup: <x>x (wall clock, re-reported: this call trained neither student, so in turns only if one
        call trained both, as `certkit demo` does; epoch pairs ...; crt_pass_ratio <p>x; acr_ratio <r>)
    crt_speedup: not measured (this call trained <what>: the students' times are from separate runs;
        crt_pass_ratio <p>x; acr_ratio <r>)

(each on one line), where crt_pass_ratio is the ratio of the students' forward+backward image passes, which
the machine's load does not move. In the last case the CRT student's speedup cell in the table is left out.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from certkit.allocator import keep_freed_memory
from certkit.checkpoint import read_meta
from certkit.errors import CertkitError
from certkit.experiments.crt_demo import CompareConfig, compare, render
from certkit.report import floor_ratio
from certkit.train import STATE

STUDENTS = ("crt", "direct")


def epochs_held(run: Path) -> int | None:
    """Epochs the run folder already holds, which ``compare`` resumes from (0: it trains from scratch; None:
    unreadable, so what this call trains cannot be told)."""
    if not (run / STATE).is_file():
        return 0
    try:
        return int(read_meta(run)["epochs_completed"])
    except (CertkitError, KeyError, TypeError, ValueError):
        return None


def timing_note(before: dict[str, int | None], figures: dict[str, Any]) -> str | None:
    """How the students' wall-clock times were taken, or None when they come from separate runs."""
    if before["crt"] == before["direct"] == 0:  # compare() trained both from scratch, an epoch each in turns
        return "wall clock, students trained in turns in this call"
    if all(before[name] == len(figures[name]["epoch_seconds"]) for name in STUDENTS):
        return (
            "wall clock, re-reported: this call trained neither student, so in turns only if one call trained "
            "both, as `certkit demo` does"
        )
    return None


def what_trained(before: dict[str, int | None], figures: dict[str, Any]) -> str:
    """``crt 10 of its 10 epochs and direct 0 of its 10 epochs``: what this call trained of each student."""
    parts = []
    for name in STUDENTS:
        done, held = len(figures[name]["epoch_seconds"]), before[name]
        parts.append(f"{name} {'an unknown number' if held is None else done - held} of its {done} epochs")
    return " and ".join(parts)


def main() -> None:
    d = CompareConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="demo-out/quick", help="run folder (re-running resumes)")
    p.add_argument("--epochs", type=int, default=d.student_epochs, help="student epochs, both students")
    p.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs, help="teacher epochs (paid once)")
    p.add_argument("--teacher-arch", default=d.teacher_arch)
    p.add_argument("--student-arch", default=d.student_arch)
    p.add_argument(
        "--teacher-seed",
        type=int,
        default=d.teacher_seed,
        help="the teacher's seed (another than the students' when it has their architecture)",
    )
    p.add_argument("--train-subset", type=int, default=d.train_subset, help="training images (0: all 60,000)")
    p.add_argument("--certify-images", type=int, default=d.certify_images)
    p.add_argument("--n", type=int, default=d.n, help="certification samples per image")
    p.add_argument("--sigma", type=float, default=d.sigma)
    p.add_argument(
        "--crt-alpha", type=float, default=d.crt_alpha, help="CRT transfer weight (1 - it weighs cross-entropy)"
    )
    p.add_argument(
        "--crt-batch-size", type=int, default=d.crt_batch_size, help="CRT student batch size (0: same as SmoothMix)"
    )
    p.add_argument(
        "--crt-lr",
        type=float,
        default=d.crt_lr,
        help=f"CRT student learning rate (None: the SmoothMix student's, {d.lr:g})",
    )
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    keep_freed_memory()  # as `certkit demo` does
    cfg = dataclasses.replace(
        d,
        teacher_arch=a.teacher_arch,
        student_arch=a.student_arch,
        teacher_seed=a.teacher_seed,
        teacher_epochs=a.teacher_epochs,
        student_epochs=a.epochs,
        train_subset=a.train_subset or None,
        certify_images=a.certify_images,
        n=a.n,
        sigma=a.sigma,
        crt_alpha=a.crt_alpha,
        crt_batch_size=a.crt_batch_size or None,
        crt_lr=a.crt_lr,
    )
    before = {name: epochs_held(Path(a.out) / name) for name in STUDENTS}
    figures = compare(cfg, a.out, device=a.device)
    note = timing_note(before, figures)
    crt_label = f"| student: {figures['crt']['arch']} CRT |"
    lines = []
    for line in render(cfg, figures).splitlines():
        if line.startswith("crt_speedup:"):
            continue  # replaced by the last line below, which says how the two times were taken
        if note is None and line.startswith(crt_label):
            cells = line.split(" | ")
            cells[2] = "— (separate runs)"
            line = " | ".join(cells)
        lines.append(line)
    print("\n".join(lines))
    rest = (
        f"crt_pass_ratio {floor_ratio(figures['pass_ratio'], 1)}x; acr_ratio {floor_ratio(figures['acr_ratio'], 1, 3)}"
    )
    if note is None:
        print(
            f"crt_speedup: not measured (this call trained {what_trained(before, figures)}: "
            f"the students' times are from separate runs; {rest})"
        )
    else:
        lo, hi = figures["speedup_epochs"]
        pairs = f"{floor_ratio(lo, 1, 1)}–{floor_ratio(hi, 1, 1)}x"
        print(f"crt_speedup: {floor_ratio(figures['speedup'], 1)}x ({note}; epoch pairs {pairs}; {rest})")


if __name__ == "__main__":
    main()
