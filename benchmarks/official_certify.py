"""The official ``certify.py`` run on a certkit model, against ``certkit certify`` on the same images.

``certkit export RUN --format reference`` claims the reference repositories' certifier reads its file. This
script checks the claim end to end: it exports a certkit run, runs the official ``code/certify.py`` of
``../shared/peer-code/smoothmix`` (jh-jeong/smoothmix; Cohen et al.'s certifier, ``third_party/core.py``)
on the exported file, runs ``certkit certify`` on the run itself with the same ``n0``/``N``/``alpha``/sigma
over the same first K test images, and compares the two result files row by row.

The official code is only *run*, from a scratch copy of its ``code/`` folder; its files stay byte for byte
as published and nothing of it is imported here. Both sides read the same truncated IDX files under
``<scratch>/official/dataset_cache/MNIST/raw`` (the first K test images, and one training image because
torchvision's MNIST class insists the training files exist), built by ``vs_official.write_subset``; the
official side reads them through torchvision's ``MNIST`` class (Fashion-MNIST is the ``mnist`` dataset
there), certkit through ``--data-dir``.

Running the official code on CPU. It calls ``.cuda()`` and draws its noise with ``device='cuda'``, so a
``sitecustomize.py`` put first on its ``PYTHONPATH`` (``SHIM`` below; CUDA is also hidden from it) changes
exactly this, at interpreter start-up:

- ``torch.Tensor.cuda`` and ``torch.nn.Module.cuda`` return the object itself (it stays on the CPU);
- ``torch.randn_like`` with a CUDA ``device=`` argument draws on the CPU instead (nothing else in the call
  changes; ``core.py``'s only device-naming call);
- ``torch.load`` defaults to ``weights_only=True`` (torch's own default since 2.6; the shim makes an older
  torch behave the same), so the official load itself shows that the export needs no unpickling of code;
- ``scipy.stats.binom_test``, removed in SciPy 1.12 but imported at the top of ``core.py`` (only its
  ``predict`` uses it, never ``certify``), is supplied as ``scipy.stats.binomtest(...).pvalue`` when
  missing.

Independent noise on each side means the two files are not equal: predictions must agree on at least 95%
of the rows (the script exits with status 1 otherwise), and the radii of the rows that predict the same
class differ by the sampling noise of the lower bound, plus the printing: the official file rounds the
radius to nearest at three significant digits (``{:.3}``), certkit floors it at six.

Requirements: ``statsmodels``, which the official ``core.py`` imports for its Clopper-Pearson bound (not a
certkit dependency; ``pip install statsmodels``).

    PYTHONPATH=. python benchmarks/official_certify.py --run RUN [--images 20] [--N 10000] [--n0 100]
                    [--alpha 0.001] [--threads 1] [--peer-code DIR] [--keep DIR]

Last line: ``official_certify: <agreement> prediction agreement, mean |dradius| <x> (the <S> rows predicting
the same class) over K images (N=...)``: the agreement is over all K rows, the radius difference over the S
rows where both sides predict the same class (not abstain). Relative paths are resolved against the
directory the script is started in.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from vs_official import PEER_CODE, child_env, in_scratch, official_copy, run

from certkit.checkpoint import read_meta
from certkit.errors import CertkitError
from certkit.results import Results, read_results

#: the least share of rows on which the two sides' predictions must agree
MIN_AGREEMENT = 0.95
SHIM = '''\
"""Lets the official certify.py run on CPU, unmodified (see benchmarks/official_certify.py)."""
import torch


def _stay(self, *args, **kwargs):
    return self


torch.Tensor.cuda = _stay
torch.nn.Module.cuda = _stay

_randn_like = torch.randn_like


def _randn_like_on_cpu(input, *args, device=None, **kwargs):
    if device is not None and torch.device(device).type == "cuda":
        device = "cpu"
    return _randn_like(input, *args, device=device, **kwargs)


torch.randn_like = _randn_like_on_cpu

_load = torch.load


def _load_weights_only(*args, weights_only=True, **kwargs):
    return _load(*args, weights_only=weights_only, **kwargs)


torch.load = _load_weights_only

import scipy.stats

if not hasattr(scipy.stats, "binom_test"):

    def binom_test(x, n=None, p=0.5, alternative="two-sided"):
        return scipy.stats.binomtest(x, n, p, alternative=alternative).pvalue

    scipy.stats.binom_test = binom_test
'''


def write_shim(folder: Path) -> Path:
    """Write ``SHIM`` as ``folder/sitecustomize.py``; put ``folder`` first on the official side's PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sitecustomize.py"
    path.write_text(SHIM)
    return path


@dataclass(frozen=True)
class Comparison:
    """Two CERTIFY files of the same images, row by row (abstain is predict -1 and not a class)."""

    rows: int
    #: rows with the same prediction (abstaining on both sides counts as agreeing)
    agree: int
    #: rows where both sides predict the same class (not abstain): the rows whose radii are compared
    same_class: int
    #: mean |certkit radius - official radius| over ``same_class`` rows (NaN when there are none)
    mean_abs_dradius: float
    #: mean and largest certkit radius - official radius over ``same_class`` rows (NaN when none)
    mean_dradius: float
    max_dradius: float
    #: ``same_class`` rows where certkit's radius is the larger
    certkit_above: int
    abstain_official: int
    abstain_certkit: int

    @property
    def agreement(self) -> float:
        return self.agree / self.rows


def compare(official: Results, certkit: Results) -> Comparison:
    """Compare two CERTIFY files that must hold the same indices with the same labels."""
    for r in (official, certkit):
        if r.kind != "certify" or r.radius is None:
            raise CertkitError(f"{r.path}: a PREDICT file; expected CERTIFY rows with radii")
        if len(r) == 0:
            raise CertkitError(f"{r.path}: holds no rows")
    a, b = np.argsort(official.idx), np.argsort(certkit.idx)
    if not np.array_equal(official.idx[a], certkit.idx[b]):
        raise CertkitError(
            f"{official.path} and {certkit.path} hold different images "
            f"(indices {sorted(set(official.idx.tolist()) ^ set(certkit.idx.tolist()))[:10]} are in only one)"
        )
    if not np.array_equal(official.label[a], certkit.label[b]):
        bad = official.idx[a][official.label[a] != certkit.label[b]]
        raise CertkitError(f"{official.path} and {certkit.path} disagree on the labels of indices {bad[:10].tolist()}")
    assert official.radius is not None and certkit.radius is not None
    p_off, p_ck = official.predict[a], certkit.predict[b]
    same = (p_off == p_ck) & (p_off >= 0)
    diff = certkit.radius[b][same] - official.radius[a][same]
    nan = float("nan")
    return Comparison(
        rows=len(p_off),
        agree=int((p_off == p_ck).sum()),
        same_class=int(same.sum()),
        mean_abs_dradius=float(np.abs(diff).mean()) if diff.size else nan,
        mean_dradius=float(diff.mean()) if diff.size else nan,
        max_dradius=float(diff.max()) if diff.size else nan,
        certkit_above=int((diff > 0).sum()),
        abstain_official=int((p_off < 0).sum()),
        abstain_certkit=int((p_ck < 0).sum()),
    )


def require_statsmodels() -> None:
    if importlib.util.find_spec("statsmodels") is None:
        raise CertkitError(
            "the official certify.py needs the statsmodels package, which is not installed "
            f"({sys.executable} -m pip install statsmodels)"
        )


def export(run_dir: Path, out: Path, env: dict[str, str]) -> None:
    """``certkit export --format reference``, then load the file the way certkit would load anything:
    ``weights_only=True``, so no pickled code runs."""
    cmd = [sys.executable, "-m", "certkit", "export", str(run_dir), "--format", "reference", "--out", str(out)]
    run(cmd, out.parent, env, "certkit export")
    try:
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CertkitError(f"{out}: the export does not load with torch.load(weights_only=True): {e}") from None
    print(
        f"export: {out.name} ({out.stat().st_size} bytes; arch {ckpt['arch']!r}, epoch {ckpt['epoch']}, "
        f"{len(ckpt['state_dict'])} tensors) loads with torch.load(weights_only=True)",
        flush=True,
    )


def measure(a: argparse.Namespace, scratch: Path) -> Comparison:
    require_statsmodels()
    meta = read_meta(a.run)
    if meta.get("dataset") != "fashion-mnist":
        raise CertkitError(f"{a.run}: a {meta.get('dataset')} run; this check reads Fashion-MNIST only")
    sigma = float(meta["sigma"])
    code, raw = official_copy(a.peer_code, "certify.py", scratch, a.source, 1, a.images)
    shim = scratch / "shim"
    write_shim(shim)
    certkit_env = child_env(a.threads, "cpu", None)
    checkpoint = scratch / "checkpoint.pth.tar"
    export(a.run, checkpoint, certkit_env)

    samples = ["--N0", str(a.n0), "--N", str(a.N), "--alpha", repr(a.alpha), "--max", str(a.images)]
    official_tsv = scratch / "official.tsv"
    cmd = [sys.executable, "certify.py", "mnist", str(checkpoint), repr(sigma), str(official_tsv), *samples]
    run(cmd, code, child_env(a.threads, "cpu", str(shim)), "official certify.py")
    certkit_tsv = scratch / "certkit.tsv"
    cmd = [sys.executable, "-m", "certkit", "certify", str(a.run), "--data-dir", str(raw), "--device", "cpu"]
    cmd += ["--sigma", repr(sigma), *samples, "--out", str(certkit_tsv)]
    run(cmd, scratch, certkit_env, "certkit certify")
    official, certkit = read_results(official_tsv), read_results(certkit_tsv)
    print(f"sigma {sigma}; official certify.py: {len(official)} rows, certkit certify: {len(certkit)} rows", flush=True)
    for row in zip(official.idx, official.label, official.predict, official.radius, certkit.predict, certkit.radius):
        print("idx {} label {}: official {} r {} | certkit {} r {}".format(*row), file=sys.stderr)
    return compare(official, certkit)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="certkit run folder (model.safetensors + model.json)")
    p.add_argument("--peer-code", type=Path, default=PEER_CODE, help="the official repository (its code/ is run)")
    p.add_argument("--images", type=int, default=20, help="K: the first K test images")
    p.add_argument("--N", type=int, default=10000, help="estimation samples")
    p.add_argument("--n0", type=int, default=100, help="selection samples")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of each side")
    p.add_argument("--source", type=Path, default=None, help="Fashion-MNIST IDX folder (default: certkit's)")
    p.add_argument("--keep", type=Path, default=None, help="keep the scratch folder (export, data, results) here")
    a = p.parse_args(argv)
    if a.images < 1 or a.N < 1 or a.n0 < 1 or a.threads < 1 or not 0 < a.alpha < 1:
        p.error("--images, --N, --n0 and --threads must be >= 1 and --alpha in (0, 1)")
    # the subprocesses run in the scratch folder: the paths they are handed must not depend on where we started
    for name in ("run", "peer_code", "source", "keep"):
        if getattr(a, name) is not None:
            setattr(a, name, getattr(a, name).resolve())
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    c = in_scratch(a.keep, "official_certify", lambda scratch: measure(a, scratch))
    print(
        f"abstain: official {c.abstain_official}, certkit {c.abstain_certkit} of {c.rows}; "
        f"same class on {c.same_class} rows"
    )
    print(
        f"radius certkit - official over those rows (official rounds to nearest at 3 significant digits, "
        f"certkit floors at 6): mean {c.mean_dradius:+.5f}, max {c.max_dradius:+.5f}; "
        f"certkit larger on {c.certkit_above} of {c.same_class}"
    )
    print(
        f"official_certify: {c.agreement:.1%} prediction agreement, mean |dradius| {c.mean_abs_dradius:.5f} "
        f"(the {c.same_class} rows predicting the same class) over {c.rows} images (N={a.N})"
    )
    if c.agreement < MIN_AGREEMENT:
        print(f"official_certify: FAILED: predictions agree on fewer than {MIN_AGREEMENT:.0%} of rows", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
