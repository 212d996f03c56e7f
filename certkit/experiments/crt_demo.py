"""The main job: a SmoothMix teacher → CRT student, against the same student trained with SmoothMix.

Trains a cheap teacher with SmoothMix once, transfers it to a LeNet student with CRT, trains the same LeNet
with SmoothMix directly for comparison, certifies all three on the same test subset, and prints one table:
training seconds and speedup, forward+backward image passes and their ratio (the same figures on a busy
machine as on an idle one, where seconds are not), clean accuracy, ACR and certified accuracy at radii,
plus the cumulative cost of model generations (teacher once + one CRT student per generation against SmoothMix
for every generation).

The default is sized for about ten minutes on two CPU cores (a training subset, a few epochs, a test
subset, n = 2,000); ``full=True`` uses the literature's settings (90 epochs, full data, full test set,
n = 100,000), which takes hours on CPU. Everything resumes: re-running continues trained runs and
certifications where they stopped.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from certkit import checkpoint, report
from certkit.data import dataset_info, load_dataset
from certkit.fileio import atomic_write_text, check_output
from certkit.smoothing.runner import RunPlan, certify_dataset
from certkit.smoothing.smooth import Smooth
from certkit.train import STATE, build_trainer, select_device


@dataclass(frozen=True)
class CompareConfig:
    """Everything that defines one teacher → student comparison."""

    dataset: str = "fashion-mnist"
    sigma: float = 0.25
    teacher_arch: str = "smallcnn"
    student_arch: str = "lenet"
    teacher_method: str = "smoothmix"
    train_subset: int | None = 12_000
    test_subset: int = 1_000
    #: the teacher is paid once, so it gets the longer training: a CRT student stays just below its teacher's
    #: ACR, and SmallCNN comes level with the directly trained LeNet's only after about 30 epochs (README,
    #: "CRT: the main job")
    teacher_epochs: int = 30
    student_epochs: int = 10
    batch_size: int = 128
    #: the CRT student's own settings: batch 64 and α = 0.5 (half transfer, half cross-entropy), the best of
    #: the settings tried on the demo's budget (README, "Choosing the CRT student's settings"); at the
    #: literature's length the official values.
    crt_alpha: float = 0.5
    crt_batch_size: int | None = 64
    #: the CRT student's learning rate (None: ``lr``), for trying a larger batch at a scaled rate
    crt_lr: float | None = None
    lr: float = 0.05
    schedule: str = "cosine"
    #: certification: the test images certified are the first `certify_images` of the test set
    certify_images: int = 500
    n0: int = 100
    n: int = 2_000
    alpha: float = 0.001
    cert_batch: int = 1_000
    #: channels-last certification: the same votes up to rounding, checked before each run (see
    #: ``certkit.smoothing.runner``), for a faster forward pass of the convolutional nets on CPU and GPU
    cert_channels_last: bool = True
    seed: int = 0
    #: the teacher's seed: give it another one than ``seed`` when the teacher has the students' architecture,
    #: or it is the directly trained student itself, weight for weight
    teacher_seed: int = 0
    generations: int = 3
    teacher_hparams: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def full(cls) -> CompareConfig:
        """The literature's settings: 90 epochs, lr 0.01 ×0.1 every 30, all data, full test set, n = 100,000."""
        return cls(
            train_subset=None,
            test_subset=10_000,
            teacher_epochs=90,
            student_epochs=90,
            batch_size=256,
            lr=0.01,
            schedule="step",
            certify_images=10_000,
            n=100_000,
            crt_alpha=1.0,
            crt_batch_size=None,
        )


def _train_kwargs(
    cfg: CompareConfig, epochs: int, batch_size: int | None = None, seed: int | None = None, lr: float | None = None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        epochs=epochs,
        batch_size=batch_size or cfg.batch_size,
        lr=cfg.lr if lr is None else lr,
        schedule=cfg.schedule,
        seed=cfg.seed if seed is None else seed,
        train_subset=cfg.train_subset,
        test_subset=cfg.test_subset,
    )
    if cfg.schedule == "step":
        kwargs["lr_step"] = max(1, epochs // 3)
    return kwargs


def compare(
    cfg: CompareConfig,
    out: str | Path,
    data_dir: str | None = None,
    device: str = "auto",
    log=lambda msg: print(msg, file=sys.stderr),
) -> dict[str, Any]:
    """Train the teacher, then the CRT and the SmoothMix student in turns, an epoch each (their training times
    are compared, so a change in the machine's speed should hit both alike); certify all three; return the
    figures."""
    out = Path(out)
    dev = select_device(device)
    runs: dict[str, dict[str, Any]] = {
        "teacher": dict(
            arch=cfg.teacher_arch,
            method=cfg.teacher_method,
            hparams=cfg.teacher_hparams,
            epochs=cfg.teacher_epochs,
            seed=cfg.teacher_seed,
        ),
        "crt": dict(
            arch=cfg.student_arch,
            method="crt",
            teacher=out / "teacher",
            epochs=cfg.student_epochs,
            hparams={"alpha": cfg.crt_alpha},
            batch_size=cfg.crt_batch_size,
            lr=cfg.crt_lr,
        ),
        "direct": dict(
            arch=cfg.student_arch, method=cfg.teacher_method, hparams=cfg.teacher_hparams, epochs=cfg.student_epochs
        ),
    }
    test = load_dataset(cfg.dataset, "test", data_dir)
    info = dataset_info(cfg.dataset)

    epoch_log = logging.getLogger("certkit").info

    def epochs(name: str) -> Iterator[dict[str, Any]]:
        """The run ``name`` (resumed where it stopped) one epoch at a time."""
        spec, resume = runs[name], (out / name / STATE).is_file()
        log(f"== {name}: {spec['arch']} with {spec['method']} ({spec['epochs']} epochs)")
        return build_trainer(
            cfg.dataset,
            spec["arch"],
            spec["method"],
            sigma=cfg.sigma,
            out=out / name,
            hparams=spec.get("hparams"),
            teacher=spec.get("teacher"),
            data_dir=data_dir,
            device=str(dev),
            resume=resume,
            log=lambda msg: epoch_log(f"{name}: {msg}"),  # the students' lines interleave: say whose
            **_train_kwargs(cfg, spec["epochs"], spec.get("batch_size"), spec.get("seed"), spec.get("lr")),
        ).run_epochs(resume)

    for _ in epochs("teacher"):
        pass
    # the two students take turns, an epoch each, so that a change in the machine's speed hits both alike
    turns = [epochs("crt"), epochs("direct")]
    while turns:
        turns = [run for run in turns if next(run, None) is not None]
    figures: dict[str, Any] = {}
    for name in runs:
        model, meta = checkpoint.load_with_meta(out / name, device=dev)
        log(f"== certifying {name} on {cfg.certify_images} test images (n0={cfg.n0}, n={cfg.n}, alpha={cfg.alpha})")
        tsv = out / f"{name}.tsv"
        plan = RunPlan(
            n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, batch_size=cfg.cert_batch, max_idx=cfg.certify_images, seed=cfg.seed
        )
        smoothed = Smooth(model, info.num_classes, cfg.sigma, channels_last=cfg.cert_channels_last)
        certify_dataset(smoothed, test, plan, out=tsv, progress=True)
        figures[name] = {
            "arch": meta["arch"],
            "method": meta["method"],
            "seconds": meta["cost"]["total"]["seconds"],
            "clean_acc": meta["metrics"].get("test_clean_acc"),
            "acr": report.exact_acr(tsv),  # exact, so that the printed figures can round it down
            "tsv": str(tsv),
            "cost": meta["cost"]["total"],
            "passes": image_passes(meta["cost"]["total"]),
            "epoch_seconds": [e["seconds"] for e in meta["cost"]["epochs"]],
        }
    return with_ratios(figures, cfg.generations)


def with_ratios(figures: dict[str, Any], generations: int) -> dict[str, Any]:
    """``figures`` of the teacher and the two students with what the demo sets against each other added: the
    CRT student's speedup over the direct one (whole runs and each epoch pair), their image-pass and ACR
    ratios, and the cost of a chain of ``generations`` students."""
    direct, crt, teacher = figures["direct"]["seconds"], figures["crt"]["seconds"], figures["teacher"]["seconds"]
    figures["speedup"] = direct / crt
    # epoch i of each student ran back to back (they take turns), so each pair saw the same load of the
    # moment; their spread is how much the load moved the wall-clock ratio, which the total cannot show
    pairs = [d / c for d, c in zip(figures["direct"]["epoch_seconds"], figures["crt"]["epoch_seconds"])]
    figures["speedup_epochs"] = (min(pairs), max(pairs))
    # exact, so that the printed figures can round them down (report.floor_ratio)
    figures["pass_ratio"] = Fraction(figures["direct"]["passes"], figures["crt"]["passes"])
    crt_acr, direct_acr = figures["crt"]["acr"], figures["direct"]["acr"]
    figures["acr_ratio"] = crt_acr / direct_acr if direct_acr else float("nan")
    g = generations
    figures["chain"] = {
        "generations": g,
        "crt_seconds": teacher + g * crt,
        "direct_seconds": g * direct,
        "reduction": 1.0 - (teacher + g * crt) / (g * direct),
    }
    return figures


def image_passes(cost: dict[str, float]) -> int:
    """Images through forward and backward passes of every counted module (the student's, a CRT teacher's
    forwards): a training cost that, unlike seconds, does not depend on what else the machine is doing."""
    return int(sum(v for k, v in cost.items() if k.endswith("forward") or k.endswith("backward")))


def render(cfg: CompareConfig, figures: dict[str, Any], plot: Path | None = None) -> str:
    """The comparison as a Markdown table, plus the cost lines; draws the curves when ``plot`` is given."""
    named = {
        f"teacher: {figures['teacher']['arch']} {figures['teacher']['method']}": figures["teacher"]["tsv"],
        f"student: {figures['crt']['arch']} CRT": figures["crt"]["tsv"],
        f"student: {figures['direct']['arch']} {figures['direct']['method']}": figures["direct"]["tsv"],
    }
    radii = [r for r in (0.0, 0.25, 0.5, 0.75) if r < cfg.sigma * 4]
    direct_s, direct_passes = figures["direct"]["seconds"], figures["direct"]["passes"]
    lines = [
        f"Fashion-MNIST, sigma={cfg.sigma}, {cfg.certify_images} test images, "
        f"n0={cfg.n0}, n={cfg.n}, alpha={cfg.alpha}",
        f"teacher {cfg.teacher_epochs} epochs, students {cfg.student_epochs} epochs; CRT: transfer weight "
        f"{cfg.crt_alpha:g}, batch {cfg.crt_batch_size or cfg.batch_size}"
        + (f", lr {cfg.crt_lr:g}" if cfg.crt_lr is not None else "")
        + "; "
        f"{cfg.teacher_method}: batch {cfg.batch_size}",
        "",
        "| model | train s | speedup vs direct | image passes | pass ratio vs direct | clean acc | ACR | "
        + " | ".join(f"r={r:g}" for r in radii)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(radii),
    ]
    for label, key in zip(named, ("teacher", "crt", "direct")):
        f = figures[key]
        rows = report.load(f["tsv"])  # read once for every radius
        acc = [report.exact_accuracy(rows, r) for r in radii]
        clean = (
            "–" if f["clean_acc"] is None else report.floor_figure(100 * report.count_ratio(f["clean_acc"]), 1) + "%"
        )
        lines.append(
            f"| {label} | {f['seconds']:.1f} | {report.floor_ratio(direct_s, f['seconds'])}x | {f['passes']:,} | "
            f"{report.floor_ratio(direct_passes, f['passes'])}x | "
            f"{clean} | "
            f"{report.floor_figure(f['acr'])} | "
            + " | ".join(f"{report.floor_figure(a * 100, 1)}%" for a in acc)
            + " |"
        )
    ch = figures["chain"]
    lo, hi = figures["speedup_epochs"]
    lines += [
        "",
        f"crt_speedup: {report.floor_ratio(figures['speedup'], 1)}x (wall clock; epoch pairs "
        f"{report.floor_ratio(lo, 1, 1)}–{report.floor_ratio(hi, 1, 1)}x)  "
        f"crt_pass_ratio: {report.floor_ratio(figures['pass_ratio'], 1)}x "
        f"(forward+backward image passes)  acr_ratio: {report.floor_ratio(figures['acr_ratio'], 1, 3)}",
        f"teacher cost (paid once): {figures['teacher']['seconds']:.1f}s",
        f"{ch['generations']}-generation chain: CRT {ch['crt_seconds']:.1f}s "
        f"(teacher + {ch['generations']} students) vs "
        f"{figures['direct']['method']} {ch['direct_seconds']:.1f}s ({ch['generations']} trainings): "
        f"{report.floor_ratio(100 * ch['reduction'], 1, 1)}% cumulative cost reduction",
    ]
    if plot is not None:
        report.plot_curves(named, plot)
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


def run_demo(
    out: str | Path = "demo-out", full: bool = False, data_dir: str | None = None, device: str = "auto"
) -> str:
    check_output(out, "--out", directory=True)  # before an hour of training, not after it
    select_device(device)
    cfg = CompareConfig.full() if full else CompareConfig()
    out = Path(out) / ("full" if full else "quick")
    figures = compare(cfg, out, data_dir, device)
    text = render(cfg, figures, plot=out / "curves.png")
    atomic_write_text(out / "summary.md", text + "\n")
    print(text)
    return text
