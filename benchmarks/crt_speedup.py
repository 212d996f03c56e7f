"""CRT's training speedup and the robustness it keeps, measured on Fashion-MNIST.

Same student architecture, data, epochs and sigma: a student trained with SmoothMix against the same student
trained with CRT from a SmoothMix teacher. Both are certified on the same test subset. The teacher is
trained once; its cost is printed on its own line, with the cumulative cost of a three-generation chain
(teacher + three CRT students) against three SmoothMix trainings.

    python benchmarks/crt_speedup.py        # the demo's sizes: re-reports `make demo` from demo-out/quick
    python benchmarks/crt_speedup.py --out bench-out/long --epochs 15 --teacher-epochs 16
    python benchmarks/crt_speedup.py --epochs 30 --teacher-epochs 30 --train-subset 0 --certify-images 1000 --n 10000

Last line: ``crt_speedup: <SmoothMix seconds / CRT seconds>x  acr_ratio: <CRT ACR / SmoothMix ACR>``.
Training seconds are the training loops' wall time (the per-epoch test is excluded), from the runs' ledgers.
"""

from __future__ import annotations

import argparse
import dataclasses

from certkit.allocator import keep_freed_memory
from certkit.experiments.crt_demo import CompareConfig, compare, render


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
    p.add_argument("--crt-lr", type=float, default=d.crt_lr, help="CRT student learning rate (default: --lr's)")
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
    figures = compare(cfg, a.out, device=a.device)
    print(render(cfg, figures))
    print(f"crt_speedup: {figures['speedup']:.2f}x  acr_ratio: {figures['acr_ratio']:.3f}")


if __name__ == "__main__":
    main()
