"""What bf16 autocast (``--amp bf16``) does to the certified robustness of a trained model, against fp32.

For each method, LeNet is trained on the same Fashion-MNIST subset with the same seeds twice: in fp32 and
under bf16 autocast. Every model is then certified in fp32 on the same test images with the same noise, so
only the training differs. The comparison is paired per seed: the ACR of the bf16 model minus that of the
fp32 model, with the standard error of the per-image differences of correct x radius. Two fp32 runs with
different seeds show how large a difference any change of training trajectory makes at these sizes; a
precision change that is harmless should stay within it.

    python benchmarks/amp_quality.py [--methods gaussian,smoothmix] [--seeds 0,1] [--out DIR]

The training's defaults are the demo's (12,000 images, 10 epochs, batch 128, lr 0.05 cosine, sigma 0.25)
and certification takes every 10th test image (n0 = 100, n = 2,000, alpha = 0.001). Runs and result files
resume. One line per method, ``amp_acr_<method>: ...``, and a last line
``amp_quality: <mean bf16 - fp32 ACR> (...)`` with the training time of bf16 over fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from certkit import checkpoint, report
from certkit.allocator import keep_freed_memory
from certkit.data import dataset_info, load_dataset
from certkit.errors import CertkitError
from certkit.precision import autocast_dtype
from certkit.smoothing.runner import RunPlan, certify_dataset
from certkit.smoothing.smooth import Smooth
from certkit.train import STATE, select_device, train

DATASET = "fashion-mnist"


def train_and_certify(a: argparse.Namespace, method: str, amp: str, seed: int) -> tuple[Path, float]:
    """The result file of ``method`` trained in ``amp`` with ``seed`` (trained and certified if not yet),
    and its training seconds."""
    run = a.out / f"{method}-{amp}-seed{seed}"
    train(
        DATASET,
        "lenet",
        method,
        sigma=a.sigma,
        out=run,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        schedule="cosine",
        seed=seed,
        train_subset=a.train_subset,
        test_subset=1000,
        amp=amp,
        device=str(a.device),
        resume=(run / STATE).is_file(),
    )
    model, meta = checkpoint.load_with_meta(run, device=a.device)
    tsv = a.out / f"{run.name}.tsv"
    plan = RunPlan(n0=100, n=a.n, alpha=0.001, batch_size=1000, skip=a.skip, seed=0)
    smoothed = Smooth(model, dataset_info(DATASET).num_classes, a.sigma, channels_last=True)
    certify_dataset(smoothed, a.test, plan, out=tsv, progress=False)
    return tsv, float(meta["cost"]["total"]["seconds"])


def difference(a: Path, b: Path) -> tuple[float, float]:
    """ACR of ``a`` minus ACR of ``b``, paired per image, and its standard error."""
    return report.paired(a, b).acr_difference()


def shown(d: tuple[float, float]) -> str:
    return f"{d[0]:+.4f} ± {d[1]:.4f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="gaussian,smoothmix", help="comma-separated training methods")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (two or more)")
    p.add_argument("--out", type=Path, default=Path("bench-out/amp-quality"), help="run folder (re-running resumes)")
    p.add_argument("--train-subset", type=int, default=12_000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--skip", type=int, default=10, help="certify every skip-th test image")
    p.add_argument("--n", type=int, default=2000, help="certification samples per image")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    keep_freed_memory()  # as the CLI does
    methods = [m for m in a.methods.split(",") if m]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    if len(seeds) < 2:
        p.error("--seeds needs two seeds or more: their spread is the scale of the comparison")
    a.device = select_device(a.device)
    try:  # before the fp32 trainings, not after them: a CPU without bf16 instructions is refused
        autocast_dtype("bf16", a.device)
    except CertkitError as e:
        p.error(str(e))
    a.test = load_dataset(DATASET, "test")
    diffs: list[float] = []
    seconds = {"off": 0.0, "bf16": 0.0}
    for method in methods:
        files: dict[tuple[str, int], Path] = {}
        for seed in seeds:
            for amp in ("off", "bf16"):
                print(f"== {method} seed {seed} --amp {amp}", file=sys.stderr, flush=True)
                files[amp, seed], secs = train_and_certify(a, method, amp, seed)
                seconds[amp] += secs
        acrs = {key: report.acr(path) for key, path in files.items()}
        by_seed = {s: difference(files["bf16", s], files["off", s]) for s in seeds}
        per_seed = ", ".join(f"{shown(d)} (seed {s})" for s, d in by_seed.items())
        diffs += [d[0] for d in by_seed.values()]
        spread = shown(difference(files["off", seeds[1]], files["off", seeds[0]]))
        acr_of = {amp: " ".join(f"{acrs[amp, s]:.4f}" for s in seeds) for amp in ("off", "bf16")}
        print(
            f"amp_acr_{method}: bf16 - fp32 {per_seed}; fp32 seed {seeds[1]} - seed {seeds[0]} {spread}; "
            f"ACR fp32 {acr_of['off']}, bf16 {acr_of['bf16']}",
            flush=True,
        )
    print(
        f"amp_quality: {np.mean(diffs):+.4f} (mean bf16 - fp32 ACR over {len(methods)} method(s) x {len(seeds)} "
        f"seeds; training time bf16 / fp32 {seconds['bf16'] / seconds['off']:.2f})"
    )


if __name__ == "__main__":
    main()
