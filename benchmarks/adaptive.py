"""Adaptive certification against fixed n = 100,000: mean samples per input and ACR, on a Fashion-MNIST model.

What runs:

1. A base classifier is trained with Gaussian noise (sigma = 0.25) on Fashion-MNIST with certkit's
   :class:`~certkit.train.Trainer` (or loaded from ``--run``). The default is a small MLP (784-256-256-10):
   a LeNet votes about 30x slower on CPU, which would put 100,000 samples x 150 images beyond the ~10 minute
   budget of this benchmark on two CPU cores; ``--arch lenet`` selects it where there is time (or a GPU).
2. **One shared pass of noise per image**: the n0 = 100 selection samples, then the n = 100,000 estimation
   samples drawn in exactly the increments the adaptive schedule looks at (stage n_1, n_2 - n_1, ...),
   from the same per-image generators ``certify_dataset`` uses. From these counts:

   * the **fixed-n** certificate is CERTIFY on all n estimation samples (n independent samples, one-sided
     Clopper-Pearson at alpha): what ``certkit certify`` reports, up to which noise was drawn;
   * the **adaptive** certificate replays :meth:`AdaptiveSchedule.decide` at every look, on the same samples.

   The comparison is paired: both see the same noise, so the difference is the schedule's alone.
3. **The real adaptive run**: :func:`certkit.certify_dataset` with ``adaptive=AdaptiveSchedule()``
   writes its TSV (with the ``samples`` column) and its rows must equal the replay's, row by row; that ties
   the figures to the code path users run.
4. For context, an **oracle bound**: if every image's true vote probability were known and each image could be
   given its own best n, how few samples would still keep the ACR within 1% of fixed n? (Computed from the
   fixed-n vote fractions, only for images certified correctly, since only they carry ACR.)

    python benchmarks/adaptive.py                  # ~8 min on a shared 2-core CPU (one thread)
    python benchmarks/adaptive.py --images 30 --n 20000     # a quick look
    python benchmarks/adaptive.py --published ../shared/peer-results/fashion-mnist   # ceiling on published runs, ~8 min

``--published DIR`` samples nothing: for each ``sigma_*/<method>.tsv`` certification (n = 100,000) under DIR
it recovers every certified row's vote count from its radius (the smallest n_A whose Clopper-Pearson bound
gives that radius to the file's three digits), and reports the share of unanimous rows, the oracle bound
of point 4, and the default schedule replayed on binomial votes drawn at those fractions.

The last line reads ``adaptive_samples_ratio: <x>x (acr_ratio: <y>)``: x = (n0 + n) / mean adaptive samples
per image (n0 included on both sides), y = adaptive ACR / fixed ACR.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from certkit import report
from certkit.data import dataset_info, load_dataset
from certkit.models import create_model
from certkit.objectives.gaussian import Gaussian
from certkit.results import floor_significant, format_radius, read_results
from certkit.smoothing.runner import RunPlan, certify_dataset
from certkit.smoothing.samplers import input_generator
from certkit.smoothing.smooth import Smooth
from certkit.smoothing.statistics import (
    ABSTAIN,
    AdaptiveSchedule,
    certify_from_counts,
    lower_confidence_bound,
    radius,
)
from certkit.train import TrainConfig, Trainer


def build_model(arch: str) -> nn.Module:
    info = dataset_info("fashion-mnist")
    if arch == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, info.num_classes),
        )
    return create_model(arch, info.num_classes, info.in_shape, info.mean, info.std)


def train_model(args: argparse.Namespace) -> nn.Module:
    if args.run:
        from certkit.checkpoint import load

        return load(args.run)
    torch.manual_seed(args.seed)
    model = build_model(args.arch)
    train = load_dataset("fashion-mnist", "train", args.data_dir)
    test = load_dataset("fashion-mnist", "test", args.data_dir).subset(2000)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=256, optimizer="adam", lr=1e-3, schedule="constant", seed=args.seed
    )
    trainer = Trainer(model, Gaussian(args.sigma), train, test, cfg, device="cpu", progress=False, log=print)
    trainer.fit()
    return model.eval()


def shared_pass(smoothed: Smooth, data, indices: list[int], schedule: AdaptiveSchedule, args: argparse.Namespace):
    """Selection counts (images, K) and estimation counts per stage increment (images, stages, K)."""
    stages = schedule.stages(args.n)
    increments = np.diff([0, *stages])
    selection = np.zeros((len(indices), smoothed.num_classes), dtype=np.int64)
    estimation = np.zeros((len(indices), len(stages), smoothed.num_classes), dtype=np.int64)
    group = max(1, args.batch // args.n0)
    for start in range(0, len(indices), group):
        chunk = indices[start : start + group]
        xs = torch.stack([data[i][0] for i in chunk])
        gens = [input_generator(args.seed, i, smoothed.device) for i in chunk]
        rows = slice(start, start + len(chunk))
        # the same draws, in the same order, as Smooth.certify_batch with the adaptive schedule
        selection[rows] = smoothed.sampler.counts(xs, [args.n0] * len(chunk), args.batch, gens)
        for k, inc in enumerate(increments):
            estimation[rows, k] = smoothed.sampler.counts(xs, [int(inc)] * len(chunk), args.batch, gens)
        print(f"  shared pass: {start + len(chunk)}/{len(indices)} images", flush=True)
    return selection, estimation


def replay(selection, estimation, labels, schedule: AdaptiveSchedule, args: argparse.Namespace):
    """Fixed-n and adaptive certificates from the shared counts: lists of (prediction, radius, samples)."""
    stages = schedule.stages(args.n)
    alphas = schedule.alphas(args.alpha, len(stages))
    fixed, adaptive = [], []
    for sel, est in zip(selection, estimation):
        c_hat = int(sel.argmax())
        cumulative = np.cumsum(est[:, c_hat])
        pred, r, _ = certify_from_counts(c_hat, int(cumulative[-1]), args.n, args.alpha, args.sigma)
        fixed.append((pred, r, args.n0 + args.n))
        for k in range(len(stages)):
            decision = schedule.decide(c_hat, int(cumulative[k]), k, stages, alphas, args.sigma)
            if decision is not None:
                adaptive.append((decision[0], decision[1], args.n0 + stages[k]))
                break
    return fixed, adaptive


def acr_of(certs, labels) -> float:
    return float(np.mean([r if p == y else 0.0 for (p, r, _), y in zip(certs, labels)]))


def oracle_ratio(selection, estimation, labels, args: argparse.Namespace, loss: float = 0.01) -> float:
    """Smallest mean samples (n0 + n_i) over per-image choices n_i that keep the ACR within ``loss`` of fixed
    n, if each image's vote fraction were known exactly (taken as its fixed-n fraction) and with no price for
    choosing n_i after the fact; wrong or abstained images need no samples. A bound no schedule can beat."""
    grid = np.unique(np.linspace(args.n / 50, args.n, 50).round().astype(int))
    gains = []
    for sel, est, y in zip(selection, estimation, labels):
        c_hat = int(sel.argmax())
        frac = est[:, c_hat].sum() / args.n
        row = []
        for m in grid:
            p_lower = lower_confidence_bound(round(float(frac * m)), int(m), args.alpha)
            row.append(radius(args.sigma, p_lower) if p_lower >= 0.5 and c_hat == y else 0.0)
        gains.append(row)
    table = np.array(gains)
    full = table[:, -1]
    budget = loss * full.sum()
    best = float("inf")
    for lam in np.logspace(1, 9, 300):
        choice = (grid[None, :] + lam * (full[:, None] - table)).argmin(1)
        chosen = table[np.arange(len(choice)), choice]
        used = np.where(full > 0, grid[choice], 0) + args.n0
        if (full - chosen).sum() <= budget:
            best = min(best, used.mean())
    return (args.n0 + args.n) / best


def published_votes(
    path: Path, n: int, alpha: float, sigma: float, every: int
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(labels, selected class, estimated vote fraction) of every ``every``-th row of a published result file.

    A certified row's fraction is the smallest n_A / n whose bound reproduces its radius; an abstained or
    wrong row gets a wrong class (it carries no ACR whatever its fraction) at fraction 1/2.
    """
    res = read_results(path)
    labels, classes, fractions = [], [], []
    for y, pred, r in zip(res.label[::every], res.predict[::every], res.radius[::every]):
        y, pred = int(y), int(pred)
        labels.append(y)
        if pred != y:
            classes.append((y + 1) % 10)
            fractions.append(0.5)
            continue
        lo, hi = n // 2, n
        while lo < hi:
            mid = (lo + hi) // 2
            if radius(sigma, lower_confidence_bound(mid, n, alpha)) >= r - 5e-4:
                hi = mid
            else:
                lo = mid + 1
        classes.append(pred)
        fractions.append(lo / n)
    return labels, np.array(classes), np.array(fractions)


def published_ceiling(root: Path, args: argparse.Namespace, every: int = 5) -> None:
    """Unanimous share, oracle bound and replayed schedule for each published file under ``root``."""
    schedule = AdaptiveSchedule()
    increments = np.diff([0, *schedule.stages(args.n)])
    rng = np.random.default_rng(args.seed)
    print(f"published certifications under {root} (every {every}th row; n0={args.n0} n={args.n} alpha={args.alpha})")
    print("| sigma | method | unanimous rows | oracle bound | schedule replayed | its ACR ratio |")
    print("|---|---|---|---|---|---|")
    best = 0.0
    for folder in sorted(root.glob("sigma_*")):
        sigma = float(folder.name.split("_", 1)[1])
        for path in sorted(folder.glob("*.tsv")):
            if path.name.endswith(".train-log.tsv"):
                continue
            labels, classes, fractions = published_votes(path, args.n, args.alpha, sigma, every)
            one_hot = np.eye(10, dtype=np.int64)[classes]
            # estimation counts, one binomial draw per stage increment: (images, stages, K)
            draws = rng.binomial(increments[None, :], fractions[:, None])
            estimation = one_hot[:, None, :] * draws[:, :, None]
            run = argparse.Namespace(**{**vars(args), "sigma": sigma})
            fixed, adaptive = replay(one_hot, estimation, labels, schedule, run)
            ratio = float(np.mean([s for *_, s in fixed]) / np.mean([s for *_, s in adaptive]))
            oracle = oracle_ratio(one_hot, estimation, labels, run)
            unanimous = float(np.mean([f == 1.0 and c == y for f, c, y in zip(fractions, classes, labels)]))
            best = max(best, oracle)
            print(
                f"| {sigma:g} | {path.stem} | {unanimous:.0%} | {oracle:.2f}x | {ratio:.2f}x "
                f"| {acr_of(adaptive, labels) / acr_of(fixed, labels):.4f} |"
            )
    print(f"adaptive_published_ceiling: {best:.2f}x (best oracle bound at ACR within 1%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="mlp", help="mlp (default) or a certkit architecture (lenet, smallcnn)")
    p.add_argument("--run", default=None, help="certify this certkit run directory instead of training")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--images", type=int, default=150, help="test images, spread evenly over the test set")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the MLP's matrices are too small to gain from more, "
        "and on a shared machine a second thread mostly waits",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the real certify_dataset adaptive run")
    p.add_argument("--out", default=None, help="keep the TSVs here (default: a temporary folder)")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--published",
        default=None,
        metavar="DIR",
        help="only analyse published n = 100,000 result files (sigma_*/<method>.tsv) under DIR",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.published:
        published_ceiling(Path(args.published), args)
        return

    began = time.perf_counter()
    model = train_model(args)
    trained = time.perf_counter()
    test = load_dataset("fashion-mnist", "test", args.data_dir)
    indices = list(range(0, len(test), len(test) // args.images))[: args.images]
    labels = [test[i][1] for i in indices]
    schedule = AdaptiveSchedule()
    smoothed = Smooth(model, 10, args.sigma)
    print(
        f"{args.arch}, sigma={args.sigma}, {len(indices)} test images (every {len(test) // args.images}th), "
        f"n0={args.n0}, n={args.n}, alpha={args.alpha}; "
        f"schedule {schedule.as_dict()}, stages {schedule.stages(args.n)}; "
        f"{torch.get_num_threads()} threads, training {trained - began:.0f}s"
    )

    selection, estimation = shared_pass(smoothed, test, indices, schedule, args)
    fixed, adaptive = replay(selection, estimation, labels, schedule, args)
    shared = time.perf_counter()

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="certkit-adaptive-"))
    out.mkdir(parents=True, exist_ok=True)
    # the shared counts, to try other schedules on the same noise without sampling again
    np.savez(
        out / "counts.npz",
        selection=selection,
        estimation=estimation,
        labels=np.array(labels),
        indices=np.array(indices),
        stages=np.array(schedule.stages(args.n)),
    )
    verified = "skipped"
    if not args.no_verify:
        # the same schedule through the runner users call; its rows must be the replay's
        skip = len(test) // args.images
        plan = RunPlan(
            n0=args.n0,
            n=args.n,
            alpha=args.alpha,
            batch_size=args.batch,
            skip=skip,
            max_idx=indices[-1] + 1,
            seed=args.seed,
            adaptive=schedule,
        )
        certify_dataset(smoothed, test, plan, out=out / "adaptive.tsv", progress=False, resume=False)
        rows = read_results(out / "adaptive.tsv")
        mismatch = [
            i
            for i, (pred, r, used), rp, rr, rs in zip(indices, adaptive, rows.predict, rows.radius, rows.samples)
            if pred != rp or used != rs or abs(floor_significant(r) - rr) > 1e-12
        ]
        if len(rows) != len(indices) or mismatch:
            raise SystemExit(f"the replay differs from certify_dataset on images {mismatch[:10]}")
        verified = f"yes, {len(rows)} rows equal ({time.perf_counter() - shared:.0f}s)"

    # the fixed-n rows as a result file, for the table
    fixed_tsv = out / "fixed.tsv"
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime"]
    lines += [
        f"{i}\t{y}\t{pr}\t{format_radius(r)}\t{int(pr == y)}\t0:00:00"
        for i, y, (pr, r, _) in zip(indices, labels, fixed)
    ]
    fixed_tsv.write_text("\n".join(lines) + "\n")
    adaptive_tsv = out / "adaptive-replay.tsv"
    lines = ["idx\tlabel\tpredict\tradius\tcorrect\ttime\tsamples"]
    lines += [
        f"{i}\t{y}\t{pr}\t{format_radius(r)}\t{int(pr == y)}\t0:00:00\t{s}"
        for i, y, (pr, r, s) in zip(indices, labels, adaptive)
    ]
    adaptive_tsv.write_text("\n".join(lines) + "\n")
    print(report.markdown_table({"fixed n": fixed_tsv, "adaptive": adaptive_tsv}), end="")

    mean_fixed = float(np.mean([s for _, _, s in fixed]))
    mean_adaptive = float(np.mean([s for _, _, s in adaptive]))
    acr_fixed, acr_adaptive = acr_of(fixed, labels), acr_of(adaptive, labels)
    stops = np.unique([s for _, _, s in adaptive], return_counts=True)
    print("adaptive stopping points (samples: images): " + ", ".join(f"{s}: {c}" for s, c in zip(*stops)))
    changed = sum(a[0] != f[0] for a, f in zip(adaptive, fixed))
    abstained = sum(a[0] == ABSTAIN for a in adaptive), sum(f[0] == ABSTAIN for f in fixed)
    print(
        f"images whose decision (class or abstain) differs between fixed and adaptive: {changed}; "
        f"abstentions adaptive/fixed: {abstained[0]}/{abstained[1]}"
    )
    print(f"fixed n:  mean samples {mean_fixed:.0f}, ACR {report.floor_figure(acr_fixed, 4)}")
    print(
        f"adaptive: mean samples {mean_adaptive:.0f}, ACR {report.floor_figure(acr_adaptive, 4)}; "
        f"real certify_dataset run matches: {verified}"
    )
    print(
        "oracle bound (known vote fractions, per-image n, ACR within 1%): "
        f"at most {oracle_ratio(selection, estimation, labels, args):.2f}x fewer samples"
    )
    print(f"total {time.perf_counter() - began:.0f}s; files in {out}; load average {os.getloadavg()[0]:.1f}")
    # rounded down: both figures carry the claim that adaptive sampling saves samples and keeps the ACR
    samples, kept = report.floor_ratio(mean_fixed, mean_adaptive), report.floor_ratio(acr_adaptive, acr_fixed, 4)
    print(f"adaptive_samples_ratio: {samples}x (acr_ratio: {kept})")


if __name__ == "__main__":
    main()
