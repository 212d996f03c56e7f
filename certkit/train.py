"""One training loop for every method: the objective is the only thing that changes.

The :class:`Trainer` takes a model, a dataset and an :class:`~certkit.objectives.base.Objective`, and owns
what every method shares: the optimizer and LR schedule, chunking (one optimizer step per chunk), the
per-epoch test, the metrics file, checkpoints, resumption and the **cost ledger**.

Reproducibility: at the start of every epoch torch's RNG (noise) and the data-order generator are
re-seeded from ``(seed, epoch)``, so a run resumed from epoch ``e`` is bit-for-bit the uninterrupted run on
CPU, and two runs with the same seed see the same data order.

Cost ledger: hooks on the model count every image that goes through a forward pass and every image whose
output a backward pass flows through (attack input-gradients included), per epoch, beside the wall-clock
seconds of the training loop (per-epoch tests excluded, as the CRT reference logs it) and the device name.
Any two run directories can therefore be compared for training cost from their ``model.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from torch import Tensor, nn

from certkit import __version__, checkpoint
from certkit.data import as_training_data, check_fit, check_item, dataset_info, load_dataset
from certkit.distributed import barrier, sum_over_ranks
from certkit.errors import CertkitError, a_or_an, first_line
from certkit.fileio import (
    PidLock,
    atomic_write_bytes,
    atomic_write_text,
    check_output,
    remove_stale_temporaries,
    require_regular,
)
from certkit.methods import build_objective, get_objective
from certkit.models import create_model, list_models, model_spec
from certkit.objectives.base import DEFAULT_FAMILY, Objective, family_key, unwrap
from certkit.precision import autocast_dtype
from certkit.progress import Progress
from certkit.recipes import check_recipe, get_recipe
from certkit.stepgraph import PassCounter, StepRunner, cuda_graph
from certkit.trainlog import CSV, MetricLogs

STATE = checkpoint.RESUME_STATE
METRICS = "metrics.jsonl"


def setting(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] | None = None,
    choices: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
    cli: bool = True,
) -> Any:
    """A :class:`TrainConfig` field; the command line's flags (``flags``, else ``--name``) are made from it."""
    return field(default=default, metadata=dict(help=help, parse=parse, choices=choices, flags=flags, cli=cli))


#: learning-rate schedules; cosine, exp and half-exp depend on the total number of epochs
SCHEDULES = ("step", "multistep", "cosine", "exp", "half-exp", "constant")
COMPILE_MODES = ("auto", "graph", "on", "off")


def _milestones(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


#: settings that only some schedules (or, for momentum, optimizers) read
_READ_BY: dict[str, tuple[str, ...]] = {
    "lr_step": ("step",),
    "lr_step_lag": ("step",),
    "milestones": ("multistep",),
    "gamma": ("step", "multistep"),
    "lr_final": ("exp", "half-exp"),
    "momentum": ("sgd",),
}

#: a setting's declared type -> the values it takes (numpy's numbers too, never a bool for a number), so that
#: epochs="2" is one line here rather than a comparison error deep in the trainer
_SETTING_KINDS: dict[str, type] = {"int": numbers.Integral, "float": numbers.Real, "str": str, "bool": bool}
_KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False"}


@dataclass
class TrainConfig:
    """Optimisation settings, checked once when built. Defaults are the MNIST/Fashion-MNIST LeNet recipe of
    the RS literature; :meth:`for_method` gives the published recipe of a dataset family and method."""

    epochs: int = setting(90, "epochs")
    batch_size: int = setting(
        256, "loader batch (chunked methods take one optimizer step per chunk)", flags=("--batch-size", "--batch")
    )
    optimizer: str = setting("sgd", "optimizer", choices=("sgd", "adam"))
    lr: float = setting(0.01, "initial learning rate")
    momentum: float = setting(0.9, "SGD momentum (sgd optimizer only)")
    weight_decay: float = setting(1e-4, "weight decay")
    schedule: str = setting(
        "step",
        "LR schedule: step (x --lr-gamma every lr_step epochs, the first decay lr_step_lag epochs late), multistep "
        "(x --lr-gamma at milestones), cosine, "
        "exp (to lr_final), half-exp (constant for the first half, then exponential to lr_final: GloRo's ICML "
        "code, Leino et al. 2021), constant",
        choices=SCHEDULES,
    )
    lr_step: int = setting(30, "step schedule: epochs between x --lr-gamma decays")
    lr_step_lag: int = setting(
        0,
        "step schedule: epochs by which every decay comes late; 0 = torch's StepLR (Cohen et al.'s code); the "
        "family recipes set 1, as the RS codes whose published numbers they follow (smoothmix, smoothing-catrs: "
        "scheduler.step(epoch) after each epoch, so 31 epochs at the first rate)",
    )
    milestones: tuple[int, ...] = setting((), "multistep schedule: comma-separated epochs", parse=_milestones)
    # --lr-gamma: --gamma is MACER's
    gamma: float = setting(0.1, "step and multistep schedules: LR decay factor", flags=("--lr-gamma",))
    lr_final: float = setting(1e-6, "exp and half-exp schedules: final learning rate")
    seed: int = setting(0, "seed for weights, data order and noise (re-seeded per epoch)")
    test_batch_size: int = setting(1000, "batch of the per-epoch test")
    #: stop with an error when the loss is NaN/inf (diverged run, e.g. SmoothAdv with a large epsilon)
    check_finite: bool = setting(True, "stop when the loss is NaN/inf", cli=False)
    compile: str = setting(
        "auto",
        "how a training step runs: graph = the whole step (noise, attack, forward, backward, optimizer) "
        "captured as a CUDA graph and replayed; on = the model under torch.compile (inductor, CUDA graphs of "
        "the model alone on CUDA); off = eager; auto = graph on CUDA where the method allows it and the "
        "networks are certkit's (else on), off on CPU",
        choices=COMPILE_MODES,
    )
    channels_last: str = setting(
        "auto",
        "channels-last memory format for a model with 2-d convolutions: on, off, or auto = on",
        choices=("auto", "on", "off"),
    )
    amp: str = setting(
        "off",
        "bf16 autocast of the training step: on CUDA, and on CPUs with AVX512-BF16 or AMX (refused elsewhere)",
        choices=("off", "bf16"),
    )

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of setting ``name`` (``gamma`` is ``--lr-gamma``: ``--gamma`` is MACER's)."""
        flags = next(f.metadata["flags"] for f in dataclasses.fields(TrainConfig) if f.name == name)
        return flags[0] if flags else "--" + name.replace("_", "-")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind = _SETTING_KINDS.get(str(f.type))
            value = getattr(self, f.name)
            if kind is not None and not (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
                raise CertkitError(f"{self.flag(f.name)} must be {_KIND_NAMES[str(f.type)]} (got {value!r})")
        if not all(isinstance(m, numbers.Integral) for m in self.milestones):
            raise CertkitError(f"--milestones must be integers (got {self.milestones!r})")
        self.milestones = tuple(int(m) for m in self.milestones)
        for name in ("epochs", "batch_size", "lr_step", "test_batch_size"):
            if getattr(self, name) < 1:
                raise CertkitError(f"{self.flag(name)} must be >= 1 (got {getattr(self, name)})")
        if self.lr_step_lag < 0:
            raise CertkitError(f"--lr-step-lag must be >= 0 (got {self.lr_step_lag})")
        if not 0 < self.lr < math.inf:
            raise CertkitError(f"--lr must be a finite number > 0 (got {self.lr})")
        for name in ("momentum", "weight_decay", "gamma", "lr_final"):
            if not 0 <= getattr(self, name) < math.inf:
                raise CertkitError(f"{self.flag(name)} must be a finite number >= 0 (got {getattr(self, name)})")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed and the derived seeds take non-negative 63-bit seeds
            raise CertkitError(f"--seed must be an integer in 0..2^63-1 (got {self.seed})")
        if self.optimizer not in ("sgd", "adam"):
            raise CertkitError(f"unknown optimizer {self.optimizer!r}; valid: sgd, adam")
        if self.schedule not in SCHEDULES:
            raise CertkitError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.schedule == "multistep" and not self.milestones:
            raise CertkitError("--schedule multistep needs --milestones (the epochs after which the rate falls)")
        for name, valid in (
            ("compile", COMPILE_MODES),
            ("channels_last", ("auto", "on", "off")),
            ("amp", ("off", "bf16")),
        ):
            if getattr(self, name) not in valid:
                raise CertkitError(f"unknown {self.flag(name)} {getattr(self, name)!r}; valid: {', '.join(valid)}")

    @classmethod
    def for_method(
        cls, family: str, method: str | type[Objective], base: Mapping[str, Any] | None = None, **overrides: Any
    ) -> TrainConfig:
        """:func:`recipe`'s published values for ``family``/``method``, then a named recipe's ``base``, under
        the non-None ``overrides``. Milestones that come from the recipes move with an ``epochs`` override."""
        settings = {**recipe(family, method), **dict(base or {})}
        given = {k: v for k, v in overrides.items() if v is not None}
        if "milestones" in settings and "epochs" in given and "milestones" not in given:
            # published milestones sit at shares of the run (CRT: 50% and 75% of it), not at fixed epochs; never
            # at epoch 0, where the first epoch would already train at the decayed rate
            settings["milestones"] = tuple(
                max(1, m * given["epochs"] // settings["epochs"]) for m in settings["milestones"]
            )
        settings.update(given)
        unknown = set(settings) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise CertkitError(f"unknown training setting(s): {sorted(unknown)}")
        config = cls(**settings)
        config._refuse_unread(given)
        return config

    def _reader(self, name: str) -> tuple[str, str]:
        """What would read setting ``name`` (see :data:`_READ_BY`), and this configuration's choice of it."""
        return ("optimizer", self.optimizer) if name == "momentum" else ("schedule", self.schedule)

    def unused(self, name: str) -> bool:
        """Whether setting ``name`` is one that this configuration's schedule or optimizer never reads."""
        return name in _READ_BY and self._reader(name)[1] not in _READ_BY[name]

    def _refuse_unread(self, given: Mapping[str, Any]) -> None:
        """Refuse a setting given explicitly that this configuration's schedule or optimizer never reads
        (``--milestones`` under the step schedule, ``--momentum`` with Adam): it would be recorded in
        model.json as if it had shaped the run. Recipe values are exempt: a recipe sets every field."""
        for name, readers in _READ_BY.items():
            if name in given and self.unused(name):
                what, used = self._reader(name)
                raise CertkitError(
                    f"{self.flag(name)} applies to the {' and '.join(readers)} {what}{'s' * (len(readers) > 1)}; "
                    f"this run's {what} is {used} (choose one with {self.flag(what)}, or drop {self.flag(name)})"
                )


def half_exp_factor(epoch: int, epochs: int, ratio: float) -> float:
    """Learning-rate factor of the ``half-exp`` schedule at 0-based ``epoch``: 1 through epoch ``epochs // 2``,
    then geometric down to ``ratio`` (``lr_final / lr``) at the last epoch, the ICML GloRo runs' shape."""
    half = epochs // 2
    if epoch <= half:
        return 1.0
    return ratio ** ((epoch - half) / max(epochs - 1 - half, 1))


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present (the local rank's GPU under torchrun), else CPU. Any other name must
    be a device this machine has (cpu, cuda, cuda:N below the count, mps), so that a run never starts on
    a device torch rejects late (``meta`` has no data at all)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise CertkitError(f"--device {name}: unknown; use auto, cpu, cuda or cuda:N")
    if device.type == "mps" and not (torch.backends.mps.is_available()):
        raise CertkitError(f"--device {name}: this machine has no Apple MPS device; use auto or cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CertkitError(f"--device {name}: CUDA is not available on this machine; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise CertkitError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels, stable across processes and Python versions."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------------------
# Cost ledger
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CostLedger:
    """Training cost: wall-clock seconds and forward/backward image passes, per epoch and in total."""

    device: str = ""
    epochs: list[dict[str, Any]] = field(default_factory=list)
    #: cost of ancestors (a CRT teacher chain), kept apart from this run's own cost
    ancestors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(sum(e["seconds"] for e in self.epochs))

    def totals(self) -> dict[str, float]:
        keys = sorted({k for e in self.epochs for k in e if k not in ("epoch",)})
        return {k: float(sum(e.get(k, 0) for e in self.epochs)) for k in keys}

    def to_json(self) -> dict[str, Any]:
        epochs = len(self.epochs)
        return {
            "device": self.device,
            "epochs": self.epochs,
            "total": self.totals(),
            "seconds_per_epoch": self.seconds / epochs if epochs else 0.0,
            "ancestors": self.ancestors,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CostLedger:
        return cls(device=d.get("device", ""), epochs=list(d.get("epochs", [])), ancestors=list(d.get("ancestors", [])))


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------
class Trainer:
    """Train ``model`` on ``train_data`` by minimising ``objective``; evaluate on ``test_data`` each epoch.

    ``model`` is any ``nn.Module`` returning ``(N, K)`` logits for ``(N, C, H, W)`` images in [0, 1];
    ``train_data``/``test_data`` are certkit datasets or your own torch ``Dataset`` (items: float image
    ``(C, H, W)`` in [0, 1], int label) or ``DataLoader``. Before any work, one training image goes through
    the model (and every module the objective counts): a model that does not fit the images, logits that
    do not match ``meta["num_classes"]`` or a teacher's, or a label outside the logits are one-line errors,
    and pixels outside [0, 1] a warning. ``model.json`` gets ``arch``, ``num_classes`` and ``in_shape``
    from ``meta`` when given, else from the module and that probe, so every run loads again.

    Example (without ``meta`` the run names no architecture of certkit's, so it loads into a module you
    build; :func:`build_trainer` takes names and records them, and ``certkit.load(run)`` alone rebuilds that)::

        model = create_model("lenet", 10, (1, 28, 28))
        trainer = Trainer(model, Gaussian(sigma=0.25), train, test, TrainConfig(epochs=2), out_dir="runs/g")
        trainer.fit()
        model = certkit.load("runs/g", model=create_model("lenet", 10, (1, 28, 28)))
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_data: Any,
        test_data: Any | None = None,
        config: TrainConfig | None = None,
        out_dir: str | os.PathLike | None = None,
        meta: dict[str, Any] | None = None,
        device: torch.device | str = "auto",
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
        metric_logs: tuple[str, ...] = (),
    ) -> None:
        self.config = config if config is not None else TrainConfig()
        self.device = select_device(device) if isinstance(device, str) else device
        self.objective = objective
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.train_data = as_training_data(train_data).to(self.device)
        own_batch = getattr(self.train_data, "own_batch_size", None)
        if own_batch is not None and own_batch != self.config.batch_size:
            # a DataLoader batches as it was built: model.json and the progress bar say what ran
            self.config = dataclasses.replace(self.config, batch_size=own_batch)
        self.test_data = as_training_data(test_data).to(self.device) if test_data is not None else None
        if self.test_data is not None and len(self.test_data) == 0:
            raise CertkitError("the test data is empty (0 items); pass none for no per-epoch test")
        image, label = _first_item(self.train_data, "training")
        self.meta = dict(meta or {})
        self.meta.setdefault("arch", f"custom:{type(unwrap(model)).__name__}")
        self.meta.setdefault("in_shape", list(image.shape))
        problem = checkpoint.shape_problem(self.meta["in_shape"])
        if problem:
            raise CertkitError(f"training data: {problem}")
        self.model = objective.prepare_model(model, tuple(image.shape)).to(self.device)
        counted = objective.counted_modules()
        for module in counted.values():
            module.to(self.device)
        self.meta["num_classes"] = check_fit(
            self.model, counted, image.to(self.device), label, self.meta.get("num_classes"), "training item 0"
        )
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress  # None: a bar on a terminal, else a log line every CERTKIT_PROGRESS_SECONDS
        self.log = log or (logging.getLogger("certkit").info if self.rank == 0 else lambda msg: None)
        self.metric_logs = MetricLogs(self.out_dir if self.rank == 0 else None, metric_logs if self.rank == 0 else ())
        self.step_mode = step_mode(
            self.config.compile, self.device, objective, self.world_size, own_networks(self.meta, objective)
        )
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.ledger = CostLedger(device=checkpoint.environment()["device"], ancestors=objective.cost_ancestors())
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.amp = autocast_dtype(self.config.amp, self.device)
        if use_channels_last(self.config.channels_last, self.model):
            for module in (self.model, *counted.values()):
                module.to(memory_format=torch.channels_last)
        self.compiled = self.step_mode == "on"
        step_model = compiled_model(self.model, self.device) if self.compiled else self.model
        self.net: nn.Module = step_model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(step_model, device_ids=ids)
        # the compiled wrapper's hooks run outside the compiled graph, so it is the one that counts passes
        modules = {"": step_model, **{f"{k}_": m for k, m in counted.items()}}
        self.counters = [PassCounter(m, prefix) for prefix, m in modules.items()]
        graphed = self.step_mode == "graph"
        self.runner = StepRunner(
            self._step, self.counters, self.device, capture=cuda_graph if graphed else None, constants=self._constants
        )

    # --- optimisation -------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "adam":
            # a captured step keeps Adam's step counts on the device
            capturable = self.step_mode == "graph"
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay, capturable=capturable)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        c, opt = self.config, self.optimizer
        if c.schedule == "step":
            # a script calling ``scheduler.step(epoch)`` after epoch ``epoch`` (0-based) trains epoch e at
            # gamma^((e - 1) // lr_step): every decay one epoch later than StepLR's (its published logs agree)
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda epoch: c.gamma ** (max(epoch - c.lr_step_lag, 0) // c.lr_step)
            )
        if c.schedule == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(c.milestones), gamma=c.gamma)
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
        if c.schedule == "exp":
            gamma = (c.lr_final / c.lr) ** (1.0 / max(c.epochs - 1, 1))
            return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
        if c.schedule == "half-exp":
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda epoch: half_exp_factor(epoch, c.epochs, c.lr_final / c.lr)
            )
        return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)

    # --- the loop -----------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train (after :meth:`resume` when asked) while holding the run directory's lock, so that two
        processes never write one run directory; rank 0 alone writes it under torchrun."""
        for _ in self.run_epochs(resume):
            pass
        return self.history

    def run_epochs(self, resume: bool = False) -> Iterator[dict[str, Any]]:
        """:meth:`run` one epoch at a time: yields each epoch's record once it is saved, so that two runs can
        take turns on one machine and a change in its speed hits both alike (the demo times its two students
        this way). The lock is held until the iterator is exhausted or closed."""
        locked = self.out_dir is not None and self.rank == 0
        with PidLock(self.out_dir) if locked else contextlib.nullcontext():  # type: ignore[arg-type]
            if locked:
                assert self.out_dir is not None
                remove_stale_temporaries(self.out_dir, (checkpoint.WEIGHTS, checkpoint.META, METRICS, STATE, CSV))
            if resume:
                self.resume()
            try:
                yield from self.fit_epochs()
            finally:
                self.metric_logs.close()

    def fit(self) -> list[dict[str, Any]]:
        """Train from :attr:`start_epoch` to the last epoch; returns the per-epoch records."""
        for _ in self.fit_epochs():
            pass
        return self.history

    def fit_epochs(self) -> Iterator[dict[str, Any]]:
        """:meth:`fit` one epoch at a time, yielding each epoch's record after it is saved."""
        c = self.config
        for epoch in range(self.start_epoch, c.epochs):
            record = self.train_epoch(epoch)
            record.update(self.evaluate())
            self.history.append(record)
            self.log(
                f"epoch {epoch + 1}/{c.epochs}  loss {record['loss']:.4f}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("test_"))
                + f"  {record['seconds']:.1f}s"
            )
            if self.out_dir is not None and self.rank == 0:
                self.save(epoch)
                self.metric_logs.write(self.history)
            if self.world_size > 1:
                barrier()  # rank 0 has saved (on gloo a failure there is one line on the other ranks too)
            yield record
        # back to the layout a checkpoint loads in, so the finished model computes exactly what a loaded one does;
        # that moves the weights, so captured steps (which hold their old addresses) are dropped first
        self.runner.release()
        for module in (self.model, *self.objective.counted_modules().values()):
            module.to(memory_format=torch.contiguous_format)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of optimizer steps without a host synchronisation: the loss and its parts are summed on
        the device and read once at the end, where a non-finite sum (any step's loss NaN/inf) stops the run
        before anything is saved. A compiled or captured step keeps its shapes fixed by dropping the last,
        partial batch (when there is at least one full batch), so its graph is never made again for a
        smaller one."""
        c = self.config
        torch.manual_seed(derive_seed(c.seed, "noise", epoch, self.rank))
        order = torch.Generator().manual_seed(derive_seed(c.seed, "order", epoch))
        self.objective.start_epoch(epoch, c.epochs)
        self.net.train()
        chunks = max(1, int(self.objective.num_chunks))
        runner = self.runner
        runner.begin_epoch()

        def running_loss() -> str:  # read off the device only when a progress line is drawn
            return f"loss={float(runner.totals['loss']) / max(runner.images, 1):.4f}"

        per_rank = len(self.train_data) // self.world_size
        drop_last = self.step_mode in ("on", "graph") and per_rank >= c.batch_size
        n_batches = per_rank // c.batch_size if drop_last else math.ceil(per_rank / c.batch_size)
        bar = Progress(
            n_batches,
            f"epoch {epoch + 1}/{c.epochs}",
            unit="batch",
            enabled=self.rank == 0 and self.progress is not False,
            terminal=self.progress or None,
            final=False,
        )
        self._sync()
        start = time.perf_counter()
        for x, y in self.train_data.batches(
            c.batch_size, shuffle=True, generator=order, drop_last=drop_last, rank=self.rank, world_size=self.world_size
        ):
            for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
                runner(xc, yc)
            bar.update(1, note=running_loss)
        self._sync()
        seconds = time.perf_counter() - start
        # under torchrun the epoch's figures are every rank's together: the loss sums (one rank's non-finite
        # step has already reached every rank's weights through the gradient all-reduce, so every rank must
        # stop, before rank 0 saves them), the steps and the image passes (the ledger's cost is the job's)
        passes = {k: v for counter in self.counters for k, v in counter.take().items()}
        summed = sum_over_ranks(
            [runner.steps, runner.images, *map(float, runner.totals.values()), *passes.values()], self.device
        )
        steps, images = int(summed[0]), int(summed[1])
        totals = dict(zip(runner.totals, summed[2 : 2 + len(runner.totals)]))
        if c.check_finite and steps and not math.isfinite(totals["loss"]):
            raise CertkitError(
                f"training diverged at epoch {epoch + 1}: the {self.objective.name} loss became non-finite "
                "(lower the learning rate or the method's attack strength)"
            )
        bar.close()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        # epochs count from 1 in metrics.jsonl and the ledger, as on the console
        cost: dict[str, Any] = {"epoch": epoch + 1, "seconds": seconds, "steps": steps}
        cost.update({k: int(v) for k, v in zip(passes, summed[2 + len(runner.totals) :])})
        self.ledger.epochs.append(cost)
        record = {"epoch": epoch + 1, "lr": lr, "seconds": seconds}
        record.update({k: v / max(images, 1) for k, v in totals.items()})  # per image (StepRunner)
        return record

    def _constants(self) -> tuple[object, ...]:
        """The numbers a captured step bakes in: the learning rates and the objective's schedule weights."""
        return tuple(g["lr"] for g in self.optimizer.param_groups), self.objective.step_constants()

    def _step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """One optimizer step on one chunk: the detached loss and its parts."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # autocast's weight-cast cache would hand a captured graph tensors freed after its capture
        with torch.autocast(
            self.device.type,
            dtype=self.amp or torch.bfloat16,
            enabled=self.amp is not None,
            cache_enabled=self.step_mode != "graph",
        ):
            loss, parts = self.objective(self.net, x, y)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach().float(), **{k: v.float() for k, v in parts.items()}}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-epoch test metrics of the objective (clean and one-draw noisy accuracy by default)."""
        if self.test_data is None:
            return {}
        self.model.eval()
        torch.manual_seed(derive_seed(self.config.seed, "test-noise"))
        sums: dict[str, Tensor] = {}
        n = 0
        for x, y in self.test_data.batches(self.config.test_batch_size):
            for k, v in self.objective.evaluate(self.model, x, y).items():
                sums[k] = sums.get(k, 0) + v
            n += len(y)
        # the eval passes are not training cost
        for counter in self.counters:
            counter.take()
        return {f"test_{k}": float(v) / max(n, 1) for k, v in sums.items()}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- checkpoints and resumption ------------------------------------------------------------------
    def checkpoint_meta(self, epoch: int) -> dict[str, Any]:
        meta = dict(self.meta)
        meta.update(
            sigma=self.objective.sigma,
            method=self.objective.name,
            hparams=dict(self.objective.hparams),
            train=asdict(self.config) | {"milestones": list(self.config.milestones)},
            epochs_completed=epoch + 1,
            cost=self.ledger.to_json(),
            metrics=self.history[-1] if self.history else {},
            world_size=self.world_size,
        )
        meta.update(self.objective.checkpoint_meta())
        return meta

    def save(self, epoch: int) -> None:
        """Write the resume state (one atomic file), then the published checkpoint, then the metrics."""
        assert self.out_dir is not None
        weights = self.model.state_dict()
        # the loss checked before the epoch's last step does not vouch for the weights after it
        if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
            raise CertkitError(
                f"training diverged at epoch {epoch + 1}: the weights became NaN or inf, so they were not saved "
                "(lower the learning rate or the method's attack strength)"
            )
        meta = self.checkpoint_meta(epoch)
        state = {f"model.{k}": v for k, v in weights.items()}
        opt_state = self.optimizer.state_dict()
        for pid, pstate in opt_state["state"].items():
            for k, v in pstate.items():
                if isinstance(v, Tensor):
                    state[f"optim.{pid}.{k}"] = v
        plain = {
            pid: {k: v for k, v in s.items() if not isinstance(v, Tensor)} for pid, s in opt_state["state"].items()
        }
        resume = {
            "epoch": epoch,
            "meta": meta,
            "history": self.history,
            "optimizer": {"param_groups": opt_state["param_groups"], "plain_state": plain},
            "scheduler": self.scheduler.state_dict(),
        }
        atomic_write_bytes(
            self.out_dir / STATE, checkpoint.state_to_bytes(state, {"certkit_resume": json.dumps(resume)})
        )
        checkpoint.save(self.model, self.out_dir, meta)
        atomic_write_text(self.out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in self.history))

    def _check_same_run(self, path: Path, saved_meta: Mapping[str, Any]) -> None:
        """Refuse to resume under any setting that defines the result other than the one the run started
        with: the data (dataset, subsets, architecture), the method, sigma, its hyperparameters and every
        optimisation setting, so what ``model.json`` records is what ran. ``epochs`` alone may grow; that
        is checked by the caller."""
        current = self.checkpoint_meta(0)
        flag = {f.name: TrainConfig.flag(f.name) for f in dataclasses.fields(TrainConfig)}
        # declared defaults: a setting a run started under an older certkit could not record
        added = {("train", f.name): f.default for f in dataclasses.fields(TrainConfig)}
        added.update({("hparams", f.name): f.default for f in dataclasses.fields(self.objective.Params)})
        saved: dict[str, Any] = {}  # by the flag that sets it (MACER's --gamma is not the schedule's --lr-gamma)
        now: dict[str, Any] = {}
        for k in ("dataset", "train_subset", "test_subset", "arch", "method", "sigma"):
            saved["--" + k.replace("_", "-")], now["--" + k.replace("_", "-")] = saved_meta.get(k), current.get(k)
        # an older certkit recorded a subset larger than its split, which trained on the whole split
        for flag_name, data in (("--train-subset", self.train_data), ("--test-subset", self.test_data)):
            old_size = saved[flag_name]
            if now[flag_name] is None and data is not None and isinstance(old_size, int) and old_size >= len(data):
                saved[flag_name] = None
        for group in ("hparams", "train"):
            old, new = dict(saved_meta.get(group, {})), dict(current.get(group, {}))
            for k in dict.fromkeys([*old, *new]):
                if k not in old and new.get(k) == added.get((group, k), object()):
                    continue  # added by a later certkit, at the value that computes what the run computed
                if group == "train" and k in _READ_BY and self.config.unused(k):
                    continue  # never read by this run's schedule or optimizer (an older certkit recorded it)
                if (group, k) != ("train", "epochs"):
                    name = flag.get(k, "--" + k) if group == "train" else "--" + k.replace("_", "-")
                    # a setting the run could not record computed what its declared default computes
                    saved[name], now[name] = old.get(k, added.get((group, k))), new.get(k)
        # the teacher defines a CRT student as much as sigma does: its weights, not only its path
        old_teacher, new_teacher = saved_meta.get("teacher") or {}, current.get("teacher") or {}
        if old_teacher.get("sha256") != new_teacher.get("sha256"):
            raise CertkitError(
                f"{path}: run was started with the teacher {old_teacher.get('path')!r} (weights "
                f"{str(old_teacher.get('sha256'))[:12]}), not {new_teacher.get('path')!r} (weights "
                f"{str(new_teacher.get('sha256'))[:12]}); resume with the same teacher or choose another --out"
            )
        # --batch-size is per process: another process count changes the batch each optimizer step sees
        saved["torchrun --nproc-per-node"] = saved_meta.get("world_size", 1)
        now["torchrun --nproc-per-node"] = self.world_size
        saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(now))  # as stored: tuples become lists
        for k in saved:
            if saved[k] != now[k]:
                raise CertkitError(
                    f"{path}: run was started with {k} {saved[k]!r}, not {now[k]!r}; "
                    "resume with the same settings or choose another --out"
                )

    def _load_state(self, tensors: Mapping[str, Tensor], optimizer: Mapping[str, Any], scheduler: Any) -> None:
        """Weights, optimizer and scheduler from a resume file, as this process's objects take them."""
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        # how this process steps (a captured step on CUDA keeps Adam's counts on the device) is its own
        # choice, not the saved run's: a run may resume on another device or step mode
        current = self.optimizer.param_groups
        groups = [
            {**saved, **{k: now[k] for k in ("capturable", "foreach", "fused") if k in now}}
            for saved, now in zip(optimizer["param_groups"], current, strict=True)
        ]
        opt_state: dict[str, Any] = {"param_groups": groups, "state": {}}
        for pid, plain in optimizer["plain_state"].items():
            opt_state["state"][int(pid)] = dict(plain)
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = v.to(self.device)
        self.optimizer.load_state_dict(opt_state)
        # the schedule is the run's settings (checked equal to the saved ones); only its position comes from
        # the file, so neither JSON (which turns MultiStepLR's milestones into strings) nor a file written by
        # an older certkit with another scheduler class can change it
        position = {k: scheduler[k] for k in ("last_epoch", "_step_count", "_last_lr") if k in scheduler}
        self.scheduler.load_state_dict({**self.scheduler.state_dict(), **position})

    def resume(self) -> bool:
        """Continue from the last completed epoch in ``out_dir``; False when there is nothing to resume."""
        if self.out_dir is None or not (self.out_dir / STATE).is_file():
            return False
        path = self.out_dir / STATE
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                info = json.loads(f.metadata()["certkit_resume"])
            tensors = st_load(path.read_bytes())
        except Exception as e:  # a corrupt resume file must not be half-used
            raise CertkitError(f"{path}: cannot resume from it ({e})") from None
        problem = _resume_record_problem(info)
        if problem:
            raise CertkitError(f"{path}: cannot resume from it ({problem})")
        meta = info["meta"]
        saved_train = meta.get("train", {})
        if saved_train.get("epochs", self.config.epochs) != self.config.epochs:
            if info["epoch"] + 1 > self.config.epochs:
                raise CertkitError(
                    f"{path}: already trained {info['epoch'] + 1} epochs, more than --epochs {self.config.epochs}"
                )
            # what the run's earlier epochs computed may depend on the total: then more epochs would have
            # trained them otherwise, and model.json would record settings that never ran
            if self.config.schedule in ("cosine", "exp", "half-exp"):
                moved = f"{a_or_an(self.config.schedule)} learning-rate schedule"
            elif self.objective.schedule_reads_total_epochs():
                moved = f"{self.objective.name}'s ramps, which end at a share of the run"
            elif self.config.milestones != tuple(saved_train.get("milestones", ())):
                moved = "learning-rate milestones that follow --epochs (pass the run's --milestones to keep them)"
            else:
                moved = None
            if moved:
                raise CertkitError(
                    f"{path}: run was started with --epochs {saved_train['epochs']} and {moved}, which "
                    f"--epochs {self.config.epochs} would change for the epochs already trained; use another --out"
                )
        self._check_same_run(path, meta)  # another architecture is said as such, not as misshapen tensors
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        problem = _optimizer_tensors_problem(tensors, params)
        if problem:
            raise CertkitError(f"{path}: cannot resume from it ({problem})")
        try:
            self._load_state(tensors, info["optimizer"], info["scheduler"])
            self.ledger = CostLedger.from_json(meta["cost"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # parsed, but not a state of this run
            raise CertkitError(f"{path}: cannot resume from it ({first_line(e)})") from None
        self.history = _count_from_one(list(info["history"]))
        self.ledger.epochs = _count_from_one(self.ledger.epochs)
        self.ledger.ancestors = self.objective.cost_ancestors() or self.ledger.ancestors
        self.start_epoch = info["epoch"] + 1
        if self.rank == 0:
            # re-publish, in case the kill fell between writing the resume state and the checkpoint
            checkpoint.save(self.model, self.out_dir, meta)
            atomic_write_text(self.out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in self.history))
            for note in self.metric_logs.continue_run(self.history):
                self.log(note)
        self.log(f"resuming {self.out_dir} after epoch {self.start_epoch}")
        return True


def _subset(split: Any, size: int | None, flag: str) -> Any:
    """The first ``size`` items of a named dataset's split (all for None), refused when the split has fewer:
    model.json would record a subset that never ran."""
    if size is not None and size > len(split):
        raise CertkitError(f"{flag} {size}: the {split.split} split has only {len(split):,} images (omit it for all)")
    return split.subset(size)


def _first_item(data: Any, split: str) -> tuple[Tensor, int]:
    """Item 0 of a split, checked: the trainer reads it for shapes and the fit check, and an empty split is
    the user's mistake, said in one line rather than as an index error."""
    if len(data) == 0:
        raise CertkitError(f"the {split} data is empty (0 items)")
    return check_item(data[0], f"{split} item 0")


def _resume_record_problem(info: Any) -> str | None:
    """What is wrong with a parsed resume record, if anything: a damaged or foreign one is refused whole,
    before any of it is used (a value of the wrong type would otherwise fail half-way through resuming, or
    worse, be taken: a negative epoch trains past the epochs the checkpoint says it has)."""
    if not isinstance(info, dict):
        return "its record is not a mapping"
    kinds: dict[str, type] = {"epoch": int, "meta": dict, "history": list, "optimizer": dict, "scheduler": dict}
    for key, kind in kinds.items():
        if not isinstance(info.get(key), kind) or isinstance(info[key], bool):
            return f"its record has no valid {key!r}"
    epoch, meta = info["epoch"], info["meta"]
    if epoch < 0 or meta.get("epochs_completed", epoch + 1) != epoch + 1:
        return f"its epoch {epoch} is not the last of the {meta.get('epochs_completed')!r} epochs its metadata records"
    if not all(isinstance(meta.get(k, {}), dict) for k in ("hparams", "train", "cost")):
        return "its metadata's 'hparams', 'train' or 'cost' is not a mapping"
    if not all(isinstance(e, dict) and _is_count(e.get("epoch")) for e in info["history"]):
        return "its history is not a list of per-epoch records"
    optimizer, scheduler = info["optimizer"], info["scheduler"]
    groups, plain = optimizer.get("param_groups"), optimizer.get("plain_state")
    if not (
        isinstance(groups, list)
        and all(isinstance(g, dict) for g in groups)
        and isinstance(plain, dict)
        and all(k.isdecimal() and isinstance(v, dict) for k, v in plain.items())
    ):
        return "its optimizer record is malformed"
    position = (scheduler.get(k, 0) for k in ("last_epoch", "_step_count"))
    last_lr = scheduler.get("_last_lr", [])
    if not all(_is_count(v) for v in position) or not (
        isinstance(last_lr, list) and all(isinstance(v, float) and math.isfinite(v) for v in last_lr)
    ):
        return "its scheduler position is malformed"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _optimizer_tensors_problem(tensors: Mapping[str, Tensor], params: list[Tensor]) -> str | None:
    """What is wrong with a resume file's optimizer tensors (``optim.<parameter index>.<name>``), if anything:
    each must belong to a parameter of this model, be a scalar (Adam's step count) or have that parameter's
    shape, and be finite (a NaN momentum would turn the weights NaN in the first step, after the loss was
    computed, and the run would publish them)."""
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        pid, _, name = key[len("optim.") :].partition(".")
        if not (pid.isdecimal() and int(pid) < len(params) and name):
            return f"{key} names no parameter of this model"
        if value.dim() and value.shape != params[int(pid)].shape:
            return f"{key} has shape {list(value.shape)}, its parameter {list(params[int(pid)].shape)}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key} holds NaN or inf"
    return None


def use_channels_last(choice: str, model: nn.Module) -> bool:
    """Whether to store the weights channels-last: 'auto' does for a model with 2-d convolutions, whose
    oneDNN (CPU) and cuDNN kernels run faster in that layout; the inputs stay as they are (the first
    convolution follows its weight's layout), so the noise drawn for a batch does not change."""
    if choice == "auto":
        return any(isinstance(m, nn.Conv2d) for m in model.modules())
    return choice == "on"


def own_networks(meta: Mapping[str, Any], objective: Objective) -> bool:
    """Whether every network a step runs (the model, a CRT teacher) is one of certkit's architectures, whose
    forward passes are known to capture; a user's module may synchronise with the host in its forward."""
    archs = [meta.get("arch")]
    if objective.graph_safe:  # a CRT teacher's architecture, as its checkpoint records it
        archs.append(objective.checkpoint_meta().get("teacher", {}).get("arch", archs[0]))
    return all(isinstance(a, str) and a in list_models() for a in archs)


def step_mode(
    choice: str, device: torch.device, objective: Objective, world_size: int, known_networks: bool = True
) -> str:
    """How the trainer runs a step (``TrainConfig.compile``): "graph", "on" (torch.compile) or "off".

    "auto" captures on CUDA when it can: one process (a captured step would hold DistributedDataParallel's
    collectives), an objective without host synchronisation or data-dependent shapes in its step, and
    certkit's own networks (``known_networks``, see :func:`own_networks`); a user's network is captured when
    ``--compile graph`` says so."""
    why_not = None
    if device.type != "cuda":
        why_not = f"CUDA graphs need a CUDA device (this run is on {device.type})"
    elif world_size > 1:
        why_not = "a captured step is for one process (under torchrun use --compile on)"
    elif not objective.graph_safe:
        why_not = f"the {objective.name} step {objective.graph_unsafe_because}"
    if choice == "graph" and why_not:
        raise CertkitError(f"--compile graph: {why_not}; use --compile on or off")
    if choice == "auto":
        return "off" if device.type != "cuda" else ("on" if why_not or not known_networks else "graph")
    return choice


def compiled_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` under torch.compile (inductor) with fixed shapes; on CUDA with CUDA graphs
    (``reduce-overhead``), which replay the whole forward/backward without a launch per kernel."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    # compiling a module returns a module (an OptimizedModule); torch's stubs promise only a callable
    return torch.compile(model, mode=mode, dynamic=False)  # type: ignore[return-value]


def _count_from_one(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch records numbered from 1. Runs written before the numbering was unified counted from 0
    (their first record says epoch 0); a resumed one is renumbered, so that its old and new records agree."""
    if epochs and epochs[0].get("epoch") == 0:
        return [{**e, "epoch": e["epoch"] + 1} for e in epochs]
    return epochs


# ---------------------------------------------------------------------------------------------------------
# Recipes and the one-call API (names become objects here and in the CLI)
# ---------------------------------------------------------------------------------------------------------
#: published optimisation recipes per dataset family (training-methods.md §1, crt.md §3, gloro.md §7)
RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist", "*"): dict(epochs=90, batch_size=256, lr=0.01, schedule="step", lr_step=30, lr_step_lag=1),
    ("cifar10", "*"): dict(epochs=150, batch_size=256, lr=0.1, schedule="step", lr_step=50, lr_step_lag=1),
    ("imagenet", "*"): dict(epochs=90, batch_size=256, lr=0.1, schedule="step", lr_step=30, lr_step_lag=1),
    ("cifar10", "crt"): dict(epochs=200, batch_size=128, lr=0.1, schedule="multistep", milestones=(100, 150)),
    ("imagenet", "crt"): dict(epochs=90, batch_size=400, lr=0.1, schedule="multistep", milestones=(45, 67)),
}


def recipe(family: str, method: str | type[Objective]) -> dict[str, Any]:
    """The literature's optimisation settings for a dataset family and method (method-specific first)."""
    cls = get_objective(method) if isinstance(method, str) else method
    key = family_key(family)
    base = dict(RECIPES.get((key, "*"), {}))
    base.update(RECIPES.get((key, cls.name), {}))
    base.update(cls.recipe)
    return base


#: the noise level of a method named without one: the literature's most reported setting for MNIST-like data
DEFAULT_SIGMA = 0.25


def _method_sigma(method: str | Objective, sigma: float | None) -> float | None:
    """The sigma to build ``method`` with: a σ beside an objective that carries another, or given to a method
    that takes none, would be dropped without a word, so both are refused."""
    if isinstance(method, Objective):
        if sigma is not None and sigma != method.sigma:
            raise CertkitError(f"sigma={sigma} given beside a {method.name} objective built with sigma={method.sigma}")
        return method.sigma
    if not get_objective(method).uses_sigma:
        if sigma is not None:
            raise CertkitError(f"method {method!r} takes no sigma")
        return None
    return DEFAULT_SIGMA if sigma is None else sigma


def build_trainer(
    dataset: Any = "fashion-mnist",
    arch: str | nn.Module = "lenet",
    method: str | Objective = "gaussian",
    sigma: float | None = None,
    out: str | os.PathLike | None = None,
    hparams: Mapping[str, Any] | None = None,
    teacher: str | os.PathLike | nn.Module | None = None,
    teacher_model: nn.Module | None = None,
    teacher_arch: str | None = None,
    teacher_normalization: str | None = None,
    data_dir: str | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: bool | None = None,
    test_data: Any | None = None,
    num_classes: int | None = None,
    meta: Mapping[str, Any] | None = None,
    recipe: str | None = None,
    family: str | None = None,
    metric_logs: tuple[str, ...] = (),
    log: Callable[[str], None] | None = None,
    **config: Any,
) -> Trainer:
    """Names and objects in, a :class:`Trainer` out (not started): what :func:`train` and the CLI share.

    ``dataset`` is a name or your own torch ``Dataset``/``DataLoader`` (then ``test_data`` is its test split
    and ``num_classes`` its class count, None = the model's logit count; hyperparameters and the recipe are
    the published ones of ``family``: 'mnist', the default, 'cifar10' or 'imagenet'; a named dataset brings its
    own). ``sigma`` defaults to 0.25 for a method named here; an :class:`Objective` brings its own, and GloRo
    takes none. ``recipe`` names a published recipe (:mod:`certkit.recipes`): its
    optimisation settings and method hyperparameters sit between the defaults and what is given here. A CRT
    ``teacher`` is a run directory, a reference checkpoint or a module; ``teacher_model`` is an untrained
    instance of your own module to load a teacher run into, ``teacher_arch`` and ``teacher_normalization``
    read a reference teacher file that does not record them. ``log`` takes the per-epoch lines (default: the
    ``certkit`` logger on rank 0). Cheap checks run first (names, hyperparameters, the teacher, the
    settings), so a mistake is reported before any data is read.
    """
    select_device(device)
    if out is not None:
        check_output(out, "--out", directory=True)
        for name in (checkpoint.WEIGHTS, checkpoint.META, METRICS, STATE):  # written after the first epoch
            require_regular(Path(out) / name, f"run's {name}")
        resumable, finished = (Path(out) / STATE).exists(), (Path(out) / checkpoint.META).exists()
        if not resume and resumable:
            raise CertkitError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
        if finished and not resumable:
            # a finished run kept without its resume state (a copy of its weights and model.json): it can
            # neither continue nor be overwritten
            raise CertkitError(
                f"{out}: holds a run without its resume state ({STATE}), which cannot be continued; choose "
                "another --out"
            )
        if resume and not resumable:
            raise CertkitError(
                f"--resume {out}: holds no run to resume ({STATE} is missing); drop --resume to start one"
            )
    MetricLogs(out, metric_logs)  # an unknown format or a missing tensorboard package, before any data is read
    named = isinstance(dataset, str)
    info = dataset_info(dataset) if named else None
    if info is not None and (test_data is not None or num_classes not in (None, info.num_classes)):
        raise CertkitError(f"dataset {dataset!r} brings its own test split and {info.num_classes} classes")
    if info is None and (train_subset is not None or test_subset is not None or data_dir is not None):
        raise CertkitError("--train-subset, --test-subset and --data-dir apply to certkit's datasets; subset your own")
    classes = info.num_classes if info is not None else num_classes
    if isinstance(arch, str):
        model_spec(arch)  # unknown names fail before any data is read
    if info is not None and family is not None and family_key(family) != family_key(info.family):
        raise CertkitError(f"dataset {dataset!r} is of the {info.family} family, not {family!r}")
    family = family_key(info.family if info else family or DEFAULT_FAMILY)
    sigma = _method_sigma(method, sigma)
    recipe_train: Mapping[str, Any] = {}
    if recipe is not None:
        published = get_recipe(recipe)
        recipe_train = published.train
        check_recipe(published, family, method.name if isinstance(method, Objective) else method)
        if isinstance(method, Objective) and published.hparams:
            raise CertkitError(f"recipe {recipe!r} sets hyperparameters; pass them to the objective you built")
        if not isinstance(method, Objective):
            hparams = {
                **published.hyperparameters(sigma),
                **{k: v for k, v in (hparams or {}).items() if v is not None},
            }
    objective = build_objective(
        method,
        sigma,
        family,
        hparams,
        teacher,
        teacher_model,
        classes,
        dataset if named else None,
        teacher_arch=teacher_arch,
        teacher_normalization=teacher_normalization,
    )
    cfg = TrainConfig.for_method(family, type(objective), recipe_train, **config)
    run_meta: dict[str, Any] = {"certkit_version": __version__, "num_classes": classes}
    if recipe is not None:
        run_meta["recipe"] = recipe
    if info is not None:
        train_split = _subset(load_dataset(dataset, "train", data_dir), train_subset, "--train-subset")
        test_split = (
            _subset(load_dataset(dataset, "test", data_dir), test_subset, "--test-subset") if test_subset != 0 else None
        )
        run_meta.update(dataset=dataset, train_subset=train_subset, test_subset=test_subset)
    else:
        train_split, test_split = dataset, test_data
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # the same seed gives the same initial weights
    model: nn.Module
    if isinstance(arch, str):
        if classes is None:
            raise CertkitError(f"architecture {arch!r} needs your dataset's class count: pass num_classes")
        in_shape = info.in_shape if info else tuple(_first_item(as_training_data(train_split), "training")[0].shape)
        mean, std = (list(info.mean), list(info.std)) if info else ([0.0] * in_shape[0], [1.0] * in_shape[0])
        model = create_model(arch, classes, in_shape, mean, std)
        run_meta.update(arch=arch, normalization={"mean": mean, "std": std})
    else:
        model = arch
    run_meta.update(dict(meta or {}))
    return Trainer(
        model,
        objective,
        train_split,
        test_split,
        cfg,
        out_dir=out,
        meta=run_meta,
        device=device,
        progress=progress,
        metric_logs=metric_logs,
        log=log,
    )


def train(
    dataset: Any = "fashion-mnist", arch: str | nn.Module = "lenet", method: str | Objective = "gaussian", **kwargs: Any
) -> Trainer:
    """Train a model, as ``certkit train`` does; returns the finished :class:`Trainer`.

    Every argument of :func:`build_trainer`: ``dataset`` a name or your own torch ``Dataset``/``DataLoader``
    (with ``test_data``, ``num_classes``), ``arch`` a name or an ``nn.Module``, ``method`` a name or an
    :class:`Objective`; other keywords override :class:`TrainConfig` fields, unset ones take :func:`recipe`'s
    published values. Example::

        certkit.train("fashion-mnist", "lenet", "gaussian", sigma=0.25, epochs=2, out="runs/g")
        certkit.train(TensorDataset(x, y), nn.Sequential(...), "smoothmix", sigma=0.25, epochs=1, out="runs/m")
    """
    trainer = build_trainer(dataset, arch, method, **kwargs)
    trainer.run(resume=bool(kwargs.get("resume")))
    return trainer
