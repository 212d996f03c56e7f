"""Training speed of certkit against the official training scripts, run side by side on the same data.

The official code is ``../shared/peer-code/smoothmix`` (jh-jeong/smoothmix, unmodified). It is only *run*,
from a scratch copy of its ``code/`` folder; nothing of it is imported here or copied into certkit. Both
sides train LeNet on Fashion-MNIST at sigma = 0.25 with batch 256, SGD lr 0.01 (momentum 0.9, weight decay
1e-4, x0.1 every 30 epochs) and the method hyperparameters of the published MNIST-family command lines in
the peer code's ``EXPERIMENTS.MD``:

    gaussian      train_cohen.py
    smoothmix     train.py            m = 4, T = 3, step 1.0, mix_step 0, eta 1.0, warm-up 10
    smoothadv     train_salman.py     PGD, epsilon 255/256, T = 10, m = 4, warm-up 10
    macer         train_macer.py      k = 16, beta 16, gamma 8, lambda 16, *not* deferred
    consistency   train_consistency.py  m = 2, lambda 10, eta 0.5

MACER runs without its deferral (the published run sets lambda = 0 for the first 31 epochs), because a
deferred epoch skips the robustness loss on both sides and the comparison is about the full objective.

How the time is taken: both sides get the same scratch copy of the first ``K*256`` training images and
the first 16 test images (truncated IDX files under ``dataset_cache/MNIST/raw``, which torchvision's
MNIST class reads on the official side and ``--data-dir`` points certkit at), so an epoch is exactly K
batches. Each run trains ``--epochs`` epochs (default 3) in a fresh process; the first epoch is warm-up
and dropped. The runs are interleaved per method, official then certkit, over ``--rounds`` rounds (the
order flips each round), so load from other jobs hits both sides alike. A side's seconds per image is the
mean of its timed epochs over all rounds divided by ``K*256``; the ratio is certkit's over the official
one (lower is better for certkit). With two rounds or more, each line also gives the lowest and the highest
ratio of a single round: the official code's time moves between runs on the same machine, and a ratio near
a target is only as good as that spread.

What each side's epoch time includes:

- official: the second column of its ``logs/.../log.txt`` (printed to 3 significant digits): the
  training epoch with its DataLoader, per-step ``.item()`` calls and prints, plus the test pass over the 16
  test images and the per-epoch scalar logging. The DataLoader runs with ``--workers 0`` by default
  (``--official-workers`` changes it), where the official scripts' own default is 4: each image is converted
  (PIL, ``ToTensor``) in the training process, one after another, and that time is in the official epoch.
  On the 2-core development machine, four loader processes would compete with the two training threads for
  the same cores; on a many-core GPU host they would overlap the conversion with the GPU's work, so there
  ``--workers 0`` is expected to make the official side slower than at its default, and the ratio lower (by
  how much was not measured);
- certkit: the ``seconds`` of each epoch in the run's ``metrics.jsonl`` (``python -m certkit train``):
  the training loop only (``--test-subset 0``, and certkit never counts its per-epoch test).

Memory: certkit's CLI keeps freed memory in the process (``certkit/allocator.py``: without it, glibc gives a
step's large buffers back to the kernel and maps them afresh, which costs a small network's step up to
half its time). The official scripts run under glibc's defaults, as published; ``--official-keep-freed-memory``
gives them the same setting through glibc's environment variables, to show how much of the gap it is.

Threads: ``--threads N`` sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for both processes. ``--device cpu``
hides CUDA from both (the official scripts take CUDA whenever it is visible); ``--device cuda`` runs both
on the GPU.

Requirements: none beyond certkit's own. The official scripts import ``tensorboardX``; a stub module on
their ``PYTHONPATH`` re-exports ``torch.utils.tensorboard.SummaryWriter`` when the ``tensorboard`` package
is installed and otherwise supplies a writer that drops the per-epoch scalars (they only log).
``statsmodels`` is needed only by their certifier, which is not run.

    python benchmarks/vs_official.py [--methods gaussian,smoothmix] [--batches 4] [--rounds 2]
                                     [--threads 1] [--device cpu] [--amp bf16] [--official-workers 0]
                                     [--keep DIR]

Relative paths (``--keep``, ``--peer-code``, ``--source``) are resolved against the directory the script is
started in (the subprocesses run in the scratch folder).

``--amp bf16`` times certkit (and the ``--floor`` loop) under bf16 autocast against the official code in
fp32: a speed option that changes the arithmetic, whose effect on the trained models is measured apart
(docs/benchmarks.md).

One line per method and ``--amp`` setting, ``train_ratio_<method>[_bf16]: <ratio>  (certkit <ms> ms/image,
official <ms> ms/image; rounds <lowest>–<highest>)``, and a last line ``vs_official: <worst ratio> --amp
<setting> (<method>), ...``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import TypeVar

from certkit.allocator import ENVIRONMENT
from certkit.data import dataset_info
from certkit.errors import CertkitError

BATCH = 256
SIGMA = 0.25
TEST_IMAGES = 16
PEER_CODE = Path(__file__).resolve().parents[2] / "shared" / "peer-code" / "smoothmix"
#: the unzipped IDX files torchvision's MNIST class reads from ``<root>/MNIST/raw``
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
T = TypeVar("T")
TENSORBOARDX_STUB = '''\
"""Stand-in for the tensorboardX package, for running the official training scripts."""
try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # no tensorboard package: the scripts only log per-epoch scalars, so drop them

    class SummaryWriter:
        def __init__(self, *args, **kwargs):
            pass

        def add_scalar(self, *args, **kwargs):
            pass

        def close(self):
            pass
'''


#: ``--floor``: the least time an eager trainer can take for Gaussian training with these kernels — a bare loop of
#: the same arithmetic (LeNet in channels-last, as certkit runs it, the K batches held as one tensor on the
#: device, no loader, logging, checks or progress; glibc's malloc set as certkit's CLI sets it), so the gap
#: between it and certkit is certkit's own overhead and the gap between it and the official code is what
#: kernels alone give. It runs on ``--device``, as both sides do (eagerly: on CUDA certkit's captured step is
#: then below it). With ``--amp bf16`` it runs under the same bf16 autocast as certkit. Prints one line of
#: per-epoch seconds.
FLOOR_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
from certkit.allocator import keep_freed_memory
from certkit.data import read_idx_pair
from certkit.models import create_model
keep_freed_memory()
raw, epochs, batch, amp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "bf16"
device = torch.device(sys.argv[5])
x, y = read_idx_pair(raw, "train")
x, y = x.float().div(255).to(device), y.to(device)
torch.manual_seed(0)
model = create_model("lenet", 10, (1, 28, 28)).to(device).to(memory_format=torch.channels_last).train()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


seconds = []
for _ in range(epochs):
    sync()
    start = time.perf_counter()
    for i in torch.randperm(len(x), device=device).split(batch):
        xb = x[i]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(xb + 0.25 * torch.randn_like(xb)), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    seconds.append(time.perf_counter() - start)
print(json.dumps(seconds))
"""


@dataclass(frozen=True)
class Method:
    """One training method: the official script and the same hyperparameters in each side's flags."""

    script: str
    official: tuple[str, ...]
    certkit: tuple[str, ...]


METHODS: dict[str, Method] = {
    "gaussian": Method("train_cohen.py", (), ()),
    "smoothmix": Method(
        "train.py",
        (
            "--num-noise-vec",
            "4",
            "--num-steps",
            "3",
            "--alpha",
            "1.0",
            "--mix_step",
            "0",
            "--eta",
            "1.0",
            "--warmup",
            "10",
        ),
        (
            "--num-noise-vec",
            "4",
            "--num-steps",
            "3",
            "--step-size",
            "1.0",
            "--mix-step",
            "0",
            "--eta",
            "1.0",
            "--warmup",
            "10",
        ),
    ),
    "smoothadv": Method(
        "train_salman.py",
        ("--attack", "PGD", "--epsilon", "255", "--num-steps", "10", "--warmup", "10", "--num-noise-vec", "4"),
        ("--epsilon", repr(255 / 256), "--num-steps", "10", "--warmup", "10", "--num-noise-vec", "4"),
    ),
    "macer": Method(
        "train_macer.py",
        ("--num-noise-vec", "16", "--beta", "16.0", "--margin", "8.0", "--lbd", "16.0"),
        ("--gauss-num", "16", "--beta", "16.0", "--gamma", "8.0", "--lbd", "16.0", "--deferred-epochs", "0"),
    ),
    "consistency": Method(
        "train_consistency.py",
        ("--num-noise-vec", "2", "--lbd", "10"),
        ("--num-noise-vec", "2", "--lbd", "10", "--eta", "0.5"),
    ),
}


def truncate_idx(src: Path, dst: Path, count: int) -> None:
    """Write the first ``count`` items of the IDX file ``src`` (gzipped or not) to ``dst``, unzipped.

    The header's item count is rewritten, since torchvision shapes the data from the header.
    """
    raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CertkitError(f"{src}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    start = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    if not 1 <= count <= dims[0]:
        raise CertkitError(f"{src}: holds {dims[0]} items, cannot take {count}")
    size = math.prod(dims[1:])
    body = raw[start : start + count * size]
    if len(body) != count * size:
        raise CertkitError(f"{src}: truncated; its header promises {dims[0]} items")
    dst.write_bytes(raw[:4] + struct.pack(f">{ndim}I", count, *dims[1:]) + body)


def write_subset(source: Path, raw_dir: Path, train: int, test: int) -> None:
    """Fill ``raw_dir`` with the first ``train`` training and ``test`` test images and labels of ``source``."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        for stem in IDX_STEMS[split]:
            src = next((p for p in (source / f"{stem}.gz", source / stem) if p.is_file()), None)
            if src is None:
                raise CertkitError(f"{source / stem}.gz: missing; expected the Fashion-MNIST IDX files there")
            truncate_idx(src, raw_dir / stem, count)


def official_copy(
    peer_code: Path, script: str, scratch: Path, source: Path | None, train: int, test: int
) -> tuple[Path, Path]:
    """A scratch copy of the official ``code/`` folder (which must hold ``script``) with the first ``train``
    and ``test`` Fashion-MNIST images where its torchvision MNIST class reads them (``source``: the IDX
    folder, default certkit's). Returns ``(code folder, raw data folder)``; certkit reads the same folder."""
    if not (peer_code / "code" / script).is_file():
        raise CertkitError(f"{peer_code}: missing the official code (code/{script}); pass --peer-code")
    code = scratch / "official"
    shutil.copytree(peer_code / "code", code)
    raw = code / "dataset_cache" / "MNIST" / "raw"
    write_subset(source or Path(dataset_info("fashion-mnist").default_root or ""), raw, train, test)
    return code, raw


def official_epoch_seconds(log: Path) -> list[float]:
    """Per-epoch wall seconds from an official ``log.txt`` (tab-separated; the second column is the time)."""
    lines = log.read_text().splitlines()
    if not lines or lines[0].split("\t")[:2] != ["epoch", "time"]:
        raise CertkitError(f"{log}: not an official training log (expected the header 'epoch<TAB>time...')")
    return [float(line.split("\t")[1]) for line in lines[1:] if line.strip()]


def certkit_epoch_seconds(metrics: Path) -> list[float]:
    """Per-epoch training-loop seconds from a certkit run's ``metrics.jsonl``."""
    return [float(json.loads(line)["seconds"]) for line in metrics.read_text().splitlines() if line.strip()]


def run(cmd: list[str], cwd: Path, env: dict[str, str], what: str) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise CertkitError(f"{what} exited with status {done.returncode}:\n{tail}")


def run_official(
    method: str, code: Path, run_id: int, epochs: int, env: dict[str, str], workers: int = 0
) -> list[float]:
    cmd = [
        sys.executable,
        METHODS[method].script,
        "mnist",
        "lenet",
        "--lr",
        "0.01",
        "--lr_step_size",
        "30",
        "--epochs",
        str(epochs),
        "--noise_sd",
        str(SIGMA),
        "--batch",
        str(BATCH),
        "--workers",
        str(workers),
        "--id",
        str(run_id),
        *METHODS[method].official,
    ]
    run(cmd, code, env, f"official {METHODS[method].script}")
    logs = sorted(code.glob(f"logs/**/lenet/{run_id}/log.txt"))
    if len(logs) != 1:
        raise CertkitError(f"official {method}: expected one log.txt for id {run_id}, found {len(logs)}")
    return official_epoch_seconds(logs[0])


def run_certkit(
    method: str, data: Path, out: Path, epochs: int, amp: str, a: argparse.Namespace, env: dict[str, str]
) -> list[float]:
    cmd = [
        sys.executable,
        "-m",
        "certkit",
        "train",
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        str(data),
        "--arch",
        "lenet",
        "--method",
        method,
        "--sigma",
        str(SIGMA),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        str(BATCH),
        "--lr",
        "0.01",
        "--momentum",
        "0.9",
        "--weight-decay",
        "1e-4",
        "--schedule",
        "step",
        "--lr-step",
        "30",
        "--test-subset",
        "0",
        "--device",
        a.device,
        "--compile",
        a.compile,
        "--amp",
        amp,
        *METHODS[method].certkit,
    ]
    run(cmd, out.parent, env, f"certkit train --method {method}")
    return certkit_epoch_seconds(out / "metrics.jsonl")


def run_floor(raw: Path, epochs: int, amp: str, env: dict[str, str], device: str = "cpu") -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", FLOOR_SCRIPT, str(raw), str(epochs), str(BATCH), amp, device],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise CertkitError(f"bare Gaussian loop exited with status {done.returncode}: {done.stderr.strip()[-500:]}")
    return [float(s) for s in json.loads(done.stdout.strip().splitlines()[-1])]


def timed(seconds: list[float], epochs: int, what: str) -> list[float]:
    """The epochs after the first (warm-up), checking the run logged every epoch."""
    if len(seconds) != epochs:
        raise CertkitError(f"{what}: logged {len(seconds)} epochs, expected {epochs}")
    return seconds[1:]


def child_env(threads: int, device: str, pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def in_scratch(keep: Path | None, program: str, work: Callable[[Path], T]) -> T:
    """``work(folder)`` in ``keep`` (created; it must not exist yet) or in a temporary folder removed after.

    A :class:`CertkitError` (or an existing ``keep``) ends the program with one ``<program>: error:`` line
    and status 2.
    """
    try:
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=False)
            return work(keep)
        with tempfile.TemporaryDirectory(prefix=f"{program}-") as tmp:
            return work(Path(tmp))
    except (CertkitError, FileExistsError) as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--batches", type=int, default=4, help="K: batches of 256 per epoch")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per method")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up (at least 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of each side")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--compile",
        choices=("auto", "graph", "on", "off"),
        default="auto",
        help="certkit's --compile: how its training step runs (auto: a captured CUDA graph where the method "
        "allows, eager on CPU)",
    )
    p.add_argument(
        "--amp",
        default="off",
        help="certkit's --amp settings to time in the same rounds, comma-separated (off, bf16; e.g. off,bf16): "
        "bf16 autocast runs on CUDA or a CPU with AVX512-BF16/AMX; the official code always trains in fp32",
    )
    p.add_argument(
        "--official-keep-freed-memory",
        action="store_true",
        help="run the official scripts with glibc's malloc set as certkit's CLI sets it (MALLOC_MMAP_THRESHOLD_, "
        "MALLOC_TRIM_THRESHOLD_)",
    )
    p.add_argument(
        "--official-workers",
        type=int,
        default=0,
        help="the official scripts' --workers (DataLoader processes; their own default is 4): 0 converts each "
        "image in the training process, and that time is in the official epoch",
    )
    p.add_argument("--keep", type=Path, default=None, help="keep the scratch folders (data, runs, logs) here")
    p.add_argument("--peer-code", type=Path, default=PEER_CODE, help="the official repository (its code/ is run)")
    p.add_argument("--source", type=Path, default=None, help="Fashion-MNIST IDX folder (default: certkit's)")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time a bare Gaussian loop of the same arithmetic (the least an eager trainer can take with "
        "these kernels) on --device in the same rounds, and print floor_ratio_gaussian",
    )
    a = p.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.amp = [m.strip() for m in a.amp.split(",") if m.strip()]
    if not a.amp or not set(a.amp) <= {"off", "bf16"} or len(set(a.amp)) < len(a.amp):
        p.error(f"--amp takes off, bf16 or both, comma-separated (got {','.join(a.amp)!r})")
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown or not a.methods:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if a.batches < 1 or a.rounds < 1 or a.epochs < 2 or a.threads < 1 or a.official_workers < 0:
        p.error("--batches, --rounds and --threads must be >= 1, --epochs >= 2 and --official-workers >= 0")
    # the subprocesses run in the scratch folder: the paths they are handed must not depend on where we started
    for name in ("keep", "peer_code", "source"):
        if getattr(a, name) is not None:
            setattr(a, name, getattr(a, name).resolve())
    return a


def measure(a: argparse.Namespace, scratch: Path) -> dict[str, dict[str, list[float]]]:
    """Seconds per image of each method on each side that ran (``official``, and ``certkit <amp>`` and
    ``floor <amp>`` for each ``--amp`` setting), one figure per round: the mean of that round's timed epochs."""
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CertkitError("--device cuda: no CUDA device is visible")
    images = a.batches * BATCH
    code, raw = official_copy(a.peer_code, "train.py", scratch, a.source, images, TEST_IMAGES)
    stub = scratch / "stub"
    stub.mkdir()
    (stub / "tensorboardX.py").write_text(TENSORBOARDX_STUB)
    official_env = child_env(a.threads, a.device, str(stub))
    if a.official_keep_freed_memory:
        official_env.update(ENVIRONMENT)
    certkit_env = child_env(a.threads, a.device, None)
    runs = scratch / "certkit"
    runs.mkdir()

    per_round: dict[str, dict[str, list[float]]] = {m: {} for m in a.methods}
    for r in range(a.rounds):
        for i, method in enumerate(a.methods):
            run_id = r * len(METHODS) + i
            sides = ["official", *(f"certkit {amp}" for amp in a.amp)]
            if r % 2:
                sides.reverse()
            if a.floor and method == "gaussian":
                sides += [f"floor {amp}" for amp in a.amp]
            for side in sides:
                kind, _, amp = side.partition(" ")
                if kind == "floor":
                    secs = run_floor(raw, a.epochs, amp, certkit_env, a.device)
                elif kind == "official":
                    secs = run_official(method, code, run_id, a.epochs, official_env, a.official_workers)
                else:
                    out = runs / f"{method}-{amp}-{r}"
                    secs = run_certkit(method, raw, out, a.epochs, amp, a, certkit_env)
                kept = timed(secs, a.epochs, f"{side} {method}")
                per_round[method].setdefault(side, []).append(fmean(kept) / images)
                print(
                    f"round {r + 1}/{a.rounds} {method} {side}: epochs " + " ".join(f"{s:.3g}" for s in secs) + " s",
                    file=sys.stderr,
                    flush=True,
                )
    return per_round


def round_spread(mine: list[float], official: list[float]) -> str:
    """``; rounds LO–HI``: the lowest and highest ratio of single rounds (each round's two runs follow each
    other, so this is how far the load of the moment moves the ratio), or nothing for one round."""
    if len(mine) < 2:
        return ""
    ratios = [m / o for m, o in zip(mine, official)]
    return f"; rounds {min(ratios):.3f}–{max(ratios):.3f}"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    print(
        f"device {a.device}, certkit --compile {a.compile} --amp {','.join(a.amp)}, {a.threads} thread(s) each side, "
        f"{a.batches} batches of {BATCH} per epoch, "
        f"{a.epochs} epochs per run ({a.epochs - 1} timed), {a.rounds} round(s); the official code in fp32 "
        f"with --workers {a.official_workers} (its default: 4)"
        + (", with certkit's malloc setting" if a.official_keep_freed_memory else ""),
        flush=True,
    )
    rates = in_scratch(a.keep, "vs_official", lambda scratch: measure(a, scratch))
    worst: dict[str, tuple[float, str]] = {}
    for m, r in rates.items():
        for amp in a.amp:
            suffix = "" if amp == "off" else f"_{amp}"
            mine, official = fmean(r[f"certkit {amp}"]), fmean(r["official"])
            ratio = mine / official
            worst[amp] = max(worst.get(amp, (0.0, "")), (ratio, m))
            print(
                f"train_ratio_{m}{suffix}: {ratio:.3f}  (certkit --amp {amp} {mine * 1e3:.3f} ms/image, "
                f"official {official * 1e3:.3f} ms/image{round_spread(r[f'certkit {amp}'], r['official'])})"
            )
            if f"floor {amp}" in r:
                floor = fmean(r[f"floor {amp}"])
                print(
                    f"floor_ratio_{m}{suffix}: {floor / official:.3f}  (bare loop {floor * 1e3:.3f} ms/image; "
                    f"certkit / bare loop {mine / floor:.3f})"
                )
    figures = ", ".join(f"{ratio:.3f} --amp {amp} ({m})" for amp, (ratio, m) in worst.items())
    print(f"vs_official: {figures} (worst train_ratio; certkit s/image / official s/image, lower is better)")


if __name__ == "__main__":
    main()
