"""``certkit`` command line: a thin layer over the Python API.

Subcommands: ``train``, ``certify``, ``predict``, ``report``, ``curves``, ``merge``, ``demo``, ``reproduce``,
``export``, ``list``. Every error that is the user's to fix prints one line on stderr and exits with status 2;
no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from certkit import __version__
from certkit.errors import CertkitError, a_or_an, first_line


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (not a usage block) starting ``certkit: error:``, exit
    status 2, and a value the flag's type refuses is described in words, never by the parser function's name.

    A subcommand's flags are declared by its ``declare`` function the first time the subcommand is parsed
    or its help is shown: several flag lists name registries (methods, models, datasets) whose modules
    import torch, which costs seconds that ``certkit --help`` and ``--version`` should not pay.
    """

    declare: Callable[[argparse.ArgumentParser], None] | None = None

    def _declared(self) -> None:
        if self.declare is not None:
            declare, self.declare = self.declare, None
            declare(self)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._declared()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._declared()
        return super().format_help()

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("certkit").strip()
        if not command and "required: command" in message:  # `certkit` alone
            message += " (certkit --help lists the commands)"
        elif message.endswith("expected one argument"):  # argparse took a value starting with '-' for a flag
            message += " (a value starting with '-' is written after '=': --radii=-1,0.5)"
        self.exit(2, f"certkit: error: {command + ': ' if command else ''}{message}\n")

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        parse = action.type if callable(action.type) else str
        try:
            return parse(arg_string)
        except argparse.ArgumentTypeError as e:  # already says what was expected
            raise argparse.ArgumentError(action, str(e)) from None
        except (TypeError, ValueError):
            expected = _EXPECTED.get(getattr(parse, "__name__", ""), "a valid value")
            raise argparse.ArgumentError(action, f"expected {expected} (got {arg_string!r})") from None


class _CheckingParser(_Parser):
    """A parser whose refusals raise :class:`CertkitError` instead of exiting: for flags that one command
    passes on to another it runs later (``reproduce --certify-flags``), checked before the first one starts."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CertkitError(message)


#: what a flag's value must look like, by the name of the function that parses it
_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false (or yes/no, on/off, 1/0)",
    "optional_float": "a number, or none",
    "optional_int": "an integer, or none",
    "optional_bool": "true, false or none",
    "_milestones": "comma-separated integers, e.g. 30,60",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the unset ones (None/False), whose help already says what they resolve to."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


#: the largest dataset index (or skip, or shard count) a result file's settings may record: 2**53, the
#: largest integer a JSON reader is sure to hold exactly (certkit.results.MAX_INDEX, not imported here: the
#: parser is built before numpy or torch are)
_MAX_INDEX = 2**53


def _shard(value: str) -> tuple[int, int]:
    try:
        i, k = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must look like i/k, e.g. 0/4 (got {value!r})") from None
    if k < 1 or not 0 <= i < k or k > _MAX_INDEX:
        raise argparse.ArgumentTypeError(f"--shard i/k needs 0 <= i < k <= {_MAX_INDEX} (got {value!r})")
    return i, k


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """A flag's type: an integer >= ``low`` (and <= ``high``), refused in words that give the bounds."""
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: str) -> int:
        try:
            v = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected} (got {value!r})") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {expected} (got {v})")
        return v

    return parse


_index_count = _int_at_least(1, _MAX_INDEX)


def _max_index(value: str) -> int:
    """``--max``: -1 (every image) or the first index not certified, 1 to 2**53 (0 would plan nothing)."""
    try:
        return -1 if value.strip() == "-1" else _index_count(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected -1 (all images) or an index from 1 to {_MAX_INDEX}, the first one not certified (got {value!r})"
        ) from None


_positive_int = _int_at_least(1)


def _batch(value: str) -> int | str:
    """``--batch``: a positive number of noisy copies, or ``auto``."""
    if value == "auto":
        return value
    try:
        return _positive_int(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto (got {value!r})") from None


def _common_data(
    p: argparse.ArgumentParser, dataset_default: str | None = "fashion-mnist", factory: str = "your own data"
) -> None:
    """``--dataset``, ``--data-dir`` and ``--device``; ``factory`` says what ``--dataset pkg.module:factory`` does."""
    from certkit.data import DATASETS

    default = "%(default)s" if dataset_default else "the one the checkpoint names"
    p.add_argument(
        "--dataset",
        default=dataset_default,
        help=f"dataset name: {', '.join(DATASETS)}; or pkg.module:factory, {factory} (default: {default})",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="dataset folder (default: $CERTKIT_DATA, then the dataset's default; "
        "Fashion-MNIST: /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda or cuda:N")


def _config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`~certkit.train.TrainConfig` field; unset ones take the published recipe."""
    from certkit.train import TrainConfig

    group = p.add_argument_group("optimisation (default: the published recipe for the dataset family and method)")
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta["cli"]:
            continue
        parse = meta["parse"] or {"int": int, "float": float, "str": str}[str(f.type)]
        flags = meta["flags"] or [TrainConfig.flag(f.name)]  # the metavar follows the first flag: LR_GAMMA
        group.add_argument(
            *flags,
            dest=f.name,
            type=parse,
            choices=meta["choices"] or None,
            metavar=None if meta["choices"] else flags[0][2:].replace("-", "_").upper(),
            default=None,
            help=f"{meta['help']} (default: recipe, else {f.default!r})",
        )


def _hyper_arguments(p: argparse.ArgumentParser, methods: dict[str, Any]) -> None:
    """One flag per hyperparameter name across all methods (a name means one thing everywhere); the help
    says which methods take it. Only given flags reach the namespace, as ``hp_<name>``."""
    helps: dict[str, list[str]] = {}
    parsers: dict[str, Any] = {}
    for name, cls in methods.items():
        for key, spec in cls.Params.field_specs().items():
            official = f" (the reference code's {spec['official']})" if spec["official"] else ""
            takes = " (true or false)" if spec["kind"] is bool else " (or none)" if spec["optional"] else ""
            helps.setdefault(key, []).append(f"{name}: {spec['help']}{takes}{official}")
            parsers.setdefault(key, cls.Params.parse_function(key))
    group = p.add_argument_group(
        "method hyperparameters (default: the published value for the dataset and sigma, listed by "
        "`certkit list hyperparameters`)"
    )
    for key in sorted(helps):
        group.add_argument(
            "--" + key.replace("_", "-"),
            dest="hp_" + key,
            metavar=key.upper(),
            type=parsers[key],
            default=argparse.SUPPRESS,
            help="; ".join(helps[key]),
        )


def _train_arguments(t: argparse.ArgumentParser) -> None:
    from certkit.methods import list_objectives, registry
    from certkit.models import list_models
    from certkit.recipes import list_recipes
    from certkit.reference import NORMALIZATIONS

    _common_data(t, factory="your own data: a function returning train and test torch Datasets and the class count")
    t.add_argument("--arch", default="lenet", help=f"architecture: {', '.join(list_models())}, or pkg.module:factory")
    t.add_argument(
        "--method",
        default=None,
        help=f"training method: {', '.join(list_objectives())} (default: the recipe's, else gaussian)",
    )
    t.add_argument(
        "--recipe",
        default=None,
        choices=list_recipes(),
        metavar="NAME",
        help="a published recipe (certkit list recipes): its optimisation settings and method hyperparameters, "
        "under any flag given explicitly",
    )
    t.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="Gaussian noise level in [0,1] pixel units (train sigma = certify sigma; default 0.25; gloro takes none)",
    )
    t.add_argument("--out", required=True, help="run directory (model.safetensors, model.json, metrics.jsonl)")
    t.add_argument("--teacher", default=None, help="CRT teacher: a certkit run directory or a reference .pth/.pth.tar")
    t.add_argument(
        "--teacher-arch",
        default=None,
        help="architecture of a reference teacher file that records none (CRT's and MACER's files); for a "
        "teacher run of your own model (trained with --arch pkg.module:factory), that pkg.module:factory, which "
        "builds the module its weights load into (never imported because model.json names it)",
    )
    t.add_argument(
        "--teacher-normalization",
        choices=NORMALIZATIONS,
        default=None,
        help="input layer of a reference teacher file (as certify's --normalization)",
    )
    t.add_argument(
        "--train-subset", type=_positive_int, default=None, help="use only the first N training images (default: all)"
    )
    t.add_argument(
        "--test-subset",
        type=_int_at_least(0),
        default=None,
        help="evaluate on the first N test images each epoch (0: no per-epoch test; default: the whole test split)",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    t.add_argument(
        "--log",
        choices=["csv", "tensorboard"],
        action="append",
        default=None,
        help="also write the per-epoch metrics as OUT/metrics.csv (csv) or TensorBoard event files in OUT "
        "(tensorboard, needs the extra: pip install 'certkit[tensorboard]'); repeat for both",
    )
    _config_arguments(t)
    _hyper_arguments(t, registry())


def _certify_arguments(c: argparse.ArgumentParser) -> None:
    """The flags of ``certify`` and ``predict`` (``c.prog`` ends with the subcommand's name)."""
    from certkit.reference import NORMALIZATION_HELP, NORMALIZATIONS

    name = c.prog.split()[-1]
    c.add_argument(
        "run",
        help="certkit run directory, or a reference .pth/.pth.tar (with --dataset, and --sigma: such a file "
        "records no training sigma; with --arch when it records no architecture)",
    )
    _common_data(
        c,
        dataset_default=None,
        factory="your own data: the factory's test split (its train split with --split train), checked against "
        "the model's class count and input shape; a factory that model.json names is never imported unless "
        "named here",
    )
    c.add_argument(
        "--arch",
        default=None,
        help="a run of your own model (trained with --arch pkg.module:factory): the same pkg.module:factory, "
        "which builds the untrained module the run's weights load into (certkit imports it only because it is "
        "named here, never because model.json names it, and refuses another spec than the one model.json "
        "records); a reference checkpoint without an 'arch' entry (CRT's, MACER's): its architecture, "
        "a reference name (cifar_resnet110, lenet, ...) or certkit's (resnet110)",
    )
    c.add_argument("--normalization", choices=NORMALIZATIONS, default=None, help=NORMALIZATION_HELP)
    c.add_argument("--split", choices=["test", "train"], default="test", help="dataset split")
    c.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="Gaussian noise level in pixel units (images in [0,1]), 0 < sigma <= 100 (default: the checkpoint's "
        "training sigma)",
    )
    if name == "certify":
        c.add_argument("--n0", "--N0", dest="n0", type=int, default=100, help="selection samples, 1 to 10^9")
        c.add_argument(
            "--method",
            choices=["smoothing", "gloro"],
            default=None,
            help="certifier (default: gloro for GloRo checkpoints, else smoothing)",
        )
        c.add_argument(
            "--epsilon",
            type=float,
            default=None,
            help="gloro: L2 radius in [0,1] pixel units at which VRA is counted (default: the checkpoint's)",
        )
        c.add_argument(
            "--adaptive",
            action="store_true",
            help="stop sampling an input once its outcome is decided (same 1-alpha guarantee)",
        )
    c.add_argument(
        "--n",
        "--N",
        dest="n",
        type=int,
        default=100_000,
        help="estimation samples, at most 10^9; refused when too few to ever certify (or predict) at --alpha",
    )
    c.add_argument(
        "--alpha",
        type=float,
        default=0.001,
        help="failure probability of each certificate (or prediction), in (0, 0.5]",
    )
    c.add_argument(
        "--batch",
        "--batch-size",
        dest="batch",
        type=_batch,
        default=1000,
        help="noisy samples per forward pass, or auto: a power of two found once and printed (on CUDA half the "
        "largest that fits; on CPU the fastest of a short timing probe). Certificates are the same for any "
        "batch of 100 or more." + (" For a GloRo net: images per batch" if name == "certify" else ""),
    )
    c.add_argument("--skip", type=_index_count, default=1, help="certify every skip-th image (1: every image)")
    c.add_argument(
        "--max",
        "--max-index",
        dest="max",
        type=_max_index,
        default=-1,
        help="stop before this dataset index, which is not certified (--max 10: indices 0-9; -1: all); "
        "under torchrun write `-m certkit -- certify ...` or spell it --max-index (torchrun reads --max as its "
        "own --max-restarts)",
    )
    c.add_argument("--seed", type=int, default=0, help="noise seed; input idx uses a stream derived from (seed, idx)")
    c.add_argument(
        "--amp",
        choices=["bf16", "fp16"],
        default=None,
        help="autocast forward passes: bf16 or fp16 on CUDA, bf16 on CPUs with AVX512-BF16 or AMX (checked to "
        "match fp32 votes on a sample)",
    )
    c.add_argument(
        "--channels-last",
        action="store_true",
        help="run the network channels-last (CUDA tensor cores; also faster for small CNNs on CPU), "
        "checked to match fp32 votes on a sample",
    )
    c.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on long runs)")
    c.add_argument(
        "--rng",
        choices=["torch", "philox"],
        default="torch",
        help="noise generator: 'torch' draws each input's stream from a torch.Generator, one randn call per "
        "block of 100 copies; 'philox' is counter-based (Philox4x32-10 keyed by seed and index), so a whole "
        "forward batch's noise is one computation, fused with the network's input under --compile: for GPUs, "
        "where per-block launches dominate small networks. Same distribution, different draws; a result file "
        "resumes only with the generator it was started with",
    )
    c.add_argument(
        "--shared-noise",
        type=int,
        default=0,
        metavar="G",
        help="groups of G consecutive test inputs vote on the same noise draws: the first layer then runs once "
        "per input and once per draw (LeNet on CPU: several times faster). Each certificate keeps its 1-alpha "
        "guarantee; certificates within a group are no longer independent of each other. 0: off",
    )
    c.add_argument(
        "--shard",
        type=_shard,
        default=None,
        help="i/k: certify the i-th of k disjoint slices (automatic under torchrun)",
    )
    c.add_argument("--out", required=True, help="result TSV")
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (and its settings file and summary, which must be certkit's own) instead "
        "of resuming it",
    )


def _labels_argument(p: argparse.ArgumentParser, what: str, default: str) -> None:
    p.add_argument(
        "--labels", default=None, help=f"comma-separated names for the {what}, in order (default: {default})"
    )


def _labels(args: argparse.Namespace) -> list[str] | None:
    """``--labels`` as a list; its count is checked by the library function it goes to, which knows the files."""
    return [v.strip() for v in args.labels.split(",")] if args.labels else None


def _report_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("files", nargs="+", help="result TSVs (certkit's or the reference implementations')")
    r.add_argument(
        "--plot",
        default=None,
        help="write certified accuracy vs radius of all files to this image; "
        "the suffix picks the format (.png, .pdf, .svg)",
    )
    r.add_argument(
        "--radii", default=None, help="comma-separated radii (default: 0, 0.25, ... up to the largest radius)"
    )
    _labels_argument(r, "files", "the file names")
    r.add_argument("--title", default=None, help="plot title")
    r.add_argument(
        "--latex", action="store_true", help="print the table as a LaTeX tabular (booktabs) instead of Markdown"
    )


def _curves_arguments(cv: argparse.ArgumentParser) -> None:
    cv.add_argument("runs", nargs="+", help="certkit run folders")
    cv.add_argument("--plot", required=True, help="image to write; the suffix picks the format (.png, .pdf, .svg)")
    _labels_argument(cv, "runs", "the folder names")
    cv.add_argument("--title", default=None, help="figure title")


def _merge_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("shards", nargs="+", help="shard TSVs")
    m.add_argument("--out", required=True, help="merged TSV (with its settings file OUT.json)")
    _overwrite_argument(m, "the merged TSV and its settings file")


def _demo_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--full",
        action="store_true",
        help="the literature's settings (90 epochs, full test set, n=100,000): hours on CPU",
    )
    d.add_argument("--out", default="demo-out", help="output directory")
    d.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST folder (default: $CERTKIT_DATA, then the Debian package's)"
    )
    d.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda or cuda:N")


def _reproduce_arguments(rp: argparse.ArgumentParser) -> None:
    from certkit.experiments.reproduce import add_arguments

    add_arguments(rp)


def _export_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("run", help="certkit run directory")
    e.add_argument("--format", choices=["reference"], required=True, help="output layout")
    e.add_argument("--out", required=True, help="output file, e.g. checkpoint.pth.tar")
    _overwrite_argument(e, "the file")


def _overwrite_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing --out ({what}); without it, refused")


def _list_arguments(ls: argparse.ArgumentParser) -> None:
    ls.add_argument(
        "what",
        nargs="?",
        choices=["all", "recipes", "hyperparameters"],
        default="all",
        help="recipes: one line per recipe with its source; hyperparameters: each method's published "
        "defaults by dataset family and sigma",
    )


def build_parser(parser_class: type[_Parser] = _Parser) -> argparse.ArgumentParser:
    """The whole command line. Each subcommand declares its flags when it is first parsed or its help shown
    (see :class:`_Parser`), so ``certkit --help`` and ``--version`` never import torch."""
    parser = parser_class(
        prog="certkit",
        description="Train certifiably robust classifiers and certify them.",
        epilog="certkit COMMAND --help describes a command. Long runs print a progress line every 30 seconds "
        "when stderr is not a terminal; CERTKIT_PROGRESS_SECONDS sets the interval (0: every update).",
    )
    parser.add_argument("--version", action="version", version=f"certkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected failure")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)

    def add(name: str, declare: Callable[[argparse.ArgumentParser], None] | None, help: str, **kwargs: Any) -> None:
        command = sub.add_parser(name, help=help, formatter_class=_Formatter, **kwargs)
        # also after the subcommand, where a user adds it on rerunning a failed command (main reads it anywhere)
        command.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected failure")
        command.declare = declare

    add(
        "train",
        _train_arguments,
        help="train a model with a robust-training method",
        description="Train a model. Optimisation defaults follow the literature's recipe for the dataset family and "
        "method (MNIST-like: 90 epochs, SGD lr 0.01, x0.1 every 30, batch 256; CIFAR-10: 150 epochs, lr 0.1, step 50; "
        "CRT on CIFAR-10: 200 epochs, lr 0.1, x0.1 at 50%/75%). Method hyperparameters default to the published "
        "values for the dataset and sigma; the resolved values are written to OUT/model.json. Your own model and "
        "data: --arch pkg.module:factory (returns an nn.Module) and --dataset pkg.module:factory (returns "
        "train and test torch Datasets and the class count).",
    )
    add(
        "certify",
        _certify_arguments,
        help="certify a test set: randomized-smoothing CERTIFY (radii), or a GloRo net deterministically",
        description="Cohen et al. CERTIFY: n0 selection samples, n independent estimation samples, one-sided "
        "Clopper-Pearson lower bound at level alpha, radius sigma*PhiInv(pA). Writes the field's standard TSV "
        "(idx label predict radius correct time), flushed per row, with a JSON sidecar of the settings; re-running "
        "with the same --out resumes (--overwrite starts afresh). --method gloro certifies a GloRo net "
        "deterministically in one pass: the flags of smoothing's sampling and forward passes (--sigma, --n, --n0, "
        "--alpha, --adaptive, --shared-noise, --rng, --seed, --amp, --channels-last, --compile) are refused for "
        "it, as --epsilon is for smoothing. A run of your own model (trained with --arch pkg.module:factory) "
        "certifies with the same --arch, and your own data with --dataset pkg.module:factory; certkit imports "
        "only the factories the command line names.",
    )
    add(
        "predict",
        _certify_arguments,
        help="randomized-smoothing PREDICT over a test set",
        description="Cohen et al. PREDICT: n samples, two-sided binomial test of the top two counts, "
        "abstain (-1) when p > alpha. A run of your own model (trained with --arch pkg.module:factory) "
        "predicts with the same --arch, and your own data with --dataset pkg.module:factory; certkit imports "
        "only the factories the command line names.",
    )
    add("report", _report_arguments, help="ACR and certified accuracy of result files, as a Markdown table and a plot")
    add(
        "curves",
        _curves_arguments,
        help="plot training loss and accuracy per epoch of one or more runs (from metrics.jsonl)",
    )
    add("merge", _merge_arguments, help="join shard result files into one TSV in index order")
    add(
        "demo",
        _demo_arguments,
        help="the main job: SmoothMix teacher -> CRT student vs SmoothMix student, certified and compared",
        description="On Fashion-MNIST: trains a teacher with SmoothMix once, transfers it to a LeNet student "
        "with CRT, trains the same LeNet with SmoothMix directly, certifies all three on the same test images "
        "and prints one table (training seconds and image passes with their ratios, accuracy, ACR, certified "
        "accuracy) with the cost of model generations; files go to --out. About 10 minutes on 2 CPU cores "
        "(--full: the literature's settings, hours). Rerunning continues where it stopped.",
    )
    add(
        "reproduce",
        _reproduce_arguments,
        help="train and certify a published protocol (resumable) and compare with the published result files",
        description="Runs a named protocol of the literature at its own settings, resuming every training epoch "
        "and certification row that is already done, then writes a table (ACR, paired difference and its standard "
        "error, certified accuracy at 0-2.0) and a plot of certkit's curves over the published ones. The device, the "
        "dataset's files and --certify-flags are checked before the first step; a step that fails does not stop "
        "the others, and the command then exits with the first failure's error line: status 2 when every failure "
        "was a mistake to fix, else 1.",
    )
    add(
        "export",
        _export_arguments,
        help="write a certkit run in another layout",
        description="--format reference writes {'epoch', 'arch', 'state_dict'} with the reference key names "
        "(torch.save), which the reference repos' certify.py reads "
        "(pass it the dataset name they use, e.g. mnist for Fashion-MNIST)",
    )
    add("list", _list_arguments, help="list datasets, architectures, methods and published recipes")
    return parser


def certify_namespace(flags: Sequence[str] = ()) -> argparse.Namespace:
    """``certkit certify RUN --out OUT`` (placeholders) with ``flags`` after it, parsed. Without flags, the
    defaults, which tell what a command line set; with them, flags that another command passes on to
    ``certify``, checked before it starts: a bad one raises :class:`CertkitError` saying why."""
    return build_parser(_CheckingParser).parse_args(["certify", "RUN", "--out", "OUT", *flags])


# ---------------------------------------------------------------------------------------------------------
def _factory(spec: str, flag: str) -> Any:
    """Call ``pkg.module:factory`` (your own model or data on the command line, given to ``flag``). A spec
    that names no importable function is the user's to fix; what the function itself raises is left as it is."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or module_name.startswith("."):
        raise CertkitError(
            f"{flag} expects pkg.module:factory (an absolute module name, a function in it), not {spec!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise CertkitError(f"{flag} {spec}: cannot import it ({first_line(e)})") from None
    if not callable(factory):
        raise CertkitError(f"{flag} {spec}: {attr} is {a_or_an(type(factory).__name__)}, not a function")
    try:
        return factory()
    except CertkitError:  # a factory that speaks certkit's language: its one line, as a mistake to fix
        raise
    except Exception as e:
        raise _FactoryFailed(f"{flag} {spec}") from e


class _FactoryFailed(Exception):
    """A user's ``pkg.module:factory`` raised: its own failure, reported as that (not as certkit's) by
    :func:`main`, which shows the original traceback under ``--debug``."""


def _factory_model(spec: str, flag: str = "--arch") -> Any:
    """``--arch pkg.module:factory`` (or ``--teacher-arch``, named by ``flag``): the module it returns."""
    from torch import nn

    model = _factory(spec, flag)
    if not isinstance(model, nn.Module):
        raise CertkitError(f"{flag} {spec}: the factory must return an nn.Module, not {type(model).__name__}")
    return model


def _factory_data(spec: str) -> dict[str, Any]:
    """``--dataset pkg.module:factory``: its (train, test, num_classes) as :func:`build_trainer`'s keywords,
    refused before any work when the class count is not a positive integer or a split holds no items."""
    from certkit.data import as_training_data

    made = _factory(spec, "--dataset")
    if not (isinstance(made, tuple) and len(made) == 3):
        raise CertkitError(f"--dataset {spec}: the factory must return (train, test, num_classes)")
    train, test, classes = made
    if isinstance(classes, bool) or not isinstance(classes, numbers.Integral) or classes < 1:
        raise CertkitError(f"--dataset {spec}: num_classes must be an integer >= 1, not {classes!r}")
    for name, split in (("train", train), ("test", test)):
        if split is not None and len(as_training_data(split)) == 0:
            raise CertkitError(f"--dataset {spec}: the factory's {name} split is empty")
    return {"dataset": train, "test_data": test, "num_classes": int(classes)}


def _refuse_overwriting(run: str, outputs: Sequence[Path], flag: str) -> None:
    """Refuse outputs that are files the command reads its model from: the run's own (weights, metadata,
    training state, metrics) or the reference checkpoint itself, as ``merge`` refuses its inputs."""
    from certkit.checkpoint import META, WEIGHTS
    from certkit.fileio import resolved
    from certkit.train import METRICS, STATE
    from certkit.trainlog import CSV

    source = Path(run)
    if source.name == META:  # a run named by its model.json: the run folder is what is read
        source = source.parent
    read = [source / name for name in (WEIGHTS, META, STATE, METRICS, CSV)] if source.is_dir() else [source]
    protected = {resolved(path) for path in read}
    for path in outputs:
        if resolved(path) in protected:
            raise CertkitError(f"{flag} {outputs[0]}: writing {path} would overwrite the run it reads ({run})")


def cmd_train(args: argparse.Namespace) -> None:
    """Turn the flags into a dataset, a model, an objective and a training configuration, then train."""
    from certkit.recipes import get_recipe
    from certkit.train import TrainConfig, build_trainer

    method = args.method or (args.recipe and get_recipe(args.recipe).method) or "gaussian"
    data = _factory_data(args.dataset) if ":" in args.dataset else {"dataset": args.dataset}
    arch = _factory_model(args.arch) if ":" in args.arch else args.arch
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    teacher_model = None
    if method == "crt" and args.teacher is not None and Path(args.teacher).is_dir():  # a run of your own model?
        flags = ("--teacher-arch", "--teacher-normalization")
        teacher_model = _run_factory_model(args.teacher, args.teacher_arch, args.teacher_normalization, flags, False)
    trainer = build_trainer(
        arch=arch,
        method=method,
        sigma=args.sigma,
        out=args.out,
        teacher=args.teacher,
        teacher_model=teacher_model,
        teacher_arch=None if teacher_model is not None else args.teacher_arch,
        teacher_normalization=args.teacher_normalization,
        recipe=args.recipe,
        hparams={k[3:]: v for k, v in vars(args).items() if k.startswith("hp_")},
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        device=args.device,
        resume=args.resume,
        metric_logs=tuple(args.log or ()),
        meta={"dataset": args.dataset, "arch": args.arch} if ":" in args.dataset + args.arch else None,
        **data,
        **given,
    )
    trainer.run(resume=args.resume)
    if trainer.rank != 0:
        return
    total = trainer.ledger.totals()
    print(f"trained {args.arch} with {method} in {total.get('seconds', 0.0):.1f}s -> {args.out}")


def cmd_certify(args: argparse.Namespace, mode: str) -> None:
    """Load the checkpoint, resolve sigma and the dataset, then run the certifier over the test set."""
    from certkit import reference
    from certkit.data import dataset_info, load_dataset
    from certkit.distributed import wait_for_all, world
    from certkit.fileio import check_output
    from certkit.reference import check_fits_dataset
    from certkit.results import refuse_foreign_companions, sidecar_path, summary_path
    from certkit.smoothing.autobatch import MIN_AUTO_BATCH
    from certkit.smoothing.runner import RunPlan, certify_dataset
    from certkit.smoothing.samplers import sampler_for
    from certkit.smoothing.smooth import Smooth
    from certkit.smoothing.statistics import AdaptiveSchedule, check_sigma
    from certkit.smoothing.voter import Voter
    from certkit.train import select_device

    check_output(args.out, "--out")
    _refuse_overwriting(args.run, [Path(args.out), sidecar_path(args.out), summary_path(args.out)], "--out")
    refuse_foreign_companions(args.out)  # the file itself, also under torchrun, where the ranks write shards
    if args.shard is not None and world()[1] > 1:
        raise CertkitError("--shard splits a run by hand; under torchrun the ranks split it among themselves: drop it")
    if args.sigma is not None:  # fails before the checkpoint and dataset loads, which the sampler's check follows
        check_sigma(args.sigma)
    device = select_device(args.device)
    if args.compile and device.type != "cuda":
        # torch.compile's C++ toolchain lookup logs "No CUDA runtime is found" on a CPU-only run: true, and
        # beside the point, since a CPU run compiles for the CPU
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    own = _own_model(args)
    model, meta = reference.load_any(
        args.run,
        dataset=args.dataset,
        device=device,
        arch=None if own is not None else args.arch,
        normalization=args.normalization,
        model=own,
    )
    dataset = args.dataset or meta.get("dataset")
    if dataset is None:
        raise CertkitError(f"{args.run}: the checkpoint does not name its dataset; pass --dataset")
    if isinstance(dataset, str) and ":" in dataset:
        if args.dataset is None:
            raise CertkitError(
                f"{args.run}: trained on your own data; pass --dataset {dataset} (or a dataset name): certkit "
                "imports a factory only when the command line names it, never because model.json does"
            )
        info, data = _factory_split(dataset, args.split, str(args.run), meta)
    else:
        info = dataset_info(dataset)
        check_fits_dataset(str(args.run), meta["num_classes"], meta["in_shape"], info)
        data = load_dataset(dataset, args.split, args.data_dir)
    certifier = getattr(args, "method", None) or ("gloro" if meta.get("method") == "gloro" else "smoothing")
    if certifier == "gloro":
        _certify_gloro(model, meta, data, args, mode)
        return
    if getattr(args, "epsilon", None) is not None:
        raise CertkitError("--epsilon is the radius a GloRo net certifies; randomized smoothing certifies at --sigma")
    sigma = args.sigma if args.sigma is not None else meta.get("sigma")
    if sigma is None:
        raise CertkitError(f"{args.run}: the checkpoint records no training sigma; pass --sigma")
    if meta.get("sigma") is not None and abs(float(sigma) - float(meta["sigma"])) > 1e-12:
        warnings.warn(f"certifying at sigma={sigma}, the model was trained at sigma={meta['sigma']}", stacklevel=2)
    shard, out = args.shard, args.out
    rank, size = world()
    auto_shard = size > 1
    shards = [f"{args.out}.shard{r}of{size}" for r in range(size)]  # what each rank writes under torchrun
    if auto_shard:
        shard, out = (rank, size), shards[rank]
    plan = RunPlan(
        mode=mode,
        n0=getattr(args, "n0", 100),
        n=args.n,
        alpha=args.alpha,
        batch_size=MIN_AUTO_BATCH if args.batch == "auto" else args.batch,
        skip=args.skip,
        max_idx=args.max,
        shard=shard,
        seed=args.seed,
        adaptive=AdaptiveSchedule() if getattr(args, "adaptive", False) else None,
    )
    settings_extra = {"checkpoint": str(args.run), "dataset": dataset, "split": args.split}
    voter = Voter(model, info.num_classes, channels_last=args.channels_last, amp=args.amp, compile=args.compile)
    smoothed = Smooth.from_sampler(sampler_for(voter, float(sigma), args.shared_noise, args.rng))
    if args.batch == "auto":
        plan = dataclasses.replace(plan, batch_size=_auto_batch(smoothed, len(data), info.in_shape, plan, rank == 0))
    if auto_shard:
        if rank == 0 and not args.overwrite and Path(args.out).exists():
            # resumed as one process resumes it (the same checks), its rows handed to the shards that plan them
            from certkit.results import resume_into_shards
            from certkit.smoothing.runner import run_settings

            resume_into_shards(
                args.out,
                shards,
                mode,
                run_settings(smoothed, data, dataclasses.replace(plan, shard=None), settings_extra),
                ("samples",) if plan.adaptive is not None else (),
            )
        wait_for_all()  # on the gloo group: rank 0's refusal reads as one line on the others, on NCCL too
    complete = certify_dataset(
        smoothed,
        data,
        plan,
        out=out,
        progress=rank == 0,
        settings_extra=settings_extra,
        resume=not args.overwrite,
    )
    if auto_shard:
        wait_for_all()
        if rank == 0:
            _merge_own_shards(shards, args.out)
    if rank == 0:
        if complete is not None or auto_shard:  # under torchrun rank 0 has merged every rank's rows by now
            print(_result_line(args.out, mode))
        print(f"wrote {args.out}")


def _result_line(out: str, mode: str) -> str:
    """The figures of a finished result file, on stdout: on a terminal the progress bar that showed them is
    gone once the run ends. Rounded down from the file's rows, as every certified figure certkit prints."""
    from certkit.report import abstain_rate, exact_accuracy, exact_acr, floor_figure
    from certkit.results import read_results

    res = read_results(out)
    if not len(res):
        return f"{mode}: no image in this plan (a shard of fewer images than shards)"
    figures = f"{mode}: {len(res):,} images, accuracy {floor_figure(exact_accuracy(res, 0.0))}"
    if mode == "certify":
        return f"{figures}, ACR {floor_figure(exact_acr(res))}, abstained {abstain_rate(res):.3f}"
    return f"{figures}, abstained {abstain_rate(res):.3f}"


def _own_model(args: argparse.Namespace) -> Any:
    """``certify``/``predict`` of a certkit run of your own model: the untrained module that ``--arch`` builds
    (see :func:`_run_factory_model`), None for any other checkpoint."""
    return _run_factory_model(
        args.run, args.arch, args.normalization, ("--arch", "--normalization"), args.dataset is None
    )


def _run_factory_model(
    run: str | Path, arch: str | None, normalization: str | None, flags: tuple[str, str], hint_dataset: bool
) -> Any:
    """The untrained module built by the factory that ``arch`` names, for :func:`certkit.reference.load_any` to
    load the run's checked weights into, when ``run`` is a certkit run of your own model (None for any other
    checkpoint). The factory is imported only because the command line names it (``flags[0]``: ``--arch``,
    or ``--teacher-arch`` for a CRT teacher), and only once it is the spec the run's model.json records: a
    checkpoint never chooses code to run. ``hint_dataset``: the message for a missing spec also names the
    run's dataset factory."""
    from certkit.checkpoint import read_meta
    from certkit.reference import is_reference_checkpoint

    arch_flag, norm_flag = flags
    own_arch = arch is not None and ":" in arch
    if is_reference_checkpoint(run):
        if own_arch:
            raise CertkitError(
                f"{arch_flag} {arch}: a factory builds your own model for a certkit run of it; {run} is a "
                f"reference checkpoint, whose {arch_flag} is an architecture name"
            )
        return None
    meta = read_meta(run)
    recorded = meta["arch"]
    if recorded.startswith("custom:"):  # a module given from Python: no factory names it
        if own_arch:
            raise CertkitError(
                f"{arch_flag} {arch}: {run} was trained on a module given from Python ({recorded}), which no "
                "factory names; load it with certkit.load(run, model=<an untrained instance of your module>)"
            )
        return None
    if ":" not in recorded:
        if own_arch:
            raise CertkitError(
                f"{arch_flag} {arch}: {run} is a run of certkit's architecture {recorded!r}, which it records; "
                f"{arch_flag} pkg.module:factory is for a run of your own model"
            )
        return None
    if arch is None:
        data = meta.get("dataset")
        also = f" --dataset {data}" if hint_dataset and isinstance(data, str) and ":" in data else ""
        raise CertkitError(
            f"{run}: a run of your own model; pass {arch_flag} {recorded}{also} to build it (certkit imports a "
            "factory only when the command line names it, never because model.json does)"
        )
    if arch != recorded:
        raise CertkitError(
            f"{arch_flag} {arch}: {run} was trained with --arch {recorded} (its model.json); pass that one"
        )
    if normalization is not None:
        raise CertkitError(
            f"{norm_flag} describes reference .pth/.pth.tar files; your own model holds its own input layer"
        )
    return _factory_model(arch, arch_flag)


def _factory_split(spec: str, split: str, run: str, meta: dict[str, Any]) -> tuple[Any, Any]:
    """``certify --dataset pkg.module:factory``: (its :class:`~certkit.data.DatasetInfo`, the factory's
    ``split`` split), refused in one line unless the split is an indexable Dataset whose items fit the
    model's class count and input shape."""
    from torch.utils.data import DataLoader

    from certkit.data import DatasetInfo, check_item
    from certkit.reference import check_fits_dataset

    made = _factory_data(spec)
    data = made["test_data"] if split == "test" else made["dataset"]
    if data is None:
        raise CertkitError(f"--dataset {spec}: the factory's {split} split is None; certifying reads its items")
    if isinstance(data, DataLoader) or not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise CertkitError(
            f"--dataset {spec}: the factory's {split} split is {a_or_an(type(data).__name__)}; certifying reads items "
            "by index, from a torch Dataset"
        )
    x, _ = check_item(data[0], f"--dataset {spec}: {split} item 0")
    channels, height, width = (int(v) for v in x.shape)
    info = DatasetInfo(
        spec, made["num_classes"], (channels, height, width), (0.0,) * channels, (1.0,) * channels, "custom"
    )
    check_fits_dataset(run, meta["num_classes"], meta["in_shape"], info)
    return info, data


def _auto_batch(smoothed: Any, dataset_size: int, in_shape: Sequence[int], plan: Any, announce: bool) -> int:
    """``--batch auto``: probe once for the whole run, capped by the copies one group of the planned inputs
    draws in one call, and say on stderr what was chosen and why (``announce``: rank 0 only)."""
    from certkit.smoothing.autobatch import MAX_CPU_BATCH, MIN_AUTO_BATCH, auto_batch_size, batch_cap
    from certkit.smoothing.runner import MAX_INPUTS_PER_BATCH

    samples = max(plan.n0, plan.n) if plan.mode == "certify" else plan.n
    inputs = min(smoothed.shared_noise or MAX_INPUTS_PER_BATCH, max(1, len(plan.indices(dataset_size))))
    cap = batch_cap(samples, inputs)
    size = auto_batch_size(smoothed, in_shape, cap)
    device = smoothed.device
    if device.type != "cuda":
        why = f"fastest of a short timing probe on {device}, powers of two {MIN_AUTO_BATCH}..{min(cap, MAX_CPU_BATCH)}"
    elif size == cap:
        why = f"capped at {cap}, enough for {inputs} inputs x {samples} samples; twice that fits on {device}"
    else:
        why = f"half the largest power of two that fits on {device}"
    if announce:
        print(f"certkit: --batch auto: {size} ({why})", file=sys.stderr)
    return size


def _merge_own_shards(shards: list[str], out: str) -> None:
    """Rank 0's last step under torchrun: merge the ranks' shard files into ``out``, write its summary (with
    the speed checks the ranks ran on their own shards' first inputs, combined) and remove the shard files
    it merged. The summary is computed from the file's radii, floored to six digits (a single process
    summarises the rows it proved from their exact radii): lower by at most that rounding, never higher."""
    import json

    from certkit.fileio import PidLock
    from certkit.results import merge_results, sidecar_path, summary_path
    from certkit.summary import write_summary

    summaries = [json.loads(summary_path(shard).read_text()) for shard in shards if summary_path(shard).exists()]
    checks = [s["speed_check"] for s in summaries if s.get("speed_check")]
    with PidLock(out):
        merge_results(shards, out)
        write_summary(out, extra={"speed_check": _combined_speed_check(checks)} if checks else None)
    for shard in shards:
        for path in (Path(shard), sidecar_path(shard), summary_path(shard)):
            path.unlink(missing_ok=True)


def _combined_speed_check(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' vote checks as one: every input checked, the mean agreement over all of them, the lowest."""
    inputs = sum((len(c["inputs"]) for c in checks), 0)
    return dict(
        checks[0],
        inputs=sorted(i for c in checks for i in c["inputs"]),
        vote_agreement=sum(c["vote_agreement"] * len(c["inputs"]) for c in checks) / max(inputs, 1),
        min_input_agreement=min(c["min_input_agreement"] for c in checks),
    )


#: the certify flags of randomized smoothing's sampling and forward passes, by their namespace name: a GloRo
#: net certifies without either, so they are refused for it when set to anything but their defaults
_SMOOTHING_ONLY = (
    "sigma",
    "n",
    "n0",
    "alpha",
    "adaptive",
    "shared_noise",
    "rng",
    "seed",
    "amp",
    "channels_last",
    "compile",
)


def _certify_gloro(model: Any, meta: dict[str, Any], data: Any, args: argparse.Namespace, mode: str) -> None:
    """``certkit certify RUN`` for a GloRo checkpoint: certify, print the three metrics, write the TSV.

    Under torchrun rank 0 does the (one-pass, fast) work alone and the others wait.
    """
    from certkit.distributed import wait_for_all, world
    from certkit.gloro.certify import certify_gloro_dataset
    from certkit.report import count_ratio, floor_figure

    if mode != "certify":
        raise CertkitError(f"{args.run} is a GloRo net, which certifies deterministically: use `certkit certify`")
    if args.batch == "auto":
        raise CertkitError("--batch auto sizes randomized smoothing's noisy batches; give a GloRo net --batch N images")
    defaults = certify_namespace()
    given = [
        "--" + dest.replace("_", "-") for dest in _SMOOTHING_ONLY if getattr(args, dest) != getattr(defaults, dest)
    ]
    if given:
        raise CertkitError(
            f"{', '.join(given[:-1]) + ' and ' if given[:-1] else ''}{given[-1]} "
            f"{'apply' if given[:-1] else 'applies'} to randomized smoothing; "
            "a GloRo net certifies without sampling, in one float64 pass"
        )
    rank, size = world()
    if rank == 0:  # one float64 pass per batch: rank 0 alone certifies, the others wait (cmd_certify refuses --shard)
        dataset = args.dataset or meta.get("dataset")
        summary = certify_gloro_dataset(
            model,
            data,
            out=args.out,
            epsilon=args.epsilon,
            batch_size=args.batch,
            skip=args.skip,
            max_idx=args.max,
            shard=args.shard,
            progress=True,
            settings_extra={"checkpoint": str(args.run), "dataset": dataset, "split": args.split},
            resume=not args.overwrite,
        )
        if summary is not None and summary["gloro"]["N"]:  # a shard's plan may hold no image: no figure then
            g = summary["gloro"]
            print(
                f"gloro: {g['N']} images, epsilon {g['epsilon']:g}: clean accuracy {g['clean_accuracy']:.4f}, "
                f"VRA {floor_figure(count_ratio(g['vra'], g['N']), 4)}, "
                f"rejection rate {g['rejection_rate']:.4f} "
                f"(K_sub {g['lipschitz']['lipschitz_bound']:.6g}, {g['certify_seconds']:.2f}s of forward passes)"
            )
        print(f"wrote {args.out}")
    if size > 1:
        wait_for_all()


def cmd_report(args: argparse.Namespace) -> None:
    from certkit.report import report_files

    try:
        radii = [float(r) for r in args.radii.split(",")] if args.radii else None
    except ValueError:
        raise CertkitError(f"--radii must be comma-separated numbers, e.g. 0,0.25,0.5 (got {args.radii!r})") from None
    print(
        report_files(args.files, radii=radii, plot=args.plot, labels=_labels(args), title=args.title, latex=args.latex)
    )


def cmd_curves(args: argparse.Namespace) -> None:
    from certkit.curves import plot_training_curves

    print(f"plot: {plot_training_curves(args.runs, args.plot, labels=_labels(args), title=args.title)}")


def cmd_merge(args: argparse.Namespace) -> None:
    from certkit.results import merge_results

    merge_results(args.shards, args.out, overwrite=args.overwrite)
    count = len(args.shards)
    print(f"merged {count} shard{'s' if count != 1 else ''} -> {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from certkit.experiments.crt_demo import run_demo

    run_demo(out=args.out, full=args.full, data_dir=args.data_dir, device=args.device)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from certkit.experiments.reproduce import main as reproduce

    return reproduce(args, certify_namespace)


def cmd_export(args: argparse.Namespace) -> None:
    from certkit.reference import export_checkpoint

    _refuse_overwriting(args.run, [Path(args.out)], "--out")
    print(f"wrote {export_checkpoint(args.run, args.out, overwrite=args.overwrite)}")


def cmd_list(args: argparse.Namespace) -> None:
    from certkit.data import DATASETS
    from certkit.methods import list_objectives
    from certkit.models import list_models
    from certkit.recipes import describe_recipes, list_recipes

    if args.what == "recipes":
        print(describe_recipes())
        return
    if args.what == "hyperparameters":
        from certkit.methods import describe_hyperparameters

        print(describe_hyperparameters())
        return
    print("datasets:      " + ", ".join(DATASETS))
    print("architectures: " + ", ".join(list_models()))
    print("methods:       " + ", ".join(list_objectives()))
    print("recipes:       " + ", ".join(list_recipes()) + " (certkit list recipes)")
    print("hyperparameters of each method: certkit list hyperparameters")


class _HeldWarnings:
    """Warnings wait until the command is past its checks: they are printed before the first progress line
    and when the command ends, but dropped when it ends in an error, so a refused command stays one line."""

    def __init__(self) -> None:
        self.pending: list[str] = []

    def hold(self, message: Warning | str, *args: Any, **kwargs: Any) -> None:
        self.pending.append(f"certkit: warning: {message}")

    def flush(self) -> None:
        for line in self.pending:
            print(line, file=sys.stderr)
        self.pending.clear()

    def filter(self, record: Any) -> bool:  # a logging filter: a progress line means the work has begun
        self.flush()
        return True


def run() -> None:
    """The ``certkit`` command and ``python -m certkit``: :func:`main`, then its status as the exit status. When
    the reader of the output has gone, standard output is pointed at /dev/null first, or the interpreter's own
    final flush would fail again with a message; done here, not in :func:`main`, which a program may call."""
    status = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        status = status or 1
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = lambda msg, cat, *a, **k: f"certkit: warning: {msg}\n"
    from certkit.progress import log, log_to_stderr

    log_to_stderr()
    held, shown = _HeldWarnings(), warnings.showwarning
    warnings.showwarning = held.hold
    log.addFilter(held)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # what torchrun needs after "-m certkit" (see certkit.distributed) works without it too
        argv = argv[1:]
    debug = "--debug" in argv
    args: argparse.Namespace | None = None
    terminate = _terminate_as_interrupt()
    try:
        args = build_parser().parse_args(argv)
        if args.command in ("train", "certify", "predict", "demo"):
            from certkit.allocator import keep_freed_memory

            keep_freed_memory()  # every step's buffers reuse the same pages (certkit/allocator.py)
        if args.command in ("train", "certify", "predict"):
            from certkit.distributed import init_from_env

            init_from_env(args.device)
        handler: dict[str, Callable[[argparse.Namespace], int | None]] = {
            "train": cmd_train,
            "certify": lambda a: cmd_certify(a, "certify"),
            "predict": lambda a: cmd_certify(a, "predict"),
            "report": cmd_report,
            "curves": cmd_curves,
            "merge": cmd_merge,
            "demo": cmd_demo,
            "reproduce": cmd_reproduce,
            "export": cmd_export,
            "list": cmd_list,
        }
        status = handler[args.command](args) or 0  # a command that ran other processes passes on their failure
        held.flush()
        return status
    except CertkitError as e:
        print(f"certkit: error: {e}", file=sys.stderr)
        return 2
    except _FactoryFailed as e:
        cause = e.__cause__
        assert isinstance(cause, Exception)
        if debug:
            raise cause from None
        print(
            f"certkit: error: your factory {e} raised {_described(cause)}; rerun with --debug for its traceback",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as e:
        print(
            f"certkit: {'terminated' if isinstance(e, _Terminated) else 'interrupted'}{_resume_hint(args)}",
            file=sys.stderr,
        )
        return 143 if isinstance(e, _Terminated) else 130
    except BrokenPipeError as e:
        if not _stdout_closed():
            return _unexpected(e, debug)
        return 1  # the reader of the output left (`certkit report ... | head`): nothing to report
    except Exception as e:  # a bug, or a failure no check foresaw: one line unless asked for the traceback
        return _unexpected(e, debug)
    finally:
        terminate()
        log.removeFilter(held)
        warnings.showwarning = shown
        _shutdown_distributed()


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's kill, ``timeout``), taken as Ctrl-C is: the files being written are left
    resumable and their locks removed, where the default action would kill the process on the spot."""


def _terminate_as_interrupt() -> Callable[[], None]:
    """Raise :class:`_Terminated` on SIGTERM while a command runs; returns what restores the old handler
    (nothing to do off the main thread, where Python delivers no signals)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def raise_terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _resume_hint(args: argparse.Namespace | None) -> str:
    """How to continue an interrupted command: every finished epoch and written row is kept."""
    command = getattr(args, "command", None)
    if args is not None and command == "train":
        from certkit.train import STATE

        if not (Path(args.out) / STATE).is_file():
            return "; no epoch was saved: rerun the same command to start again"
        return "; rerun the command with --resume to continue from the last saved epoch"
    if command in ("certify", "predict", "demo", "reproduce"):
        return "; rerun the same command to continue where it stopped"
    return ""


def _unexpected(e: Exception, debug: bool) -> int:
    """A bug, or a failure no check foresaw: one line unless asked for the traceback (``--debug``)."""
    if debug:
        raise e
    print(
        f"certkit: error: unexpected {_described(e)} (certkit {__version__}); "
        "rerun with --debug for the traceback and report it",
        file=sys.stderr,
    )
    return 1


def _described(e: BaseException) -> str:
    """An exception's type and the first line of its message (its type alone when it has none)."""
    return f"{type(e).__name__}: {first_line(e)}" if str(e).strip() else type(e).__name__


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (not some other broken pipe, such as one a
    user's factory opened)."""
    import select
    import stat

    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, 0)  # POLLERR is reported whatever is asked for: set when the read end is closed
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # a stream without a descriptor (a test's capture)
        return False


def _shutdown_distributed() -> None:
    if "torch" not in sys.modules:  # nothing was initialised, and importing torch here would cost seconds
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
