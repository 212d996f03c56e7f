"""The trainer's optimizer steps, run eagerly or as replays of a captured CUDA graph.

Why graphs: the networks of the randomized-smoothing literature are small, so on a GPU an eager step's cost
is its kernel launches and the Python between them, not its arithmetic: a SmoothMix step issues hundreds of
small kernels (noise, attack steps, two forward passes, a backward pass, the optimizer), each from Python. A
captured step is one replay. Compiling only the network (``torch.compile``) leaves the noise, the attack
loop, the backward pass and the optimizer in Python. (Figures: docs/benchmarks.md, "On a GPU".)

What a capture records: the objective's whole step (noise, attack, forward passes, backward pass, optimizer
step) and the running sums of the loss parts, kernel by kernel, with every Python number the step reads baked
in: the learning rates, and the weights of the epoch's schedules (SmoothMix's eta*w_e, Consistency's
epsilon_e, MACER's deferred lambda: ``Objective.step_constants``). So a step is captured once per batch shape
and per value of those numbers, and replayed while they stay the same. What an objective
must not do inside a step (``Objective.graph_safe``): synchronise with the host (``.item()``, ``bool()`` of a
tensor) or make a shape that depends on the data (boolean indexing). A capture cannot stop halfway, so a
non-finite loss is caught by the trainer's end-of-epoch check on the summed loss, before anything is saved.

Noise: captured kernels draw from torch's CUDA generator through graph-safe offsets, so a replay draws fresh
noise each time, and the trainer's per-epoch re-seeding still applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: eager steps before the first capture (torch's own recipe): lazy initialisation -- the optimizer's state,
#: cuBLAS/cuDNN handles and their autotuning, autograd's streams -- must happen outside a capture
WARMUP_STEPS = 3

#: one optimizer step on a batch: the detached 0-d loss and its parts, as float32, keyed by name
Step = Callable[[Tensor, Tensor], dict[str, Tensor]]
#: records ``fn``'s device work once and returns the function that re-runs it (``cuda_graph``)
Capture = Callable[[Callable[[], None]], Callable[[], None]]


def cuda_graph(fn: Callable[[], None]) -> Callable[[], None]:
    """Capture ``fn``'s kernels into a CUDA graph on a side stream and return its replay.

    Unlike ``torch.cuda.graph``, it neither collects garbage nor empties the allocator's cache before the
    capture: a trainer that captures again whenever a learning rate or a schedule weight changes has no use
    for either."""
    graph = torch.cuda.CUDAGraph()
    current = torch.cuda.current_stream()
    stream = torch.cuda.Stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            fn()
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph.replay


@dataclass
class _Captured:
    """One captured step: its static inputs, its replay, and the passes each replay makes per counter."""

    x: Tensor
    y: Tensor
    replay: Callable[[], None]
    passes: list[tuple[int, int]]


class PassCounter:
    """Counts images through forward passes of a module, and images whose outputs receive a gradient.

    The counts come from Python hooks, which a graph replay does not run: :class:`StepRunner` records what
    one capture counted and adds it after every replay."""

    def __init__(self, module: torch.nn.Module, prefix: str = "") -> None:
        self.prefix = prefix
        self.forward = 0
        self.backward = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        n = int(inputs[0].shape[0])
        self.forward += n
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(lambda grad, n=n: self._count_backward(n))

    def _count_backward(self, n: int) -> None:
        self.backward += n

    def pop(self) -> tuple[int, int]:
        """The (forward, backward) images counted since the last pop, and start again from zero."""
        out = (self.forward, self.backward)
        self.forward = self.backward = 0
        return out

    def add(self, passes: tuple[int, int]) -> None:
        self.forward += passes[0]
        self.backward += passes[1]

    def take(self) -> dict[str, int]:
        forward, backward = self.pop()
        return {f"{self.prefix}forward": forward, f"{self.prefix}backward": backward}

    def remove(self) -> None:
        self._handle.remove()


class StepRunner:
    """Runs ``step`` on each batch and sums its outputs on the device, without a host synchronisation.

    A step's outputs are means over its batch; they are summed weighted by the batch's size (``images``
    counts them), so that an epoch's figures are per image, as the reference scripts' running averages, and a
    small last batch does not weigh as much as a full one.

    With ``capture`` (``cuda_graph``), the first ``warmup`` steps run eagerly on a side stream, then one graph
    is captured per batch shape and per value of ``constants()`` (the numbers a capture bakes in: see the
    module docstring) and replayed: a batch is copied into the graph's static inputs and the whole step runs
    as one replay.
    """

    def __init__(
        self,
        step: Step,
        counters: Sequence[PassCounter],
        device: torch.device,
        capture: Capture | None = None,
        constants: Callable[[], Hashable] = tuple,
        warmup: int = WARMUP_STEPS,
    ) -> None:
        self.step = step
        self.constants = constants
        self.counters = list(counters)
        self.device = device
        self.capture = capture
        self.warmup = warmup
        self.eager_steps = 0
        self.totals: dict[str, Tensor] = {}
        self.steps = 0
        self.images = 0
        self._graphs: dict[tuple[Hashable, tuple[int, ...], tuple[int, ...]], _Captured] = {}

    def begin_epoch(self) -> None:
        """Zero the sums (in place: captured steps add to these very tensors)."""
        for total in self.totals.values():
            total.zero_()
        self.steps = 0
        self.images = 0

    def release(self) -> None:
        """Drop the captured steps: a capture holds the addresses of the weights and optimizer state, so one
        must not be replayed after they move (a change of memory format, a load)."""
        self._graphs.clear()

    def __call__(self, x: Tensor, y: Tensor) -> None:
        if self.capture is None or self.eager_steps < self.warmup:
            with self._side_stream():
                self._add(self.step(x, y), len(x))
            self.eager_steps += 1
        else:
            key = (self.constants(), tuple(x.shape), tuple(y.shape))
            captured = self._graphs.get(key) or self._capture(x, y, key)
            captured.x.copy_(x)
            captured.y.copy_(y)
            captured.replay()
            for counter, passes in zip(self.counters, captured.passes):
                counter.add(passes)
        self.steps += 1
        self.images += len(x)

    def _add(self, out: dict[str, Tensor], weight: int) -> None:
        """Accumulate ``weight`` times each mean in place, so that a captured step adds to the same tensors on
        every replay."""
        for k, v in out.items():
            if k not in self.totals:
                self.totals[k] = torch.zeros((), dtype=torch.float32, device=self.device)
            self.totals[k].add_(v, alpha=weight)

    def _capture(self, x: Tensor, y: Tensor, key: tuple[Hashable, tuple[int, ...], tuple[int, ...]]) -> _Captured:
        assert self.capture is not None
        # steps captured with other numbers are never replayed again (schedules do not go back): free them
        self._graphs = {k: g for k, g in self._graphs.items() if k[0] == key[0]}
        static_x, static_y = x.clone(), y.clone()
        before = [c.pop() for c in self.counters]  # the hooks run once while capturing: that is one replay's
        names = set(self.totals)

        def record() -> None:
            out = self.step(static_x, static_y)
            if set(out) != names:  # a total allocated inside the capture would be re-zeroed by every replay
                raise RuntimeError(f"a captured step returned {sorted(out)}, the eager steps {sorted(names)}")
            self._add(out, len(static_x))

        replay = self.capture(record)
        passes = [c.pop() for c in self.counters]
        for counter, counted in zip(self.counters, before):
            counter.add(counted)
        self._graphs[key] = _Captured(static_x, static_y, replay, passes)
        return self._graphs[key]

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        """Warm-up steps before a CUDA capture run on a side stream, as torch's capture recipe asks."""
        if self.capture is None or self.device.type != "cuda":
            yield
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)
