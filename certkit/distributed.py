"""torchrun / DistributedDataParallel set-up, written directly on ``torch.distributed`` (nanoGPT style).

``torchrun --nproc-per-node K -m certkit train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE; certkit then
joins the process group (NCCL on GPUs, gloo on CPU), the trainer wraps the model in
DistributedDataParallel and gives each rank a disjoint share of every epoch's permutation, and rank 0 alone
logs and writes checkpoints. ``certkit certify`` under torchrun certifies the rank's shard and rank 0 merges.
Multi-node: run the same torchrun command on every node with ``--nnodes N --node-rank R
--rdzv-endpoint HOST:PORT``.

torchrun parses abbreviated options even after the script's name, so ``--n`` (an abbreviation of
``--nnodes``, ``--nproc-per-node``, ...) and ``--max`` (of ``--max-restarts``) are taken as its own. Put
``--`` after ``-m certkit`` and torchrun passes everything after it to certkit untouched; or spell them
``--N`` and ``--max-index``, which torchrun cannot mistake::

    torchrun --standalone --nproc-per-node 2 -m certkit -- certify RUN --n 100000 --max 500 --out r.tsv
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from certkit.errors import CertkitError, first_line

#: how long a rank that has finished its share may wait for the others (see :func:`wait_for_all`)
WAIT_TIMEOUT = timedelta(days=30)
_wait_group: Any = None  # a ProcessGroup once torchrun's ranks have joined


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def uses_cuda(device: str) -> bool:
    """Whether a ``--device`` value puts this process on a GPU (``auto`` does when CUDA is present)."""
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_from_env(device: str = "auto") -> bool:
    """Join the process group when launched by torchrun with more than one process.

    The backend follows the device the ranks compute on, not what the machine has: NCCL for CUDA ranks, gloo
    for ``--device cpu`` even on a GPU machine (NCCL cannot reduce CPU tensors). CUDA ranks each take the GPU
    of their LOCAL_RANK, so more local ranks than GPUs is refused before anything is placed on a device
    that does not exist.
    """
    global _wait_group
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available() or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    if not uses_cuda(device):
        dist.init_process_group("gloo")
    else:
        if device.startswith("cuda:"):
            raise CertkitError(
                f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; pass --device cuda"
            )
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= gpus:
            raise CertkitError(
                f"torchrun started local rank {local_rank} but this machine has {gpus} GPU(s): use "
                f"--nproc-per-node {gpus} or less, or --device cpu"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    # made here, while every rank is at the same point: creating a group is itself a collective
    _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return True


def barrier() -> None:
    """Wait for every rank, within the process group's own timeout (minutes): for points the ranks reach
    together, such as the end of a training epoch. On gloo a rank that stopped meanwhile makes this one line
    here too; under NCCL torchrun stops the waiting ranks itself."""
    _wait(None)


def wait_for_all() -> None:
    """Wait for every rank to finish its share of a certification. Shares take unequal times (an already
    finished shard on resume, adaptive sampling, GloRo certified by rank 0 alone), longer than the process
    group's timeout after which a plain barrier fails the whole job, so the wait runs on a gloo group of its
    own with a timeout of :data:`WAIT_TIMEOUT`."""
    _wait(_wait_group)


def _wait(group: Any) -> None:
    """A barrier whose failure, when another rank has stopped (with its own error message, say a mistake
    that rank 0 found), is one line here too rather than a report of an unexpected error."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier(group=group)
    except (RuntimeError, dist.DistError) as e:
        detail = first_line(e)[:160]
        why = f"another process of this job stopped (its message says why; here: {detail})"
        raise CertkitError(f"rank {dist.get_rank()}: {why if 'closed' in detail else detail}") from None


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed element-wise over all ranks (as they are outside torchrun), in float64 on ``device``
    (NCCL reduces GPU tensors only)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return [float(v) for v in values]
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()
