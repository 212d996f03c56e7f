"""The training-objective interface shared by every method.

A training method in certkit is an *objective*: an object built with its hyperparameters and called on a
batch, returning the loss to minimise and its named parts for logging. One trainer loop serves every
method (Gaussian, SmoothAdv, MACER, SmoothMix, Consistency, Stability, CRT, GloRo), so cost comparisons
between methods are comparisons of objectives, not of training scripts.

:class:`Objective` declares every hook the trainer calls, each with a default, so a method overrides only
what it changes (the torchattacks ``Attack`` pattern): :meth:`~Objective.loss`, :meth:`~Objective.evaluate`,
:meth:`~Objective.start_epoch`, :meth:`~Objective.prepare_model`, :meth:`~Objective.counted_modules`,
:meth:`~Objective.cost_ancestors`, :meth:`~Objective.checkpoint_meta`, ``recipe``, ``num_chunks`` and
``sigma`` (None for a method without noise).

Each method declares its hyperparameters once, as a :class:`Hypers` dataclass: fields made with
:func:`hyper` (type, help, bounds), the checks, and the published defaults per (dataset family, sigma) in
one ``TABLE``. The command line's flags, the checks and the defaults of a directly built objective all come
from that one declaration.

Conventions every objective follows:

* ``x`` is a float batch ``(B, C, H, W)`` in ``[0, 1]`` pixel space on the model's device; normalization is
  the model's first layer, so Gaussian noise ``sigma * randn`` is added directly to ``x``.
* Noise comes from torch's global RNG, which the trainer re-seeds from ``(seed, epoch)`` at every epoch so
  a resumed run is bit-for-bit the uninterrupted one on CPU.
* The model arrives in train mode, possibly wrapped in DistributedDataParallel. The gradient-carrying
  forward calls go through ``model`` as the reference code makes them (SmoothMix and Stability make two
  before one backward, which DDP's reducer takes: it sums a parameter's gradient over both before
  reducing it); attacks run inside ``with eval_mode(model) as net:`` on the unwrapped ``net`` (eval mode,
  parameter gradients off), restored afterwards.
* The loss and its parts are computed in fp32 from the network's logits, cast with ``.float()`` where they
  come out of the model (free in fp32): under ``--amp`` the network runs in bf16 or fp16, but CPU autocast,
  unlike CUDA's, runs ``softmax``, ``log_softmax`` and ``pow`` in bf16, whose 8-bit significand loses small
  terms such as Consistency's KL between nearly agreeing draws.
* The loss's named parts are returned as detached 0-d tensors (no ``.item()`` per step, which would
  synchronise the GPU); the trainer averages them over the epoch.
* ``graph_safe``: a method whose step has no host synchronisation and no data-dependent shapes declares
  it, and the trainer may then capture the whole step as a CUDA graph (:mod:`certkit.stepgraph`).
* ``num_chunks``: methods published with chunking (SmoothAdv, Consistency, SmoothMix) split each loader
  batch of B images into ``m`` chunks of ``B/m`` images and take one optimizer step per chunk; the trainer
  does the splitting, the objective only sees one chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.smoothing.statistics import check_sigma

#: the dataset family whose published values a directly built objective takes: the command line's
#: default dataset (Fashion-MNIST) is in it, so ``SmoothMix(0.25)`` is ``certkit train --method smoothmix``
DEFAULT_FAMILY = "mnist"

_FAMILY_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "mnist",
    "fashion_mnist": "mnist",
    "fmnist": "mnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "imagenet": "imagenet",
}


def family_key(family: str) -> str:
    """``mnist``, ``cifar10`` or ``imagenet`` for a family or dataset name; a one-line error otherwise."""
    key = _FAMILY_ALIASES.get(str(family).lower())
    if key is None:
        raise CertkitError(
            f"no published defaults for dataset family {family!r}; use one of mnist, fashion-mnist, cifar10, imagenet"
        )
    return key


def parse_bool(text: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (argparse's ``type=bool`` would take any text as True)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false (got {text!r})")


parse_bool.__name__ = "bool"  # argparse names the type in its error message


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def hyper(
    kind: type,
    help: str,
    *,
    default: Any = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: Sequence[str] = (),
    optional: bool = False,
    official: str | None = None,
    why: str = "",
) -> Any:
    """A hyperparameter field of a :class:`Hypers` dataclass.

    ``default=None`` means "the published value for the dataset family and sigma" (the class's ``TABLE``).
    ``optional`` lets the resolved value be None (e.g. an uncapped norm; ``none`` on the command line).
    ``official`` is the flag the reference code spells differently, quoted back when someone uses it.
    """
    meta = dict(
        kind=kind,
        help=help,
        minimum=minimum,
        maximum=maximum,
        choices=tuple(choices),
        optional=optional,
        official=official,
        why=why,
    )
    return dataclasses.field(default=default, metadata=meta)


def _parser(kind: type, optional: bool) -> Callable[[str], Any]:
    base: Callable[[str], Any] = parse_bool if kind is bool else kind
    if not optional:
        return base

    def parse(text: str) -> Any:
        return None if text.strip().lower() == "none" else base(text)

    parse.__name__ = f"optional_{kind.__name__}"  # the CLI says "a number, or none" by this name
    return parse


H = TypeVar("H", bound="Hypers")


@dataclass
class Hypers:
    """Base of one method's hyperparameters: fields from :func:`hyper`, checks, and the published table.

    ``TABLE[family][sigma]`` holds the published values; a sigma between the tabulated ones takes the
    nearest on a log scale (noise levels compare by ratio: 0.12 → 0.25, 0.75 → 1.0); an exact tie takes
    the smaller. ImageNet takes the CIFAR-10 rows unless it has its own: none of the smoothing methods
    publishes ImageNet values at every sigma, and the re-implementations carry the CIFAR-10 ones over.
    """

    TABLE: ClassVar[Mapping[str, Mapping[float, Mapping[str, Any]]]] = {}

    @classmethod
    def field_specs(cls) -> dict[str, dict[str, Any]]:
        """Each field's name and its :func:`hyper` metadata, in declaration order."""
        return {f.name: dict(f.metadata) for f in dataclasses.fields(cls)}

    @classmethod
    def parse_function(cls, name: str) -> Callable[[str], Any]:
        """How the command line turns the text of ``--name`` into a value."""
        spec = cls.field_specs()[name]
        return _parser(spec["kind"], spec["optional"])

    @classmethod
    def published(cls, family: str, sigma: float | None) -> dict[str, Any]:
        """The published values of ``TABLE`` for ``family`` at (the nearest tabulated) ``sigma``."""
        key = family_key(family)
        if not cls.TABLE:
            return {}
        rows = cls.TABLE.get(key) or cls.TABLE["cifar10"]
        if sigma is None or len(rows) == 1:
            return dict(next(iter(rows.values())))
        nearest = min(sorted(rows), key=lambda s: abs(math.log(s / sigma)))
        return dict(rows[nearest])

    @classmethod
    def defaults(cls, family: str, sigma: float | None) -> dict[str, Any]:
        """Every field's default for ``family``/``sigma``: the published value, else the field's own."""
        values = {f.name: f.default for f in dataclasses.fields(cls)}
        values.update(cls.published(family, sigma))
        return values

    @classmethod
    def resolve(cls: type[H], method: str, family: str, sigma: float | None, given: Mapping[str, Any]) -> H:
        """The defaults for ``family``/``sigma`` with the non-None ``given`` values on top, checked."""
        unknown = [k for k in given if k not in cls.field_specs()]
        if unknown:
            raise CertkitError(cls.unknown_message(method, unknown))
        values = cls.defaults(family, sigma)
        values.update({k: v for k, v in given.items() if v is not None})
        params = cls(**values)
        params.check(method)
        params.complete()
        return params

    @classmethod
    def unknown_message(cls, method: str, unknown: Sequence[str]) -> str:
        specs = cls.field_specs()
        hints = [
            f"{method}'s official {flag(u)} is {flag(name)} here"
            for u in unknown
            for name, spec in specs.items()
            if spec["official"] == flag(u)
        ]
        takes = ", ".join(flag(n) for n in specs) or "none"
        hint = f" ({'; '.join(hints)})" if hints else ""
        names = ", ".join(flag(u) for u in unknown)
        return f"method {method!r} has no hyperparameter {names}{hint}; its hyperparameters: {takes}"

    def check(self, method: str) -> None:
        """Each field against its declared type and bounds; subclasses add checks that span fields."""
        for name, spec in self.field_specs().items():
            value = getattr(self, name)
            where = f"{method}: {flag(name)}"
            if value is None:
                if not spec["optional"]:
                    raise CertkitError(f"{where} needs a value (no published default)")
                continue
            kind = spec["kind"]
            if kind is bool or kind is str:
                if not isinstance(value, kind):
                    raise CertkitError(f"{where} must be {'true or false' if kind is bool else 'text'} (got {value!r})")
                if spec["choices"] and value not in spec["choices"]:
                    raise CertkitError(f"{where} must be one of {', '.join(spec['choices'])} (got {value!r})")
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is int and not (number and float(value).is_integer()):
                raise CertkitError(f"{where} must be an integer (got {value!r})")
            if not (number and math.isfinite(value)):
                raise CertkitError(f"{where} must be a finite number (got {value!r})")
            low, high = spec["minimum"], spec["maximum"]
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                why = f"; {spec['why']}" if spec["why"] else ""
                raise CertkitError(f"{where} must be {bounds} (got {value!r}){why}")
            setattr(self, name, kind(value))

    def complete(self) -> None:
        """Resolve values defined in terms of others (after :meth:`check`); the record then holds numbers."""


@dataclass
class NoHypers(Hypers):
    """A method without hyperparameters (Gaussian augmentation)."""


class Objective:
    """Base class: a loss over a batch plus the epoch-dependent schedules of its method.

    A subclass sets ``name`` and ``Params`` (its :class:`Hypers`) and implements :meth:`loss`; every other
    hook has a default that fits a noise-based method on a plain model.

    Arguments:
        sigma: Gaussian noise level in [0, 1] pixel units (None, and ignored, for a method without noise).
        family: dataset family whose published hyperparameters fill the ones not given (``mnist``,
            ``cifar10``, ``imagenet``, or a dataset name); the command line passes its dataset's.
        **hparams: hyperparameters, by field name of ``Params``.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Hypers]] = NoHypers
    #: False for a method that adds no noise (GloRo): its sigma is None
    uses_sigma: ClassVar[bool] = True
    #: optimisation settings this method's publications use, over the dataset family's recipe
    recipe: ClassVar[dict[str, Any]] = {}
    #: optimizer steps per loader batch (the batch is split into this many chunks)
    num_chunks: int = 1
    #: whether a step can be captured as a CUDA graph (:mod:`certkit.stepgraph`): no host synchronisation
    #: and no data-dependent shapes inside :meth:`loss`; off unless a method declares it, so that a user's
    #: own objective is never captured unchecked
    graph_safe: ClassVar[bool] = False
    #: why not, for the error of ``--compile graph``
    graph_unsafe_because: ClassVar[str] = "is not declared capturable (Objective.graph_safe)"

    def __init__(self, sigma: float | None = None, *, family: str = DEFAULT_FAMILY, **hparams: Any) -> None:
        self.sigma: float | None = check_sigma(sigma) if self.uses_sigma else None
        self.hp = self.Params.resolve(self.name, family, self.sigma, hparams)
        self.hparams: dict[str, Any] = dataclasses.asdict(self.hp)
        self.epoch = 0
        self.num_epochs = 1

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def defaults(cls, family: str, sigma: float | None) -> dict[str, Any]:
        """Published defaults for a dataset family (``mnist`` for MNIST-like, ``cifar10``, ``imagenet``)."""
        return cls.Params.defaults(family, sigma)

    @classmethod
    def from_config(cls, sigma: float | None, family: str, overrides: Mapping[str, Any] | None = None) -> Objective:
        """Build with the published defaults for ``family``/``sigma``, then apply explicit ``overrides``."""
        return cls(sigma, family=family, **dict(overrides or {}))

    # --- hooks the trainer calls --------------------------------------------------------------------
    def prepare_model(self, model: nn.Module, in_shape: tuple[int, ...]) -> nn.Module:
        """The module to train, built around ``model`` (GloRo wraps it); by default ``model`` itself."""
        return model

    def counted_modules(self) -> dict[str, nn.Module]:
        """Modules besides the model whose forward/backward passes are training cost (a CRT teacher)."""
        return {}

    def cost_ancestors(self) -> list[dict[str, Any]]:
        """Cost of the runs this one builds on (a CRT teacher chain), kept apart in the ledger."""
        return []

    def step_constants(self) -> tuple[object, ...]:
        """The Python numbers a step of the current epoch reads beyond the hyperparameters (warm-up and
        deferral weights). A step captured as a CUDA graph bakes them in, and is replayed while they stay the
        same. By default the epoch itself: a method that says nothing is captured anew every epoch."""
        return (self.epoch,)

    def checkpoint_meta(self) -> dict[str, Any]:
        """Entries this method adds to ``model.json`` (a CRT lineage, a GloRo bound)."""
        return {}

    def schedule_reads_total_epochs(self) -> bool:
        """Whether an epoch's loss depends on the run's epoch count (a ramp to the last epoch), so that a run
        resumed with more ``--epochs`` would have trained its earlier epochs otherwise; warm-ups of a fixed
        number of epochs do not."""
        return False

    def start_epoch(self, epoch: int, num_epochs: int) -> None:
        """Called by the trainer before each (0-based) epoch; warm-ups read ``self.epoch``."""
        self.epoch = epoch
        self.num_epochs = num_epochs

    # --- the loss -----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss(model, x, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-epoch test metrics on one batch, as *sums* over the batch (the trainer divides by N).

        Default: clean accuracy and noisy accuracy with one noise draw per image (a diagnostic, not a
        certificate). Methods with other guarantees (GloRo) override this.
        """
        clean = model(x).argmax(1) == y
        noisy = model(x + self.noise(x)).argmax(1) == y
        return {"clean_acc": clean.float().sum(), "noisy_acc": noisy.float().sum()}

    def noise(self, x: Tensor) -> Tensor:
        """Fresh Gaussian noise of this objective's sigma, shaped and placed like ``x``."""
        assert self.sigma is not None, f"{self.name} adds no noise"
        return torch.randn_like(x) * self.sigma

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this objective; written into ``model.json``."""
        return {"method": self.name, "sigma": self.sigma, "hparams": dict(self.hparams)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.hparams.items()))
        return f"{type(self).__name__}(sigma={self.sigma}{', ' if args else ''}{args})"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run an attack with the model in eval mode and parameter gradients off, then restore both, module by
    module and parameter by parameter: a submodule the caller keeps in eval mode (a BatchNorm with frozen
    statistics) stays in eval mode, where ``model.train()`` would switch it back to train mode.

    Yields the *unwrapped* module: attack passes take no parameter gradients, so a DDP wrapper would only
    broadcast buffers and prepare its reducer for them. Use it as ``with eval_mode(model) as net: ... net(x)``.
    """
    model = unwrap(model)
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag_ in flags:
            p.requires_grad_(flag_)
        # through train(), which a module may override (GloroNet's): the whole model first, then, parents
        # before children, each module the caller had left in the other mode
        model.train(modes[0][1])
        for m, training in modes:
            if m.training != training:
                m.train(training)
