"""The voter: how the base classifier f is run to turn noisy copies into class votes.

Everything here changes how fast f is evaluated, never which noise is drawn: eval mode (restored after each
call), a channels-last *copy* of the network, bf16/fp16 autocast (:mod:`certkit.precision`), ``torch.compile``
with every forward pass padded to one shape, and the checks that the logits are (rows, K) and finite. The
caller's model is left as given and stays the fp32 reference that :meth:`Voter.vote_agreement` compares the
votes against.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from certkit.errors import CertkitError
from certkit.precision import autocast_dtype

#: below this agreement with fp32 votes at any checked input, a run with speed options (amp, channels_last,
#: compile, the stem split) is refused
MIN_VOTE_AGREEMENT = 0.99

F = TypeVar("F", bound=Callable[..., Tensor])


class NonFiniteLogits(CertkitError):
    """The network returned NaN or inf on a noisy copy: its votes would be meaningless."""


class Voter:
    """Runs ``model`` on batches of noisy copies and returns the class each copy votes for.

    Args:
        model: maps a float batch (B, C, H, W) in [0, 1] to logits (B, num_classes); normalization must be
            its first layer. It is put in eval mode for each call and its mode is restored afterwards.
        num_classes: number of classes K.
        channels_last: vote with a channels-last *copy* of the network, made here (the caller's model is
            left as it is). Faster convolutions on CUDA tensor cores, and on CPU for small convolutional nets.
        amp: ``"bf16"`` or ``"fp16"`` autocast for the forward pass on CUDA, ``"bf16"`` on a CPU with native
            bf16 instructions (``None`` or ``"off"``: fp32; anything else is refused, see
            :func:`~certkit.precision.autocast_dtype`). A certificate is then about the reduced-precision
            classifier, a fixed function like any other; whether it still votes as the network you trained
            is what :meth:`vote_agreement` measures.
        compile: wrap the network in ``torch.compile``; every forward pass then has one shape (a short batch
            is run at full size and its stale tail ignored), so the graph compiles once.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        channels_last: bool = False,
        amp: str | None = None,
        compile: bool = False,
    ) -> None:
        if num_classes < 2:
            raise CertkitError(f"num_classes must be >= 2 (got {num_classes})")
        self.model = model
        self.num_classes = int(num_classes)
        param = next(iter(model.parameters()), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.amp_dtype = autocast_dtype(amp, self.device)
        self.amp = amp if self.amp_dtype is not None else None
        self._finite: Tensor | None = None  # all logits finite since the last check_finite (on the device)
        self.channels_last = channels_last
        self.compiled = compile
        # the network that votes; self.model stays untouched as the fp32 reference of vote_agreement
        self.network = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model
        self._net: nn.Module = self.compile_fn(self.network)

    @property
    def speed_options(self) -> dict[str, object]:
        """The options that change how the network is run (not what is sampled)."""
        return {"channels_last": self.channels_last, "amp": self.amp, "compile": self.compiled}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.speed_options.items())
        return f"Voter(model={type(self.model).__name__}, num_classes={self.num_classes}, {options})"

    def compile_fn(self, fn: F) -> F:
        """``fn`` compiled for fixed shapes when ``compile`` is on, else ``fn`` itself; on CUDA captured as a
        CUDA graph (``reduce-overhead``), so a forward batch of a small network is one replay instead of a
        launch per kernel (its batch shape is fixed, which is what a graph needs)."""
        if not self.compiled:
            return fn
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        return torch.compile(fn, mode=mode, dynamic=False)  # type: ignore[return-value]

    def new_step(self) -> None:
        """Mark the start of a forward batch for CUDA graphs: the previous batch's graph outputs (noise,
        logits) may be overwritten from here on, and are never read again. A no-op unless compiled on CUDA."""
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Eval mode for the caller's model and for the network that votes (a copy under channels_last),
        restored afterwards."""
        modules = [self.model] if self.network is self.model else [self.model, self.network]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def logits(self, batch: Tensor, *, eager: bool = False) -> Tensor:
        """The voting network's logits on ``batch``, with every speed option applied; ``eager`` runs it
        uncompiled (the batch-size probe, which tries shapes that a compiled graph would each compile for)."""
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return (self.network if eager else self._net)(batch)

    def votes(self, batch: Tensor, used: int) -> Tensor:
        """The class of each of the first ``used`` rows of ``batch``.

        Compiled, the whole of ``batch`` is run (it is the caller's fixed-size buffer) and its tail ignored,
        so the graph sees one shape; otherwise only the rows in use are.
        """
        rows = batch if self.compiled else batch[:used]
        return self.class_votes(self.logits(rows), len(rows))[:used]

    def pad(self, part: Tensor, rows: int) -> Tensor:
        """``part`` with zero rows appended up to ``rows`` when compiled (one shape per graph), else as is."""
        if not self.compiled or len(part) >= rows:
            return part
        return torch.cat([part, part.new_zeros((rows - len(part), *part.shape[1:]))])

    def class_votes(self, logits: Tensor, rows: int) -> Tensor:
        """argmax class of each row of logits known to be (rows, K): a wrong shape would spill votes into
        another input's counts. Whether they are finite (argmax counts a NaN row as a vote for class 0) is
        recorded on the device for :meth:`check_finite`, which every sampler call ends with."""
        if logits.shape != (rows, self.num_classes):
            raise CertkitError(
                f"the model returned logits of shape {tuple(logits.shape)}, expected ({rows}, {self.num_classes})"
            )
        finite = torch.isfinite(logits).all()
        self._finite = finite if self._finite is None else self._finite & finite
        return logits.argmax(1)

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLogits` if a batch voted on since the last check had a NaN or inf logit.

        The check is read once per sampler call, not per forward batch: each read waits for the device, and
        on CUDA the host could then not prepare the next batch while the network runs."""
        finite, self._finite = self._finite, None
        if finite is not None and not bool(finite):
            raise NonFiniteLogits("the model returned NaN or inf logits; certify only a network with finite outputs")

    def vote_agreement(
        self, xs: Tensor, sigma: float, draws: Iterable[Tensor], fast_votes: Callable[[Tensor, Tensor], Tensor]
    ) -> np.ndarray:
        """Per input of ``xs`` (G, C, H, W), all voting on the same draws: the fraction of votes as run for
        certification that equal the plain fp32 model's vote on the same noisy copy.

        ``draws`` yields blocks of standard-normal draws (M, C, H, W); ``fast_votes(xs, eps)`` returns the
        votes (G, M) of ``xs + sigma * eps`` as the sampler computes them (speed options, stem split). A
        certificate is about the classifier that actually votes; agreement below 1 at an input bounds how far
        the options moved its vote probabilities there (by at most the disagreement).
        """
        agree = torch.zeros(len(xs), dtype=torch.int64, device=self.device)
        total = 0
        with self.eval_mode(), torch.inference_mode():
            for eps in draws:
                reference = torch.stack([self.model(eps * sigma + x).argmax(1) for x in xs])  # fp32, as given
                agree += (reference == fast_votes(xs, eps)).sum(1)
                total += len(eps)
        return agree.cpu().numpy() / max(1, total)
