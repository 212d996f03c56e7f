"""Training cost of the robust-training methods against Gaussian augmentation, and what each buys.

Trains LeNet on Fashion-MNIST at sigma = 0.25 with every method (Gaussian, SmoothAdv, MACER, SmoothMix,
Consistency) for the same number of epochs on the same training subset, with the same optimiser, then
certifies the same test images with the same Monte Carlo budget, and prints one Markdown table:

    method | s/epoch | slowdown | CPU s/epoch | passes/img | clean acc | smoothed acc | ACR | cert 0.25 | cert 0.5

Method hyperparameters are the published MNIST-like defaults at sigma (``Objective.defaults("mnist", σ)``:
SmoothAdv ε = 255/256, T = 10, m = 4; MACER k = 16, λ = 16; SmoothMix m = 4, T = 2; Consistency m = 2,
λ = 10), so the per-image work is the published one. Only the schedules of a 90-epoch recipe are scaled to
the run's length (``--published-schedules`` keeps them): warm-ups of 10 epochs become ``round(E·10/90)``
(at least 1) and MACER's 31-epoch deferral ``round(E·31/90)``. Neither changes the cost of an epoch.

The methods train in turns, an epoch each (epoch e of every method, then epoch e + 1; the method that goes
first moves on by one each epoch), so that a change in the machine's speed during the run hits all of them
alike; the certifications follow. "s/epoch" is the trainer's wall-clock of the fastest training epoch (no
per-epoch test; the fastest is the one least disturbed by other jobs and start-up costs), and the slowdowns
are its ratios; "CPU s/epoch" is the process's CPU time per epoch (mean), a cross-check on a machine shared
with other jobs, where wall-clock includes waiting. "passes/img" counts the noisy samples that went forward
through the network per training image and epoch (attack passes included), from the cost ledger. "clean
acc" is the base classifier on the clean certified images; "smoothed acc" is the certified accuracy at
radius 0.

The default size (2 epochs on 3,000 images; 150 test images, n = 1,000; one thread) takes about eight
minutes on an idle CPU core and up to about fifteen on a busy two-core machine; ``--epochs``,
``--train-subset``, ``--certify-images``, ``--n`` and ``--threads`` scale it up. The last line is::

    methods_slowdown: smoothadv <x>x, macer <y>x, smoothmix <z>x, consistency <w>x (vs gaussian)

Usage::

    .venv/bin/python benchmarks/methods.py                                   # default size
    .venv/bin/python benchmarks/methods.py --epochs 10 --train-subset 60000 --certify-images 500 --n 10000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from certkit import RunPlan, Smooth, certify_dataset, report
from certkit.data import dataset_info, load_dataset
from certkit.methods import get_objective
from certkit.models import create_model
from certkit.train import TrainConfig, Trainer

METHODS = ("gaussian", "smoothadv", "macer", "smoothmix", "consistency")
#: CRT paper, Table 1: CIFAR-10, ResNet-110, one V100, slowdown to convergence against standard training
PUBLISHED_CIFAR = {"smoothadv": 46.20, "macer": 20.86, "smoothmix": 4.97}
#: per-epoch seconds ratio against Gaussian in alinlab/smoothing-catrs's Fashion-MNIST LeNet logs, sigma 0.25
PUBLISHED_FMNIST = {"smoothadv": 25.7, "macer": 14.6, "smoothmix": 14.2, "consistency": 3.8}
RECIPE_EPOCHS = 90


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods; gaussian must be one of them")
    p.add_argument("--sigma", type=float, default=0.25, help="training and certification noise level")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of every method")
    p.add_argument("--train-subset", type=int, default=3000, help="first N training images")
    p.add_argument("--batch-size", type=int, default=128, help="loader batch (chunked methods split it into m chunks)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9, weight decay 1e-4, cosine)")
    p.add_argument("--certify-images", type=int, default=150, help="certify the first N test images")
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--n", type=int, default=1000, help="estimation samples")
    p.add_argument("--alpha", type=float, default=0.001, help="certification failure probability")
    p.add_argument(
        "--published-schedules",
        action="store_true",
        help="keep the 90-epoch recipe's warm-ups (10 epochs) and MACER deferral (31 epochs)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: stable timings on a shared machine, where a multi-threaded op waits "
        "for its slowest, possibly descheduled, thread)",
    )
    p.add_argument("--seed", type=int, default=0, help="model initialisation, data order and noise")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the dataset's default)")
    p.add_argument("--out", default=None, help="folder for the result files (default: a temporary folder)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "gaussian" not in args.methods:
        p.error("--methods must include gaussian, the unit of the slowdown")
    if args.epochs < 1 or args.train_subset < 1 or args.certify_images < 1:
        p.error("--epochs, --train-subset and --certify-images must be >= 1")
    return args


def scaled_schedules(method: str, defaults: dict[str, Any], epochs: int) -> dict[str, Any]:
    """The 90-epoch recipe's warm-up/deferral, scaled to ``epochs`` (only for the keys the method has)."""
    out: dict[str, Any] = {}
    if "warmup" in defaults:
        out["warmup"] = max(1, round(epochs * defaults["warmup"] / RECIPE_EPOCHS))
    if defaults.get("deferred_epochs"):
        deferred = round(epochs * defaults["deferred_epochs"] / RECIPE_EPOCHS)
        out["deferred_epochs"] = deferred if deferred < epochs else 0
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_trainer(method: str, args: argparse.Namespace, train_data: Any) -> Trainer:
    info = dataset_info("fashion-mnist")
    cls = get_objective(method)
    defaults = cls.defaults(info.family, args.sigma)
    overrides = {} if args.published_schedules else scaled_schedules(method, defaults, args.epochs)
    objective = cls.from_config(args.sigma, info.family, overrides)
    torch.manual_seed(args.seed)
    model = create_model("lenet", info.num_classes, info.in_shape, info.mean, info.std)
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=args.lr, schedule="cosine", seed=args.seed
    )
    log(f"[{method}] training: {objective!r}")
    return Trainer(
        model,
        objective,
        train_data,
        None,
        config,
        out_dir=None,
        device="cpu",
        progress=False,
        log=lambda msg: log(f"[{method}] {msg}"),  # the methods' epoch lines interleave: say whose
    )


def train_in_turns(trainers: dict[str, Trainer]) -> dict[str, float]:
    """Train every trainer to its last epoch, an epoch of each in turn (the first of each round moving on by
    one every round); returns each method's process CPU seconds of training."""
    runs = {method: t.fit_epochs() for method, t in trainers.items()}
    cpu = dict.fromkeys(trainers, 0.0)
    rnd = 0
    while runs:
        order = list(runs)
        for method in order[rnd % len(order) :] + order[: rnd % len(order)]:
            began = time.process_time()
            finished = next(runs[method], None) is None
            cpu[method] += time.process_time() - began
            if finished:
                del runs[method]
        rnd += 1
    return cpu


def run_method(
    method: str,
    trainer: Trainer,
    cpu_seconds: float,
    args: argparse.Namespace,
    train_data: Any,
    test_data: Any,
    out_dir: Path,
) -> dict[str, Any]:
    """The figures of one trained method, with its certification."""
    info = dataset_info("fashion-mnist")
    model, objective = trainer.model, trainer.objective  # prepare_model returns the model itself for these
    cpu_per_epoch = cpu_seconds / args.epochs
    totals = trainer.ledger.totals()
    # the fastest epoch: the one least disturbed by other jobs (and by one-off start-up costs)
    seconds_per_epoch = min(e["seconds"] for e in trainer.ledger.epochs)
    passes = totals.get("forward", 0.0) / (args.epochs * len(train_data))

    model.eval()
    with torch.no_grad():
        x, y = next(test_data.batches(len(test_data)))
        clean_acc = float((model(x).argmax(1) == y).float().mean())
    result_file = out_dir / f"{method}.tsv"
    log(f"[{method}] certifying {len(test_data)} images, n0={args.n0}, n={args.n}")
    began = time.perf_counter()
    plan = RunPlan(n0=args.n0, n=args.n, alpha=args.alpha, batch_size=1000, seed=args.seed)
    smoothed = Smooth(model, info.num_classes, args.sigma)
    certify_dataset(smoothed, test_data, plan, out=result_file, progress=False, resume=False)
    certify_seconds = time.perf_counter() - began
    cert = report.certified_accuracy(result_file, [0.0, 0.25, 0.5])
    return {
        "method": method,
        "seconds_per_epoch": seconds_per_epoch,
        "cpu_per_epoch": cpu_per_epoch,
        "passes": passes,
        "clean_acc": clean_acc,
        "smoothed_acc": float(cert[0]),
        "acr": report.acr(result_file),
        "cert_025": float(cert[1]),
        "cert_05": float(cert[2]),
        "certify_seconds": certify_seconds,
        "hparams": dict(objective.hparams),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    gauss = next(r for r in rows if r["method"] == "gaussian")
    base, cpu_base = gauss["seconds_per_epoch"], gauss["cpu_per_epoch"]
    lines = [
        "| method | s/epoch (fastest) | slowdown vs gaussian | CPU s/epoch (ratio) | passes/img "
        "| clean acc | smoothed acc | ACR "
        "| cert acc @0.25 | cert acc @0.5 | published slowdown (FMNIST LeNet logs / CIFAR-10 ResNet-110) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fm = PUBLISHED_FMNIST.get(r["method"])
        cf = PUBLISHED_CIFAR.get(r["method"])
        published = (
            " / ".join("—" if v is None else f"{v:.2f}×" for v in (fm, cf)) if r["method"] != "gaussian" else "1×"
        )
        lines.append(
            f"| {r['method']} | {r['seconds_per_epoch']:.1f} | {r['seconds_per_epoch'] / base:.2f}× "
            f"| {r['cpu_per_epoch']:.1f} ({r['cpu_per_epoch'] / cpu_base:.2f}×) | {r['passes']:.0f} "
            f"| {r['clean_acc']:.3f} | {r['smoothed_acc']:.3f} | {r['acr']:.3f} "
            f"| {r['cert_025']:.3f} | {r['cert_05']:.3f} "
            f"| {published} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="certkit-methods-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    train_data = load_dataset("fashion-mnist", "train", args.data_dir).subset(args.train_subset)
    test_data = load_dataset("fashion-mnist", "test", args.data_dir).subset(args.certify_images)
    began = time.perf_counter()
    trainers = {m: make_trainer(m, args, train_data) for m in args.methods}
    cpu = train_in_turns(trainers)
    rows = [run_method(m, trainers[m], cpu[m], args, train_data, test_data, out_dir) for m in args.methods]
    total = time.perf_counter() - began

    print(
        f"Fashion-MNIST, LeNet, sigma = {args.sigma}: {args.epochs} epoch(s) on {len(train_data)} training images "
        f"(SGD lr {args.lr}, cosine, batch {args.batch_size}); certified on the first {len(test_data)} test images "
        f"with n0 = {args.n0}, n = {args.n}, alpha = {args.alpha}; {torch.get_num_threads()} CPU thread(s); "
        f"{total:.0f} s in all. Result files: {out_dir}"
    )
    print()
    print(markdown(rows))
    print()
    for r in rows:
        print(f"- {r['method']}: {r['hparams']}")
    print()
    base = next(r["seconds_per_epoch"] for r in rows if r["method"] == "gaussian")
    others = ", ".join(f"{r['method']} {r['seconds_per_epoch'] / base:.2f}x" for r in rows if r["method"] != "gaussian")
    print(f"methods_slowdown: {others} (vs gaussian)")


if __name__ == "__main__":
    main()
