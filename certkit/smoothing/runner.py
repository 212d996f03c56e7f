"""Certify (or predict) a dataset with a smoothed classifier, writing the standard result file.

This is what ``certkit certify`` and ``certkit predict`` run. It follows the reference ``certify.py``
(indices 0, skip, 2*skip, ... below ``max``; one flushed row per image) and adds what long runs need:

* several inputs per forward batch (:meth:`Smooth.certify_batch`), which is where the speed on small
  ``n`` comes from;
* resume: indices already in the output file are skipped (settings must match, see
  :class:`~certkit.results.ResultWriter`);
* shards ``i/k`` that interleave the index list and can be merged with :func:`merge_results`;
* per-input noise seeded from ``(seed, idx)``, so the rows do not depend on batch size, inputs per batch,
  shard count or resume point;
* optional shared noise (``shared_noise=G``): G consecutive planned indices vote on one noise stream
  seeded from ``(seed, group)``, the group fixed by the index alone, so rows still do not depend on
  sharding or resume;
* optional adaptive sampling (:class:`~certkit.smoothing.statistics.AdaptiveSchedule`), with a ``samples``
  column.

It takes objects: a :class:`~certkit.smoothing.smooth.Smooth` (which knows sigma, the classes, its speed
options and its sampler), any torch ``Dataset`` whose items are ``(image, label)`` with the image a float
tensor (C, H, W) in [0, 1], and a :class:`RunPlan`. :func:`run_planned`, the loop over planned indices with
resume and progress, is shared with GloRo certification (:mod:`certkit.gloro.certify`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from certkit.data import check_fit, check_pixels, class_label
from certkit.errors import CertkitError
from certkit.fileio import check_output
from certkit.progress import Progress, interval_from_env, log
from certkit.report import floor_figure
from certkit.results import ResultWriter, planned_indices, refuse_foreign_companions, shared_noise_group
from certkit.smoothing.samplers import NOISE_BLOCK, NOISE_STREAMS, Generators
from certkit.smoothing.smooth import Smooth
from certkit.smoothing.statistics import (
    AdaptiveSchedule,
    check_batch_size,
    check_certify_args,
    check_predict_args,
    check_seed,
)
from certkit.smoothing.voter import MIN_VOTE_AGREEMENT, NonFiniteLogits
from certkit.summary import write_summary

#: most noisy copies per forward pass: a million 224x224 colour copies are already 600 GB of float32
MAX_BATCH = 10**6


class Dataset(Protocol):
    """What the runner reads: ``len(dataset)`` and ``dataset[i] -> (image (C, H, W) in [0, 1], label)``."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[Tensor, int]: ...


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state (names, shapes, dtypes, values): ties a result file to the weights that
    produced it, so resuming with other weights is refused."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: the most inputs sampled together by default (:func:`default_inputs_per_batch`)
MAX_INPUTS_PER_BATCH = 64


def default_inputs_per_batch(batch_size: int, n0: int) -> int:
    """Enough inputs that their n0 selection copies fill a forward batch (at most MAX_INPUTS_PER_BATCH): with
    the usual n = 100,000 the estimation batches are full anyway, with small n this is where the speed comes
    from."""
    return max(1, min(MAX_INPUTS_PER_BATCH, batch_size // max(1, n0)))


@dataclass(frozen=True)
class RunPlan:
    """Which indices a dataset run visits and how each is sampled; every value is checked here, once.

    ``mode`` is ``"certify"`` (CERTIFY with ``n0`` selection and ``n`` estimation samples, optionally
    ``adaptive``) or ``"predict"`` (PREDICT with ``n`` samples). Indices 0, ``skip``, 2*``skip``, ... below
    ``max_idx`` (-1: all), of which shard ``(i, k)`` keeps every k-th from the i-th. ``seed`` seeds the noise
    of each input from ``(seed, idx)``. ``batch_size`` bounds the noisy copies per forward pass;
    ``inputs_per_batch`` (default: :func:`default_inputs_per_batch`, or the shared-noise group) is how many
    inputs are sampled together. Neither changes a row.
    """

    mode: str = "certify"
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch_size: int = 1000
    skip: int = 1
    max_idx: int = -1
    shard: tuple[int, int] | None = None
    seed: int = 0
    adaptive: AdaptiveSchedule | None = None
    inputs_per_batch: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("certify", "predict"):
            raise CertkitError(f"mode must be 'certify' or 'predict' (got {self.mode!r})")
        if self.mode == "certify":
            check_certify_args(self.n0, self.n, self.alpha)
        else:
            check_predict_args(self.n, self.alpha)
            if self.adaptive is not None:
                raise CertkitError("adaptive sampling applies to certify only")
        check_batch_size(self.batch_size)
        check_seed(self.seed)
        if self.inputs_per_batch is not None and self.inputs_per_batch < 1:
            raise CertkitError(f"inputs per batch must be >= 1 (got {self.inputs_per_batch})")
        self.indices(0)  # refuses a bad skip or shard before any work

    def indices(self, dataset_size: int) -> list[int]:
        """The dataset indices this plan visits, in order."""
        return planned_indices(dataset_size, self.skip, self.max_idx, self.shard)

    def group_size(self, shared_noise: int) -> int:
        """Inputs sampled together: as asked, else one shared-noise group, else enough to fill a batch."""
        samples = self.n0 if self.mode == "certify" else self.n
        return self.inputs_per_batch or shared_noise or default_inputs_per_batch(self.batch_size, samples)

    def settings(self) -> dict[str, Any]:
        """What of the plan changes the rows. Batch size and inputs per batch do not (noise is per input and
        drawn in blocks), except below NOISE_BLOCK, hence the effective block."""
        settings: dict[str, Any] = {
            "mode": self.mode,
            "n": self.n,
            "alpha": self.alpha,
            "seed": self.seed,
            "noise_block": min(NOISE_BLOCK, self.batch_size),
        }
        if self.mode == "certify":
            settings["n0"] = self.n0
            settings["adaptive"] = self.adaptive.as_dict() if self.adaptive is not None else None
        return settings


def run_settings(
    smoothed: Smooth, dataset: Dataset, plan: RunPlan, settings_extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The settings :func:`certify_dataset` records in the result file's sidecar, which a resumed run must
    match: the plan's, sigma, which rows of which images by which weights, the noise mode, and ``settings_extra``."""
    settings: dict[str, Any] = {
        **plan.settings(),
        "sigma": smoothed.sigma,
        **plan_settings(smoothed.model, dataset, plan.skip, plan.max_idx, plan.shard),
    }
    if smoothed.shared_noise:
        settings["shared_noise"] = smoothed.shared_noise
    if smoothed.sampler.rng != "torch":  # recorded only when not the default, so older files still resume
        settings["rng"] = smoothed.sampler.rng
    # how the noise streams are seeded, and how the network is run (a row certifies the network as run:
    # resumed with other speed options, one file would hold certificates of two classifiers)
    settings["noise_streams"] = NOISE_STREAMS
    settings["speed_options"] = smoothed.sampler.speed_options
    settings.update(dict(settings_extra or {}))
    return settings


def certify_dataset(
    smoothed: Smooth,
    dataset: Dataset,
    plan: RunPlan = RunPlan(),
    *,
    out: str | Path,
    progress: bool = True,
    resume: bool = True,
    settings_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Certify (``plan.mode == "certify"``) or predict every planned index of ``dataset`` with ``smoothed``.

    ``dataset[i]`` gives ``(image, label)``: a float tensor (C, H, W) in [0, 1] and an int (any torch
    ``Dataset``). Writes ``out`` (TSV, one flushed row per image, time = that image's wall-clock share of its
    group, split in proportion to the samples each input used), its settings sidecar (with
    ``settings_extra``), and once every planned index is done, the summary beside it (returned). Returns
    None if the run ended incomplete. The summary's ``certified_accuracy`` maps each radius, as a string (the
    JSON file's keys), to a fraction. ``resume`` continues a file with the same settings.

    When ``smoothed`` runs with a speed option (channels-last, amp, compile, the shared-noise stem split), a
    vote check runs first (:func:`_speed_check`), and the run is refused if the network does not vote as the
    fp32 model does. The agreement is recorded in the summary under ``speed_check``.

    With shared noise (``smoothed.shared_noise`` = G) each run of G consecutive planned indices (positions
    ``p // G`` in the unsharded plan) votes on one noise stream; every certificate keeps its guarantee, but
    the certificates of a group are not independent of each other.
    """
    if not isinstance(plan, RunPlan):
        raise CertkitError(f"plan must be a certkit.RunPlan, not a {type(plan).__name__}")
    if isinstance(dataset, DataLoader) or not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise CertkitError(
            f"certify_dataset reads dataset[i] -> (image, label), which a {type(dataset).__name__} does not "
            "offer (for a DataLoader, pass loader.dataset)"
        )
    check_output(out, "--out")  # a FIFO or a missing folder would fail only after all the set-up
    refuse_foreign_companions(out)  # before the dataset's hash and the speed check, not when the file opens
    interval_from_env()  # a bad CERTKIT_PROGRESS_SECONDS is refused here, not once the result file is open
    indices = plan.indices(len(dataset))
    if indices:  # a model that does not fit the images fails here, before the result file is opened
        image, label = _image(dataset, indices[0])
        check_fit(
            smoothed.model, {}, image.to(smoothed.device), label, smoothed.num_classes, f"dataset item {indices[0]}"
        )
    shared_noise = smoothed.shared_noise
    settings = run_settings(smoothed, dataset, plan, settings_extra)
    speed_check = _speed_check(smoothed, dataset, indices, plan.batch_size, plan.seed)
    score = _RunningScore()

    sampler = smoothed.sampler

    def noise_groups(group: list[int]) -> list[tuple[list[int], Generators]]:
        """(positions in ``group``, their noise streams): one per input, or one per shared-noise group."""
        if not shared_noise:
            return [(list(range(len(group))), [sampler.input_stream(plan.seed, idx) for idx in group])]
        keys: dict[int, list[int]] = {}
        for pos, idx in enumerate(group):
            keys.setdefault(shared_noise_group(idx, plan.skip, shared_noise), []).append(pos)
        return [(pos, [sampler.group_stream(plan.seed, key)]) for key, pos in keys.items()]

    def sample(xs: Tensor, generators: Generators) -> list[Any]:
        if plan.mode == "certify":
            return smoothed.certify_batch(xs, plan.n0, plan.n, plan.alpha, plan.batch_size, generators, plan.adaptive)
        return smoothed.predict_batch(xs, plan.n, plan.alpha, plan.batch_size, generators)

    def first_nonfinite(group: list[int], xs: Tensor) -> int:
        """The first input of ``group`` whose noisy copies give NaN/inf logits, found by sampling each alone
        on its own noise (the same draws as in the group): only run once a group has failed."""
        for pos, idx in enumerate(group):
            try:
                sample(xs[pos : pos + 1], noise_groups([idx])[0][1])
            except NonFiniteLogits:
                return idx
        return group[0]

    # the radii proved in this session, before the file floors them: the summary computes from these
    proved: dict[int, float] = {}

    def process(writer: ResultWriter, group: list[int], xs: Tensor, labels: list[int]) -> str:
        try:
            return sample_and_write(writer, group, xs, labels)
        except NonFiniteLogits:
            raise CertkitError(
                f"the model returned NaN or inf logits on noisy copies of input {first_nonfinite(group, xs)}; "
                "certify only a network with finite outputs"
            ) from None

    def sample_and_write(writer: ResultWriter, group: list[int], xs: Tensor, labels: list[int]) -> str:
        for positions, generators in noise_groups(group):
            members = [group[p] for p in positions]
            member_labels = [labels[p] for p in positions]
            began = time.perf_counter()
            if plan.mode == "certify":
                certificates = sample(xs[positions], generators)
                elapsed = time.perf_counter() - began
                total_samples = sum(c.samples for c in certificates)
                for idx, label, cert in zip(members, member_labels, certificates):
                    seconds = elapsed * cert.samples / total_samples
                    extra = {"samples": cert.samples} if plan.adaptive is not None else {}
                    writer.write_certify(idx, label, cert.prediction, cert.radius, seconds, **extra)
                    proved[idx] = cert.radius
                    score.add(cert.prediction == label, cert.radius)
            else:
                predictions = sample(xs[positions], generators)
                elapsed = time.perf_counter() - began
                for idx, label, prediction in zip(members, member_labels, predictions):
                    writer.write_predict(idx, label, prediction, elapsed / len(members))
                    score.add(prediction == label, 0.0)
        return score.describe(plan.mode)

    complete = run_planned(
        out,
        plan.mode,
        settings,
        dataset,
        indices,
        plan.group_size(shared_noise),
        process,
        resume=resume,
        progress=progress,
        extra_columns=("samples",) if plan.adaptive is not None else (),
        kept=lambda rows: score.add_rows(rows, plan.mode),
    )
    if not complete:
        return None
    return write_summary(out, settings, extra={"speed_check": speed_check} if speed_check else None, exact_radii=proved)


#: inputs and noisy copies per input of the speed-option vote check (see :func:`_speed_check`)
CHECK_INPUTS = 8
CHECK_COPIES = 2000


def _speed_check(
    smoothed: Smooth, dataset: Dataset, indices: Sequence[int], batch_size: int, seed: int
) -> dict[str, Any] | None:
    """With a speed option on, check on a sample that the network votes as the plain fp32 model does.

    ``CHECK_COPIES`` noisy copies of each of the first ``CHECK_INPUTS`` planned inputs, drawn from the check's
    own stream (:func:`~certkit.smoothing.samplers.check_generator`), go through both; the run is refused if at
    any of them fewer than :data:`~certkit.smoothing.voter.MIN_VOTE_AGREEMENT` of the votes agree. Power: a
    speed option that moves an input's vote probability by 2% disagrees on at least 2% of its copies, and a
    Binomial(2000, 0.02) count is <= 20 (1%) with probability 3e-4, so that change is caught with probability >
    0.999; a faithful option that flips 0.2% of votes (rounding near the decision boundary) exceeds 20 with
    probability 2e-9 per input. About 32,000 forward passes. When the run goes on, the summary's ``speed_check``
    records the agreement and says that the certificates are about the classifier as run with these options.
    """
    options = {k: v for k, v in smoothed.speed_options.items() if v}
    if not options or not indices:
        return None
    probe = list(indices[:CHECK_INPUTS])
    xs, _ = _load(dataset, probe)
    agreement = smoothed.sampler.vote_agreement(xs, num=CHECK_COPIES, seed=seed, batch_size=batch_size)
    worst = int(agreement.argmin())
    if agreement[worst] < MIN_VOTE_AGREEMENT:
        raise CertkitError(
            f"with {options} only {agreement[worst]:.2%} of noisy votes at index {probe[worst]} equal the fp32 votes "
            f"(needs {MIN_VOTE_AGREEMENT:.0%}); certify without these options"
        )
    return {
        "options": options,
        "vote_agreement": float(agreement.mean()),
        "min_input_agreement": float(agreement[worst]),
        "inputs": probe,
        "copies_per_input": CHECK_COPIES,
        "certifies": "the network as run with these options, whose votes matched the fp32 votes on the copies checked",
    }


def plan_settings(
    model: nn.Module, dataset: Dataset, skip: int, max_idx: int, shard: tuple[int, int] | None
) -> dict[str, Any]:
    """The settings every result file records about *which* rows it holds, *which images* they are of and
    *which weights* made them."""
    return {
        "skip": skip,
        "max": max_idx,
        "shard": list(shard) if shard is not None else None,
        "dataset_size": len(dataset),
        **dataset_identity(dataset),
        "model_sha256": model_fingerprint(model),
    }


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """Name, split (when the dataset knows them) and sha256 of the dataset's images and labels.

    Resuming with another test set of the same size would otherwise append rows about other images. The
    hash covers the whole dataset, not only the planned indices, so it is the same for every shard and
    every ``--max`` (shards still merge, a run still grows). Held arrays are hashed as stored (uint8, tens of
    MB at most); image folders by file name, size and label, not by decoding every image. Any other dataset is
    hashed image by image, and each image is checked as certification checks it (:func:`_image`): this runs
    before the result file is opened, so a NaN/inf image anywhere is refused with nothing written. Held
    arrays and decoded image files cannot hold one (uint8, and pixels in [0, 1]).
    """
    from certkit.data import ArrayDataset, FolderDataset
    from certkit.fileio import require_regular

    h = hashlib.sha256()
    identity: dict[str, Any] = {}
    # exactly these classes: a subclass may return other items than the arrays or files hashed here, so it
    # is read item by item like any other dataset (and its images checked)
    if type(dataset) is ArrayDataset or type(dataset) is FolderDataset:
        identity = {"dataset": dataset.info.name, "split": dataset.split}
    if type(dataset) is ArrayDataset:
        for t in (dataset.images, dataset.labels):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(t.numpy())  # type: ignore[arg-type]  # numpy's stubs declare the buffer protocol only for Python >= 3.12
    elif type(dataset) is FolderDataset:
        for path, label in dataset._folder.samples[: len(dataset)]:  # type: ignore[attr-defined]
            # a FIFO would block the image reader for ever; a symlink loop or a dangling link has no size
            require_regular(path, "image")
            try:
                size = os.path.getsize(path)
            except OSError as e:
                raise CertkitError(f"{path}: cannot read it ({e.strerror or e})") from None
            h.update(f"{Path(path).relative_to(dataset.root)}|{size}|{label}\n".encode())
    else:
        for i in range(len(dataset)):
            x, label = _image(dataset, i)
            h.update(x.detach().to("cpu").contiguous().numpy())  # type: ignore[arg-type]  # as above
            h.update(f"|{label}\n".encode())
    identity["dataset_sha256"] = h.hexdigest()
    return identity


#: ``process(writer, indices, images, labels)`` writes one row per index and returns a progress-bar note
ProcessGroup = Callable[[ResultWriter, list[int], Tensor, list[int]], str]


def run_planned(
    out: str | Path,
    kind: str,
    settings: Mapping[str, Any],
    dataset: Dataset,
    indices: Sequence[int],
    group_size: int,
    process: ProcessGroup,
    *,
    resume: bool = True,
    progress: bool = True,
    extra_columns: Sequence[str] = (),
    kept: Callable[[list[dict[str, str]]], str] | None = None,
) -> bool:
    """The loop every dataset certifier shares (smoothing here, GloRo in :mod:`certkit.gloro.certify`).

    Opens ``out`` through :class:`ResultWriter` (sidecar, resume with matching settings), skips the indices
    already written, loads the rest ``group_size`` at a time and hands each group to ``process``, with a
    progress bar on a terminal and a log line every 30 s elsewhere (:class:`~certkit.progress.Progress`).
    A resumed file is announced, and its rows go to ``kept`` first, which starts the running score from them
    and returns the progress note (the score's figures then cover every row the count does).
    Returns True when every planned index is in the file.
    """
    with ResultWriter(out, kind, settings, resume=resume, extra_columns=extra_columns) as writer:
        todo = [i for i in indices if i not in writer.done_indices]
        done = len(indices) - len(todo)
        if done and progress:
            log.info(f"resuming {out}: {done:,} of {len(indices):,} rows done")
        with Progress(len(indices), f"{kind} {Path(out).name}", done=done, enabled=progress) as bar:
            if writer.kept_rows and kept is not None:
                bar.note(kept(writer.kept_rows))
            for start in range(0, len(todo), group_size):
                group = todo[start : start + group_size]
                xs, labels = _load(dataset, group)
                bar.update(len(group), process(writer, group, xs, labels))
        return all(i in writer.done_indices for i in indices)


def _image(dataset: Dataset, idx: int) -> tuple[Tensor, int]:
    """Item ``idx`` as (float32 image, label), refused unless the image is a finite (C, H, W) tensor in the
    precision certification computes in (a float64 1e300 becomes inf there): the hash pass
    (:func:`dataset_identity`) and every load before sampling check alike."""
    x, label = dataset[idx]
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise CertkitError(f"dataset item {idx}: expected an image tensor (C, H, W)")
    check_pixels(x, f"dataset item {idx}")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise CertkitError(f"dataset item {idx} contains NaN or inf values")
    return x, class_label(label, f"dataset item {idx}")


def _load(dataset: Dataset, group: Sequence[int]) -> tuple[Tensor, list[int]]:
    """The images of ``group`` stacked, and their labels, checked again: a dataset need not return on this
    read what :func:`dataset_identity` read."""
    items = [_image(dataset, idx) for idx in group]
    return torch.stack([x for x, _ in items]), [label for _, label in items]


class _RunningScore:
    """Running accuracy and ACR of the rows in the file (a resumed file's own rows first), for the progress bar."""

    def __init__(self) -> None:
        self.count = 0
        self.correct = 0
        self.radius_sum = 0.0

    def add(self, correct: bool, radius: float) -> None:
        self.count += 1
        self.correct += int(correct)
        self.radius_sum += radius if correct else 0.0

    def add_rows(self, rows: list[dict[str, str]], mode: str) -> str:
        """Count the rows a resumed file holds (their radii as the file floored them); the progress note."""
        for row in rows:
            self.add(row["correct"] == "1", float(row.get("radius", 0.0)))
        return self.describe(mode)

    def describe(self, mode: str) -> str:
        """Rounded down, as every certified figure certkit prints."""
        acc = floor_figure(Fraction(self.correct, max(1, self.count)))
        if mode == "predict":
            return f"acc={acc}"
        return f"acc={acc} acr={floor_figure(self.radius_sum / max(1, self.count))}"
