"""GloRo against randomized smoothing on Fashion-MNIST at L2 radius 0.5 (pixel units, images in [0, 1]).

* **GloRo**: a ``gloro-2c2f`` (or ``gloro-4c3f``) net trained with the ``gloro`` objective through
  :func:`certkit.train.train` (Adam, exponential LR decay, training ε ramped to ``--train-eps-factor`` × ε),
  saved, reloaded from its checkpoint, then certified deterministically on the **whole 10k test set** in one
  forward pass per batch with its frozen *guaranteed* Lipschitz bound. Printed: clean accuracy, VRA at ε,
  rejection rate, and the seconds to certify the 10k images (forward passes; the bound verification on
  load is printed apart).
* **Randomized smoothing**: a LeNet trained briefly with Gaussian noise (``--rs-sigma``), certified with
  :func:`certkit.certify_dataset` (CERTIFY of Cohen et al.) on every ``--rs-skip``-th test image with
  a small ``--rs-n`` so it runs in minutes. A small n caps the radius at σ·Φ⁻¹(α^(1/n)) (1.23 for σ=0.5,
  n=1000, α=0.001) and lowers every certified radius, so this is a *lower* estimate of what smoothing reaches
  with the usual n=100,000; its certificate also holds only with probability 1−α, GloRo's deterministically.

    python benchmarks/gloro.py                          # about 5-10 minutes on 2 CPU cores
    python benchmarks/gloro.py --epochs 20 --lr 1e-3 --rs-epochs 10 --rs-n 10000 --rs-skip 10

Last line: ``gloro_vra_at_0.5: <value> (rs_certified_acc_at_0.5: <value>)``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from certkit import RunPlan, Smooth, certify_dataset, checkpoint
from certkit.data import load_dataset
from certkit.gloro.certify import certify_gloro_dataset
from certkit.report import certified_accuracy
from certkit.results import read_results
from certkit.train import train


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default="bench-out/gloro", help="run folder (replaced)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: certkit's)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--epsilon", type=float, default=0.5, help="evaluation radius (L2, pixel units)")
    g = p.add_argument_group("GloRo")
    g.add_argument("--arch", default="gloro-2c2f", choices=["gloro-2c2f", "gloro-4c3f"])
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="initial LR (library: 1e-3 over hundreds of epochs; 3e-3 suits a short run)",
    )
    g.add_argument(
        "--lr-final", type=float, default=1e-4, help="exponential decay target (library: 1e-6 over 300-500 epochs)"
    )
    g.add_argument("--train-eps-factor", type=float, default=1.5, help="training epsilon / evaluation epsilon")
    g.add_argument(
        "--eps-ramp", type=float, default=0.5, help="fraction of epochs over which the training epsilon ramps up"
    )
    g.add_argument("--lbd", type=float, default=0.0, help="TRADES weight (0: GloRo cross-entropy over C+1 logits)")
    g.add_argument("--power-iterations", type=int, default=10)
    g.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all 60k)")
    r = p.add_argument_group("randomized smoothing")
    r.add_argument("--rs-sigma", type=float, default=0.5)
    r.add_argument("--rs-epochs", type=int, default=2)
    r.add_argument("--rs-n0", type=int, default=100)
    r.add_argument("--rs-n", type=int, default=1000)
    r.add_argument("--rs-alpha", type=float, default=0.001)
    r.add_argument("--rs-skip", type=int, default=40, help="certify every skip-th test image (40: 250 images)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    eps = args.epsilon
    test = load_dataset("fashion-mnist", "test", args.data_dir)

    # --- GloRo ------------------------------------------------------------------------------------------
    began = time.perf_counter()
    trainer = train(
        "fashion-mnist",
        args.arch,
        "gloro",
        out=out / "gloro",
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=0,
        device="cpu",
        progress=False,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_final=args.lr_final,
        hparams=dict(
            epsilon=eps,
            train_eps_factor=args.train_eps_factor,
            eps_ramp=args.eps_ramp,
            lbd=args.lbd,
            power_iterations=args.power_iterations,
        ),
    )
    gloro_train_s = trainer.ledger.seconds
    net = checkpoint.load(out / "gloro")
    load_s = time.perf_counter()
    summary = certify_gloro_dataset(
        net, test, out=out / "gloro.tsv", epsilon=eps, batch_size=1000, progress=False, resume=False
    )
    certify_wall_s = time.perf_counter() - load_s
    assert summary is not None
    gm = summary["gloro"]
    print(
        f"GloRo {args.arch}: trained {args.epochs} epochs in {gloro_train_s:.0f}s "
        f"(total {time.perf_counter() - began:.0f}s with checkpointing and certification)",
        flush=True,
    )

    # --- randomized smoothing -----------------------------------------------------------------------------
    began = time.perf_counter()
    rs = train(
        "fashion-mnist",
        "lenet",
        "gaussian",
        sigma=args.rs_sigma,
        out=out / "rs",
        data_dir=args.data_dir,
        test_subset=0,
        device="cpu",
        progress=False,
        epochs=args.rs_epochs,
    )
    rs_train_s = rs.ledger.seconds
    model = checkpoint.load(out / "rs")
    certify_began = time.perf_counter()
    plan = RunPlan(n0=args.rs_n0, n=args.rs_n, alpha=args.rs_alpha, batch_size=1000, skip=args.rs_skip)
    rs_summary = certify_dataset(
        Smooth(model, 10, args.rs_sigma), test, plan, out=out / "rs.tsv", progress=False, resume=False
    )
    rs_certify_s = time.perf_counter() - certify_began
    assert rs_summary is not None
    rs_res = read_results(out / "rs.tsv")
    rs_acc = float(certified_accuracy(rs_res, eps))
    rs_clean = float(certified_accuracy(rs_res, 0.0))
    print(
        f"RS LeNet sigma={args.rs_sigma}: trained {args.rs_epochs} epochs in {rs_train_s:.0f}s "
        f"(total {time.perf_counter() - began:.0f}s)",
        flush=True,
    )

    # --- side by side -------------------------------------------------------------------------------------
    k = gm["lipschitz"]
    print()
    print(f"| Fashion-MNIST, L2 eps = {eps:g} | GloRo {args.arch} | RS LeNet sigma={args.rs_sigma:g} |")
    print("|---|---|---|")
    print(
        f"| test images certified | {gm['N']} (all) | {len(rs_res)} (every {args.rs_skip}th), "
        f"n0={args.rs_n0}, n={args.rs_n}, alpha={args.rs_alpha:g} |"
    )
    print(f"| training | {args.epochs} epochs, {gloro_train_s:.0f}s | {args.rs_epochs} epochs, {rs_train_s:.0f}s |")
    print(
        f"| clean accuracy (GloRo) / smoothed accuracy (RS) | {gm['clean_accuracy']:.4f} (clean) "
        f"| {rs_clean:.4f} (smoothed: certified at radius 0, not the base network's clean accuracy) |"
    )
    print(f"| certified at {eps:g} | VRA {gm['vra']:.4f} (deterministic) | {rs_acc:.4f} (with prob. 1-alpha) |")
    print(f"| rejected / abstained | {gm['rejection_rate']:.4f} | {rs_summary['abstain_rate']:.4f} |")
    print(
        f"| seconds to certify | {gm['certify_seconds']:.2f}s for {gm['N']} images "
        f"({certify_wall_s:.1f}s wall incl. bound check {k['seconds']:.1f}s) "
        f"| {rs_certify_s:.0f}s for {len(rs_res)} images |"
    )
    print(f"| Lipschitz bound K_sub | {k['lipschitz_bound']:.4f} (guaranteed {k['lipschitz_guaranteed']:.4f}) | - |")
    print()
    print(f"gloro_vra_at_{eps:g}: {gm['vra']:.4f} (rs_certified_acc_at_{eps:g}: {rs_acc:.4f})")


if __name__ == "__main__":
    main()
